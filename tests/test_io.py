"""Readers and writers on synthetic files: geometry round trips, DICOM series assembly, bad input."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import nrrd
import numpy as np
import pytest
from PIL import Image

from dicom_factory import write_series
from medsight import MedsightError, Scan, io

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def oblique_affine() -> np.ndarray:
    """A rotated, anisotropic, translated affine: any axis mix-up shows."""
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.7, 1.1, 3.0])
    aff[:3, 3] = [-12.5, 40.0, 7.25]
    return aff


# -- Scan geometry ----------------------------------------------------------------------------------
def test_voxel_world_round_trip_and_spacing():
    scan = Scan.from_spatial(np.zeros((4, 5, 6)), oblique_affine())
    assert np.allclose(scan.spacing, (0.7, 1.1, 3.0))
    ijk = np.array([[0, 0, 0], [3, 4, 5], [1.5, 2.0, 0.5]])
    assert np.allclose(scan.world_to_voxel(scan.voxel_to_world(ijk)), ijk)
    # voxel (0, 0, 1) is one slice step (3 mm along z) from the origin
    assert np.allclose(scan.voxel_to_world([0, 0, 1]), [-12.5, 40.0, 10.25])


def test_slice_plane_of_axis_aligned_volume():
    scan = Scan.from_spatial(
        np.zeros((10, 20, 30)), Scan.affine_from_spacing((0.5, 0.8, 2.0), origin=(1, 2, 3))
    )
    plane = scan.slice_plane(4)  # axial slice k=4
    assert np.allclose(plane.origin, [1, 2, 3 + 4 * 2.0])
    assert np.allclose(plane.normal, [0, 0, 1])
    assert plane.spacing == (0.5, 0.8)
    assert np.allclose(plane.world(2, 3), [1 + 2 * 0.5, 2 + 3 * 0.8, 11])
    sagittal = scan.slice_plane(2, axis=0)
    assert np.allclose(sagittal.normal, [1, 0, 0]) and np.allclose(sagittal.origin, [2, 2, 3])


def test_orientation_codes():
    assert Scan.from_spatial(np.zeros((2, 2, 2)), np.diag([-1.0, -1.0, 1.0, 1.0])).orientation == "LPS"
    assert Scan.from_spatial(np.zeros((2, 2, 2))).orientation == "RAS"


# -- round trips --------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".npz"])
def test_volume_round_trip_keeps_voxels_and_affine(tmp_path, suffix):
    rng = np.random.default_rng(0)
    scan = Scan.from_spatial(rng.integers(0, 1000, (7, 8, 9)).astype(np.int16), oblique_affine())
    path = io.write(scan, tmp_path / f"vol{suffix}")
    back = io.read(path)
    assert back.spatial_shape == (7, 8, 9)
    assert np.array_equal(back.array, scan.array)
    assert np.allclose(back.affine, scan.affine, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".npz"])
def test_multichannel_round_trip(tmp_path, suffix):
    arr = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    scan = Scan(arr, oblique_affine())
    back = io.read(io.write(scan, tmp_path / f"mc{suffix}"))
    assert back.channels == 2 and np.array_equal(back.array, arr)
    assert np.allclose(back.affine, scan.affine, atol=1e-5)


def test_nifti_reader_matches_nibabel_layout(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nib.save(nib.Nifti1Image(data, oblique_affine()), tmp_path / "a.nii.gz")
    scan = io.read(tmp_path / "a.nii.gz")
    assert scan.array.shape == (1, 2, 3, 4) and scan.array[0, 1, 2, 3] == data[1, 2, 3]
    assert scan.meta["format"] == "nifti"


def test_nrrd_in_lps_space_is_converted_to_ras(tmp_path):
    data = np.zeros((3, 4, 5), np.uint8)
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.5, 0.6, 2.0]),
        "space origin": np.array([10.0, 20.0, 30.0]),
    }
    nrrd.write(str(tmp_path / "a.nrrd"), data, header)
    scan = io.read(tmp_path / "a.nrrd")
    expected = np.array([[-0.5, 0, 0, -10.0], [0, -0.6, 0, -20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])
    assert np.allclose(scan.affine, expected)


@pytest.mark.parametrize("mode,shape", [("L", (1, 6, 9)), ("RGB", (3, 6, 9))])
def test_png_round_trip_rows_then_columns(tmp_path, mode, shape):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (6, 9) if mode == "L" else (6, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels, mode=mode).save(tmp_path / "a.png")
    scan = io.read(tmp_path / "a.png")
    assert scan.array.shape == shape and scan.ndim == 2
    # pixel at row 2, column 7
    expected = pixels[2, 7] if mode == "L" else pixels[2, 7, 0]
    assert scan.array[0, 2, 7] == expected
    back = io.read(io.write(scan, tmp_path / "b.png"))
    assert np.array_equal(back.array, scan.array)


def test_jpeg_and_tiff(tmp_path):
    pixels = np.full((8, 10, 3), 128, np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg")
    assert io.read(tmp_path / "a.jpg").array.shape == (3, 8, 10)
    floats = Scan(np.linspace(0, 1, 80, dtype=np.float32).reshape(1, 8, 10))
    back = io.read(io.write(floats, tmp_path / "f.tif"))
    assert np.array_equal(back.array, floats.array)


def test_npy_plain_array_gets_unit_geometry(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 5, 6), np.float32))
    scan = io.read(tmp_path / "a.npy")
    assert scan.spatial_shape == (4, 5, 6) and scan.spacing == (1.0, 1.0, 1.0)


# -- DICOM --------------------------------------------------------------------------------------------
def _oblique_dirs():
    theta = np.deg2rad(15)
    row = np.array([np.cos(theta), np.sin(theta), 0.0])
    col = np.array([0.0, np.cos(0.3), -np.sin(0.3)])
    col -= row * (row @ col)  # keep the two directions orthonormal
    return row, col / np.linalg.norm(col)


def test_dicom_series_is_ordered_rescaled_and_placed(tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.integers(0, 4000, (6, 5, 7))  # (slices, rows, cols), written in shuffled file order
    row, col = _oblique_dirs()
    geo = write_series(
        tmp_path / "s",
        volume,
        row,
        col,
        pixel_spacing=(0.5, 0.8),
        slice_step=2.5,
        origin=(10, -20, 30),
        slope=2.0,
        intercept=-1024,
    )
    (tmp_path / "s" / "README.txt").write_text("not a DICOM file, must be skipped")
    scan = io.read(tmp_path / "s")
    assert scan.spatial_shape == (7, 5, 6)  # (columns, rows, slices)
    # voxel (i=col, j=row, k=slice) holds volume[k, j, i] * slope + intercept
    assert scan.array[0, 3, 1, 4] == volume[4, 1, 3] * 2.0 - 1024
    expected = np.eye(4)
    expected[:3, 0] = LPS_TO_RAS @ (row * 0.8)  # along a row, the column spacing (PixelSpacing[1])
    expected[:3, 1] = LPS_TO_RAS @ (col * 0.5)
    expected[:3, 2] = LPS_TO_RAS @ (geo["normal"] * 2.5)
    expected[:3, 3] = LPS_TO_RAS @ np.array([10.0, -20.0, 30.0])
    assert np.allclose(scan.affine, expected, atol=1e-5)
    assert scan.meta["SeriesDescription"] == "test series" and scan.meta["uniform_slices"]


def test_dicom_matches_monai_pydicom_reader(tmp_path):
    from monai.data import PydicomReader

    row, col = _oblique_dirs()
    write_series(tmp_path / "s", np.random.default_rng(3).integers(0, 100, (4, 6, 5)), row, col)
    reader = PydicomReader()
    data, meta = reader.get_data(reader.read(str(tmp_path / "s")))
    scan = io.read(tmp_path / "s")
    assert np.allclose(scan.affine, meta["affine"], atol=1e-4)
    assert np.array_equal(scan.array[0], data)


def test_dicom_folder_with_two_series(tmp_path):
    write_series(tmp_path / "d", np.zeros((3, 4, 4)), description="T1", prefix="a")
    other = write_series(tmp_path / "d", np.ones((2, 4, 4)), description="FLAIR", prefix="b")
    with pytest.raises(MedsightError, match="2 DICOM series"):
        io.read(tmp_path / "d")
    assert io.read(tmp_path / "d", series="FLAIR").spatial_shape == (4, 4, 2)
    assert io.read(tmp_path / "d", series=other["uid"]).array.max() == 1


def test_single_dicom_file_is_2d(tmp_path):
    write_series(tmp_path / "s", np.full((1, 4, 6), 7))
    scan = io.read(next((tmp_path / "s").glob("*.dcm")))
    assert scan.ndim == 2 and scan.spatial_shape == (6, 4)


def test_dicom_duplicate_positions_rejected(tmp_path):
    write_series(tmp_path / "s", np.zeros((2, 4, 4)), slice_step=0.0)
    with pytest.raises(MedsightError, match="share one ImagePositionPatient"):
        io.read(tmp_path / "s")


def test_truncated_dicom_slice_names_the_file(tmp_path):
    write_series(tmp_path / "s", np.zeros((3, 16, 16)))
    victim = sorted((tmp_path / "s").glob("*.dcm"))[1]
    victim.write_bytes(victim.read_bytes()[:-200])
    with pytest.raises(MedsightError) as err:
        io.read(tmp_path / "s")
    assert victim.name in str(err.value)


# -- bad input ------------------------------------------------------------------------------------------
def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MedsightError, match="no readable DICOM series"):
        io.read(tmp_path)


def test_unsupported_suffix(tmp_path):
    (tmp_path / "scan.vtk").write_bytes(b"x")
    with pytest.raises(MedsightError, match="unsupported format '.vtk'"):
        io.read(tmp_path / "scan.vtk")


def test_truncated_nifti(tmp_path):
    scan = Scan.from_spatial(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32))
    path = io.write(scan, tmp_path / "a.nii.gz")
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(MedsightError, match=r"a\.nii\.gz: cannot read as nifti"):
        io.read(path)


def test_corrupt_png(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(MedsightError, match="a.png"):
        io.read(tmp_path / "a.png")


def test_write_refuses_to_overwrite_and_failed_write_leaves_nothing(tmp_path):
    scan = Scan.from_spatial(np.zeros((3, 3, 3), np.uint8))
    target = io.write(scan, tmp_path / "a.nii.gz")
    before = target.read_bytes()
    with pytest.raises(MedsightError, match="already exists"):
        io.write(scan, target)
    io.write(Scan.from_spatial(np.ones((3, 3, 3), np.uint8)), target, overwrite=True)
    assert target.read_bytes() != before
    # a picture writer that fails midway (3D volume to PNG) must leave no file behind
    with pytest.raises(MedsightError):
        io.write(scan, tmp_path / "x.png")
    assert sorted(os.listdir(tmp_path)) == ["a.nii.gz"]


def test_written_files_get_the_umask_permissions_not_private_ones(tmp_path):
    previous = os.umask(0o022)
    try:
        written = io.write_text(tmp_path / "summary.json", "{}")
    finally:
        os.umask(previous)
    assert written.stat().st_mode & 0o777 == 0o644  # what open() would have made under umask 022


# -- CLI --------------------------------------------------------------------------------------------------
def test_cli_convert_dicom_to_nifti_and_info(tmp_path, run_cli):
    write_series(tmp_path / "s", np.arange(3 * 4 * 5).reshape(3, 4, 5))
    result = run_cli("convert", str(tmp_path / "s"), str(tmp_path / "out.nii.gz"))
    assert result.returncode == 0, result.stderr
    assert np.allclose(io.read(tmp_path / "out.nii.gz").affine, io.read(tmp_path / "s").affine)
    again = run_cli("convert", str(tmp_path / "s"), str(tmp_path / "out.nii.gz"))
    assert again.returncode == 2 and "already exists" in again.stderr
    info = run_cli("info", str(tmp_path / "out.nii.gz"), "--json")
    assert '"shape": [\n    5,\n    4,\n    3\n  ]' in info.stdout


@pytest.mark.parametrize("make_bad", ["missing", "garbage_nifti", "empty_folder"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, make_bad, run_cli):
    target = {
        "missing": tmp_path / "nope.nii.gz",
        "garbage_nifti": tmp_path / "g.nii.gz",
        "empty_folder": tmp_path,
    }[make_bad]
    if make_bad == "garbage_nifti":
        target.write_bytes(b"not a nifti at all")
    result = run_cli("info", str(target))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "Traceback" not in result.stderr
