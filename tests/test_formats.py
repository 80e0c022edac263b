"""Formats users have (issue 24, items 9 and 11): compressed TIFF, GIF, 16-bit colour PNG, MetaImage,
compressed DICOM, integer DICOM voxels, NIfTI units and DICOM SEG output. Every file is made here,
by the library that defines the format (tifffile, Pillow, pypng, SimpleITK, pydicom, nibabel)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_factory import write_series
from medsight import MedsightError, Scan, io

FLIP = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS


# -- pictures -------------------------------------------------------------------------------------------
def test_lzw_compressed_tiff_as_drive_stores_it(tmp_path):
    import tifffile

    pixels = np.random.default_rng(0).integers(0, 256, (12, 17, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "21_training.tif", pixels, compression="lzw")
    with tifffile.TiffFile(tmp_path / "21_training.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW
    scan = io.read(tmp_path / "21_training.tif")
    assert scan.array.shape == (3, 12, 17)
    assert np.array_equal(scan.array[1], pixels[..., 1])


@pytest.mark.parametrize("mode", ["L", "P"])
def test_gif_mask_keeps_its_values(tmp_path, mode):
    values = np.zeros((9, 11), np.uint8)
    values[2:5, 3:8] = 255 if mode == "L" else 2  # DRIVE: 0/255 greys; label maps: 0/1/2 indices
    values[6, 1] = 255 if mode == "L" else 1
    img = Image.fromarray(values, mode="L")
    if mode == "P":  # a coloured palette: the indices are the labels
        img = Image.fromarray(values, mode="P")
        img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0, 0, 255] * 253)
    img.save(tmp_path / "21_manual1.gif")
    scan = io.read(tmp_path / "21_manual1.gif")
    assert scan.array.shape == (1, 9, 11)
    assert np.array_equal(scan.array[0], values)
    with pytest.raises(MedsightError, match="does not write it"):
        io.write(scan, tmp_path / "out.gif")


def test_16_bit_rgb_png_keeps_every_bit(tmp_path):
    import png

    pixels = np.random.default_rng(1).integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    pixels[0, 0] = (55255, 1, 65535)
    with open(tmp_path / "a.png", "wb") as handle:
        png.Writer(7, 5, greyscale=False, bitdepth=16).write(handle, pixels.reshape(5, 21).tolist())
    scan = io.read(tmp_path / "a.png")
    assert scan.array.dtype == np.uint16 and scan.array.shape == (3, 5, 7)
    assert scan.array[0, 0, 0] == 55255  # Pillow alone gives 215
    assert np.array_equal(np.moveaxis(scan.array, 0, -1), pixels)
    back = io.write(scan, tmp_path / "b.png")
    _, _, rows, info = png.Reader(filename=str(back)).asDirect()
    assert info["bitdepth"] == 16
    assert np.array_equal(np.vstack([np.asarray(r) for r in rows]).reshape(5, 7, 3), pixels)


# -- MetaImage ------------------------------------------------------------------------------------------
def _oblique_sitk_image(size=(6, 5, 4)):
    import SimpleITK as sitk

    arr = np.random.default_rng(2).integers(-1000, 1000, size[::-1]).astype(np.int16)  # (z, y, x)
    image = sitk.GetImageFromArray(arr)
    theta = np.deg2rad(20)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    image.SetDirection(rotation.ravel().tolist())
    image.SetOrigin((12.5, -30.0, 7.25))
    image.SetSpacing((0.7, 0.9, 2.5))
    return image, arr


@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_metaimage_geometry_matches_simpleitk(tmp_path, suffix):
    import SimpleITK as sitk

    image, arr = _oblique_sitk_image()
    sitk.WriteImage(image, str(tmp_path / f"ct{suffix}"))
    scan = io.read(tmp_path / f"ct{suffix}")
    assert scan.spatial_shape == (6, 5, 4) and scan.array.dtype == np.int16
    for index in [(0, 0, 0), (5, 4, 3), (2, 1, 3), (4, 0, 1)]:
        assert scan.array[0][index] == arr[index[::-1]]
        lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
        assert np.allclose(scan.voxel_to_world(index), lps * FLIP, atol=1e-6)
        point = np.asarray(image.TransformContinuousIndexToPhysicalPoint((1.5, 2.25, 0.5)))
        assert np.allclose(scan.world_to_voxel(point * FLIP), (1.5, 2.25, 0.5), atol=1e-6)


def test_metaimage_written_by_medsight_reads_back_in_simpleitk(tmp_path):
    import SimpleITK as sitk

    image, arr = _oblique_sitk_image()
    sitk.WriteImage(image, str(tmp_path / "in.mha"))
    scan = io.read(tmp_path / "in.mha")
    io.write(scan, tmp_path / "out.mha")
    back = sitk.ReadImage(str(tmp_path / "out.mha"))
    assert np.array_equal(sitk.GetArrayFromImage(back), arr)
    assert np.allclose(back.GetDirection(), image.GetDirection())
    assert np.allclose(back.GetOrigin(), image.GetOrigin())
    assert np.allclose(back.GetSpacing(), image.GetSpacing())
    with pytest.raises(MedsightError, match="cannot write"):
        io.write(scan, tmp_path / "out.mhd")


def test_2d_metaimage(tmp_path):
    import SimpleITK as sitk

    arr = np.arange(20, dtype=np.uint8).reshape(4, 5)  # (y, x)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.3, 0.4))
    image.SetOrigin((1.0, 2.0))
    sitk.WriteImage(image, str(tmp_path / "xray.mha"))
    scan = io.read(tmp_path / "xray.mha")
    assert scan.ndim == 2 and scan.spatial_shape == (5, 4)  # ITK index order (x, y), as DICOM
    assert scan.array[0, 3, 1] == arr[1, 3]
    assert np.allclose(scan.voxel_to_world((3, 1)), np.array([1.0 + 3 * 0.3, 2.0 + 0.4, 0.0]) * FLIP)


# -- compressed DICOM -------------------------------------------------------------------------------------
def _jpeg_lossless_pixel_data(pixels: np.ndarray) -> bytes:
    """GDCM (inside SimpleITK) encodes JPEG Lossless, Process 14 SV1: pydicom itself has no encoder."""
    import tempfile

    import SimpleITK as sitk

    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.UseCompressionOn()
    writer.SetCompressor("JPEG")
    with tempfile.TemporaryDirectory() as folder:
        target = str(Path(folder) / "slice.dcm")
        writer.SetFileName(target)
        writer.Execute(sitk.GetImageFromArray(pixels))
        encoded = pydicom.dcmread(target)
    assert encoded.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    return encoded.PixelData


def _compress_series(folder: Path, syntax: str) -> None:
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if syntax == pydicom.uid.JPEGLosslessSV1:
            ds.PixelData = _jpeg_lossless_pixel_data(ds.pixel_array)
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            ds.compress(syntax)
        ds.save_as(f, enforce_file_format=True)
        assert pydicom.dcmread(f).file_meta.TransferSyntaxUID == syntax


@pytest.mark.parametrize(
    "syntax",
    [pydicom.uid.JPEGLosslessSV1, pydicom.uid.JPEGLSLossless, pydicom.uid.RLELossless],
    ids=["jpeg-lossless", "jpeg-ls-lossless", "rle-lossless"],
)
def test_compressed_dicom_series_reads_like_the_uncompressed_one(tmp_path, syntax):
    volume = np.random.default_rng(3).integers(0, 4000, (4, 6, 5))
    write_series(tmp_path / "plain", volume, intercept=-1024, shuffle_seed=None)
    write_series(tmp_path / "packed", volume, intercept=-1024, shuffle_seed=None)
    _compress_series(tmp_path / "packed", syntax)
    plain, packed = io.read(tmp_path / "plain"), io.read(tmp_path / "packed")
    assert np.array_equal(packed.array, plain.array)
    assert packed.array[0, 2, 1, 3] == volume[3, 1, 2] - 1024
    assert np.allclose(packed.affine, plain.affine)


# -- integer DICOM voxels, NIfTI units -------------------------------------------------------------------
@pytest.mark.parametrize(
    "high,slope,intercept,dtype",
    [(3000, 1, -1024, np.int16), (60000, 1, 0, np.uint16), (3000, 2.5, 0, np.float32)],
)
def test_dicom_keeps_integers_when_the_rescale_is_integral(tmp_path, high, slope, intercept, dtype):
    volume = np.random.default_rng(4).integers(0, high, (3, 6, 5))
    volume[0, 0, 0] = high
    write_series(tmp_path / "s", volume, slope=slope, intercept=intercept, shuffle_seed=None)
    scan = io.read(tmp_path / "s")
    assert scan.array.dtype == dtype
    assert scan.array[0, 0, 0, 0] == high * slope + intercept
    io.write(scan, tmp_path / "ct.nii.gz")
    assert nib.load(tmp_path / "ct.nii.gz").get_data_dtype() == dtype


def test_nifti_units_survive_read_then_write(tmp_path):
    img = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), np.diag([0.5, 0.5, 1.0, 1.0]))
    img.header.set_xyzt_units(xyz="micron", t="msec")
    nib.save(img, tmp_path / "a.nii.gz")
    io.write(io.read(tmp_path / "a.nii.gz"), tmp_path / "b.nii.gz")
    assert nib.load(tmp_path / "b.nii.gz").header.get_xyzt_units() == ("micron", "msec")


def test_scan_from_dicom_is_written_in_mm(tmp_path):
    write_series(tmp_path / "s", np.zeros((2, 4, 4)))
    io.write(io.read(tmp_path / "s"), tmp_path / "a.nii.gz")
    assert nib.load(tmp_path / "a.nii.gz").header.get_xyzt_units()[0] == "mm"


# -- DICOM SEG --------------------------------------------------------------------------------------------
def _oblique_dirs():
    theta = np.deg2rad(15)
    row = np.array([np.cos(theta), np.sin(theta), 0.0])
    col = np.array([0.0, np.cos(0.3), -np.sin(0.3)])
    col -= row * (row @ col)
    return row, col / np.linalg.norm(col)


def test_dicom_seg_references_the_series_and_matches_the_mask(tmp_path):
    import highdicom as hd

    from medsight.io.dicom_seg import write_dicom_seg

    slices, rows, cols = 5, 6, 7
    geo = write_series(tmp_path / "s", np.zeros((slices, rows, cols)), *_oblique_dirs(), slice_step=3.0)
    labelled = np.zeros((slices, rows, cols), np.uint8)  # indexed like the factory: (slice, row, column)
    labelled[1:4, 2:5, 1:3] = 1
    labelled[2, 0, 6] = 2
    frame_of_reference = pydicom.uid.generate_uid()  # scanners write it; the factory does not
    for f in (tmp_path / "s").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = frame_of_reference
        ds.save_as(f)
    source = io.read(tmp_path / "s")
    mask = source.with_array(np.transpose(labelled, (2, 1, 0))[None])  # medsight axes (column, row, slice)
    names = {0: "background", 1: "liver", 2: "tumour"}
    write_dicom_seg(mask, tmp_path / "s", names, tmp_path / "seg.dcm")

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == geo["uid"]
    assert int(seg.NumberOfFrames) == slices * 2  # one frame per source slice and segment
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "tumour"]
    by_slice = {
        int(ds.InstanceNumber) - 1: ds.SOPInstanceUID
        for ds in (pydicom.dcmread(f) for f in (tmp_path / "s").glob("*.dcm"))
    }
    for k, uid in by_slice.items():
        frames = seg.get_pixels_by_source_instance([uid], segment_numbers=[1, 2])[0]
        assert np.array_equal(frames[..., 0], labelled[k] == 1)
        assert np.array_equal(frames[..., 1], labelled[k] == 2)
    # the SEG's own geometry (highdicom, LPS) puts each segment where medsight's mask has it
    volume = seg.get_volume(combine_segments=True)
    for value in (1, 2):
        seg_voxels = np.argwhere(np.asarray(volume.array) == value)
        seg_world = seg_voxels @ volume.affine[:3, :3].T + volume.affine[:3, 3]
        mask_world = mask.voxel_to_world(np.argwhere(mask.array[0] == value)) * FLIP
        assert np.allclose(np.sort(seg_world, axis=0), np.sort(mask_world, axis=0), atol=1e-4)


def test_dicom_seg_refuses_a_mask_on_another_grid(tmp_path):
    from medsight.io.dicom_seg import write_dicom_seg

    write_series(tmp_path / "s", np.zeros((3, 4, 4)))
    source = io.read(tmp_path / "s")
    shifted = Scan(
        np.zeros((1, 4, 4, 3), np.uint8), source.affine + np.pad(np.eye(3, 4, 3), ((0, 1), (0, 0)))
    )
    with pytest.raises(MedsightError, match="grid"):
        write_dicom_seg(shifted, tmp_path / "s", {1: "x"}, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


# -- progress ---------------------------------------------------------------------------------------------
def test_long_dicom_read_shows_progress_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    from medsight import progress

    write_series(tmp_path / "s", np.zeros((6, 4, 4)))
    monkeypatch.setattr(progress, "LONG_WORK", 5)  # 6 files count as long here
    io.read(tmp_path / "s")
    assert "reading DICOM" not in capsys.readouterr().err  # captured stderr is not a terminal
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    io.read(tmp_path / "s")
    assert "reading DICOM" in capsys.readouterr().err
    monkeypatch.setenv("MEDSIGHT_PROGRESS", "0")
    io.read(tmp_path / "s")
    assert "reading DICOM" not in capsys.readouterr().err
    monkeypatch.setattr(progress, "LONG_WORK", 6)  # 6 files is not long
    monkeypatch.delenv("MEDSIGHT_PROGRESS")
    io.read(tmp_path / "s")
    assert "reading DICOM" not in capsys.readouterr().err


def test_long_slice_wise_predict_shows_progress_on_a_terminal(monkeypatch, capsys):
    from medsight import progress
    from medsight.engine.infer import slice_probabilities

    def forward(x):  # two classes, the first always wins
        return np.stack([np.ones_like(x[:, 0]), np.zeros_like(x[:, 0])], axis=1)

    image = np.zeros((1, 8, 8, 12), np.float32)  # 12 slices
    monkeypatch.setattr(progress, "LONG_WORK", 10)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    probs = slice_probabilities(forward, image, slices=1, batch=4)
    assert probs.shape == (2, 8, 8, 12)
    assert "segmenting 12 slices" in capsys.readouterr().err
    monkeypatch.setattr(progress, "LONG_WORK", 12)
    slice_probabilities(forward, image, slices=1, batch=4)
    assert "segmenting" not in capsys.readouterr().err


@pytest.mark.parametrize("shape,patch", [((96, 80, 40), (32, 32, 16)), ((20, 64, 64), (32, 32, 32))])
def test_window_count_matches_monai(shape, patch):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from medsight.engine.infer import _windows

    padded = tuple(max(s, p) for s, p in zip(shape, patch, strict=True))  # MONAI pads up to the patch first
    interval = _get_scan_interval(padded, patch, 3, (0.25,) * 3)
    assert _windows(shape, patch, 0.25) == len(dense_patch_slices(padded, patch, interval))
