"""DICOM series from a folder (or one DICOM file) through pydicom.

Slices are grouped by SeriesInstanceUID, ordered along the slice normal (the cross product of the
two ImageOrientationPatient directions) by the projection of ImagePositionPatient, and rescaled by
RescaleSlope/RescaleIntercept. DICOM's patient space is LPS; the affine is converted to RAS+.
Voxel axes are (column, row, slice), as in ITK and NIfTI.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsight import progress
from medsight.errors import MedsightError
from medsight.scan import Scan

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class SeriesInfo:
    uid: str
    description: str
    modality: str
    files: list[Path]


def _header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # not DICOM (a README, a thumbnail...): skipped when scanning a folder
        return None


def list_series(folder: Path) -> list[SeriesInfo]:
    """Every DICOM series in ``folder`` (not recursive), largest first."""
    groups: dict[str, SeriesInfo] = {}
    files: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        ds = _header(f)
        if ds is None or "SeriesInstanceUID" not in ds:
            continue
        uid = str(ds.SeriesInstanceUID)
        files[uid].append(f)
        groups.setdefault(
            uid, SeriesInfo(uid, str(ds.get("SeriesDescription", "")), str(ds.get("Modality", "")), [])
        )
    for uid, fs in files.items():
        groups[uid].files = fs
    return sorted(groups.values(), key=lambda s: -len(s.files))


def _orientation(ds, path: Path) -> tuple[np.ndarray, np.ndarray]:
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        return np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    iop = np.asarray([float(x) for x in iop])
    if iop.size != 6 or not np.isfinite(iop).all():
        raise MedsightError("ImageOrientationPatient is malformed", path)
    return iop[:3], iop[3:]


def _pixels(ds, path: Path) -> np.ndarray:
    try:
        px = ds.pixel_array
    except Exception as exc:
        raise MedsightError(f"pixel data cannot be decoded ({type(exc).__name__}: {exc})", path) from exc
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise MedsightError("multi-frame DICOM is not supported yet; export it as single-frame slices", path)
    return _rescale(px, float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))


def _rescale(px: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values -> modality values (HU...): integers stay integers when slope and intercept are
    integral (a CT kept as int16 is 2/3 the size of float32 and exact); otherwise float32."""
    if np.issubdtype(px.dtype, np.integer) and slope == round(slope) and intercept == round(intercept):
        if slope == 1 and intercept == 0:
            return px
        wide = np.int32 if abs(slope) * 2 ** (8 * px.itemsize) + abs(intercept) < 2**31 else np.int64
        return px.astype(wide) * int(slope) + int(intercept)
    px = px.astype(np.float32)
    return px * slope + intercept if (slope, intercept) != (1, 0) else px


def _stored_dtype(ds) -> np.dtype:
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if bits not in (8, 16, 32):
        return np.dtype(np.int16)
    return np.dtype(f"{'i' if int(ds.get('PixelRepresentation', 0) or 0) else 'u'}{bits // 8}")


def _compact(volume: np.ndarray, stored: np.dtype) -> np.ndarray:
    """The smallest integer type among the stored one, int16, uint16 and int32 that holds every
    value; float32 for non-integer values (slices may differ in rescale, so this is decided once)."""
    if not np.issubdtype(volume.dtype, np.integer):
        return volume.astype(np.float32, copy=False)
    low, high = (int(volume.min()), int(volume.max())) if volume.size else (0, 0)
    for dtype in dict.fromkeys(
        (np.dtype(stored), np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.int32))
    ):
        if np.issubdtype(dtype, np.integer) and np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return volume.astype(dtype, copy=False)
    return volume.astype(np.float64 if max(-low, high) > 2**24 else np.float32)


# A gap may differ from the series' spacing by 1% of it (plus 1 micrometre): ImagePositionPatient is
# decimal text rounded by the scanner, so exact equality fails on good series, while one missing
# slice doubles a gap (a 100% deviation). ITK only warns, above 1e-4 of the spacing; Slicer
# regularises above 1e-3 mm; both treat any larger deviation as non-uniform sampling.
GAP_TOLERANCE = 0.01


def check_even_spacing(gaps: np.ndarray, where: Path) -> None:
    """Refuse a series whose sorted slice positions are not evenly spaced, naming the first gap
    that is off: a volume built from it would place every slice after the gap wrongly."""
    gaps = np.abs(np.asarray(gaps, dtype=float))
    if gaps.size < 2:
        return
    spacing = float(np.median(gaps))
    off = np.abs(gaps - spacing) > GAP_TOLERANCE * spacing + 1e-3
    if not off.any():
        return
    i = int(np.argmax(off))
    ratio = gaps[i] / spacing
    if abs(ratio - round(ratio)) * spacing <= GAP_TOLERANCE * spacing + 1e-3 and round(ratio) >= 2:
        missing = int(round(ratio)) - 1
        what = "a slice is missing" if missing == 1 else f"{missing} slices are missing"
    else:
        what = "the slices are not evenly spaced"
    raise MedsightError(
        f"slices {i + 1} and {i + 2} (in position order) are {gaps[i]:.4g} mm apart, the series' spacing "
        f"is {spacing:.4g} mm: {what}; medsight reads evenly spaced series only",
        where,
    )


def _read_files(files: list[Path], where: Path) -> Scan:
    import pydicom

    datasets = []
    for f in progress.bar(files, len(files), "reading DICOM", unit="file"):
        try:
            datasets.append((f, pydicom.dcmread(str(f))))
        except Exception as exc:
            raise MedsightError(f"corrupt DICOM file ({type(exc).__name__}: {exc})", f) from exc
    row_dir, col_dir = _orientation(datasets[0][1], datasets[0][0])
    normal = np.cross(row_dir, col_dir)

    def position(item) -> np.ndarray:
        ipp = item[1].get("ImagePositionPatient")
        return np.asarray([float(x) for x in ipp]) if ipp is not None else None

    positions = [position(d) for d in datasets]
    if all(p is not None for p in positions):
        order = np.argsort([float(p @ normal) for p in positions])
    else:  # no geometry: fall back on InstanceNumber
        order = np.argsort([int(d.get("InstanceNumber", i)) for i, (_, d) in enumerate(datasets)])
    datasets = [datasets[i] for i in order]
    positions = [positions[i] for i in order]

    slices = []
    for f, ds in datasets:
        px = _pixels(ds, f)
        if px.ndim == 3:  # RGB (rows, cols, 3)
            raise MedsightError("colour DICOM series are not supported", f)
        if slices and px.shape[::-1] != slices[0].shape:
            raise MedsightError(f"slice size {px.shape} differs from the series' {slices[0].shape[::-1]}", f)
        slices.append(px.T)  # (rows, cols) -> (col, row): voxel axis i follows the row direction
    volume = _compact(np.stack(slices, axis=-1), _stored_dtype(datasets[0][1]))  # (cols, rows, slices)

    first = datasets[0][1]
    ps = first.get("PixelSpacing") or first.get("ImagerPixelSpacing") or [1.0, 1.0]
    row_spacing, col_spacing = float(ps[0]), float(ps[1])
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    meta: dict = {"format": "dicom"}
    if len(datasets) > 1 and positions[0] is not None:
        steps = np.diff(np.stack(positions), axis=0)
        gaps = steps @ normal
        if np.any(np.abs(gaps) < 1e-4):
            raise MedsightError(
                "two slices share one ImagePositionPatient (duplicate or mixed series)", where
            )
        check_even_spacing(gaps, where)
        affine[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
        meta["slice_gap_range_mm"] = [float(gaps.min()), float(gaps.max())]
        meta["uniform_slices"] = True
    else:
        thickness = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
        affine[:3, 2] = normal * thickness
    if positions[0] is not None:
        affine[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ affine
    for key in ("Modality", "SeriesDescription", "SeriesInstanceUID", "StudyInstanceUID", "PatientID"):
        if key in first:
            meta[key] = str(first.get(key))
    meta["n_files"] = len(datasets)
    return Scan(volume[None], affine, meta)


def read(path: Path, series: str | None = None) -> Scan:
    """A folder: the series with UID (or description) ``series``, or the only one there is.

    A single file: that one image, as a 2D scan when it is a lone slice.
    """
    if path.is_file():
        scan = _read_files([path], path)
        return Scan(scan.array[..., 0], scan.affine, scan.meta)
    found = list_series(path)
    if not found:
        raise MedsightError("no readable DICOM series in this folder", path)
    if series is not None:
        chosen = [s for s in found if series in (s.uid, s.description)]
        if not chosen:
            raise MedsightError(f"no series '{series}' here; found {', '.join(s.uid for s in found)}", path)
        found = chosen
    if len(found) > 1:
        listing = "; ".join(f"{s.uid} '{s.description}' ({len(s.files)} files)" for s in found)
        raise MedsightError(f"{len(found)} DICOM series here, choose one with --series UID: {listing}", path)
    return _read_files(found[0].files, path)
