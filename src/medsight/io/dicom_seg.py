"""Segmentation results as DICOM SEG (through highdicom), referencing the series they were made from,
so that PACS viewers and 3D Slicer show them on that series.

Each label value other than 0 becomes one binary segment named from the checkpoint's label names.
Frames are matched to the source slices by position: each source file's ImagePositionPatient is
mapped into the mask's voxel grid, so the mask must lie on the series' own grid (what ``predict``
writes for a DICOM input).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from medsight.errors import MedsightError
from medsight.io.atomic import atomic_path, check_writable
from medsight.scan import Scan

GEOMETRY_TOLERANCE_MM = 1e-2
# Type 2 attributes (present, possibly empty) that a SEG copies from its source; anonymised or
# hand-made series often drop them, which is no reason to refuse them.
TYPE_2_COPIED = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
)  # fmt: skip


def _source_series(source_series_dir: Path, series_uid: str | None):
    """The source series' scan (for its grid) and its datasets, headers only."""
    import pydicom

    from medsight.io import dicom

    source = dicom.read(Path(source_series_dir), series=series_uid)
    uid = source.meta.get("SeriesInstanceUID")
    files = [s for s in dicom.list_series(Path(source_series_dir)) if s.uid == uid][0].files
    datasets = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    for ds in datasets:
        for keyword in TYPE_2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return source, datasets


def _frame_index(mask: Scan, ds, path: Path) -> int:
    """Which mask slice (voxel index k) the source image ``ds`` shows."""
    lps = np.asarray([float(v) for v in ds.ImagePositionPatient])
    voxel = mask.world_to_voxel(lps * [-1.0, -1.0, 1.0])
    k = int(round(float(voxel[2])))
    if not np.allclose(voxel, [0, 0, k], atol=1e-3) or not 0 <= k < mask.spatial_shape[2]:
        raise MedsightError(
            "the mask does not lie on this DICOM series' grid (a slice falls outside it)", path
        )
    return k


def write_dicom_seg(
    mask: Scan,
    source_series_dir: str | Path,
    labels: dict[int, str],
    path: str | Path,
    overwrite: bool = False,
) -> Path:
    """Write ``mask`` (one channel of label values on the series' grid) as a DICOM SEG file at ``path``.

    ``labels`` maps label value -> segment name (0, the background, is not a segment); values in the
    mask without a name are written as ``label <value>``.
    """
    path = check_writable(path, overwrite)
    if mask.ndim != 3 or mask.channels != 1:
        raise MedsightError("DICOM SEG needs a 3D mask with one channel of label values", path)
    source, datasets = _source_series(Path(source_series_dir), mask.meta.get("SeriesInstanceUID"))
    if source.spatial_shape != mask.spatial_shape or not np.allclose(
        source.affine, mask.affine, atol=GEOMETRY_TOLERANCE_MM
    ):
        raise MedsightError(
            f"the mask's grid (shape {list(mask.spatial_shape)}) is not the source series' grid "
            f"(shape {list(source.spatial_shape)}); DICOM SEG frames must match the source slices",
            path,
        )
    if "FrameOfReferenceUID" not in datasets[0]:
        raise MedsightError(
            "the source series has no FrameOfReferenceUID, which DICOM SEG requires", Path(source_series_dir)
        )
    values = np.asarray(mask.array[0])
    segments = sorted({int(v) for v in np.unique(values) if v != 0} | {int(v) for v in labels if int(v) != 0})
    if not segments:
        raise MedsightError("the checkpoint names no foreground label to write as a segment", path)
    # frames in source-file order: (frames, rows, cols, segments); the mask is (cols, rows, slices)
    frames = np.stack([values[:, :, _frame_index(mask, ds, path)].T for ds in datasets])
    one_hot = np.stack([frames == v for v in segments], axis=-1).astype(np.uint8)
    names = [str(labels.get(v, f"label {v}"))[:64] for v in segments]  # LO: at most 64 characters
    with warnings.catch_warnings():
        # highdicom warns about source values it copies as they are (a one-part PatientName such as
        # an anonymised "PGBM-001"): they are the source's, not something to fix here
        warnings.simplefilter("ignore", UserWarning)
        try:
            seg = _segmentation(datasets, one_hot, names)
        except ValueError as exc:  # highdicom's checks of the source headers
            raise MedsightError(f"cannot make a DICOM SEG from this series: {exc}", path) from exc
    with atomic_path(path, overwrite) as tmp:
        seg.save_as(str(tmp))
    return path


def _segmentation(datasets: list, one_hot: np.ndarray, names: list[str]):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import medsight

    algorithm = hd.AlgorithmIdentificationSequence(
        name="medsight", version=medsight.__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in enumerate(names, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=one_hot,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(datasets[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medsight",
        manufacturer_model_name="medsight",
        software_versions=medsight.__version__,
        device_serial_number="0",
        series_description="medsight segmentation",
        omit_empty_frames=False,
    )
