"""MetaImage (.mha, or a .mhd header with its data file) through SimpleITK.

ITK keeps geometry in LPS: a point is origin + direction @ (spacing * index), index (x, y[, z]).
medsight's voxel axes are ITK's index axes (as for DICOM: column, row, slice), so the array is
SimpleITK's (z, y, x) transposed, and the affine is flipped to RAS+ on reading and back on writing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medsight.errors import MedsightError
from medsight.scan import Scan

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """MetaIO prints its complaints about a broken file straight to the C stderr; the exception that
    follows says the same, and medsight reports it in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def read(path: Path) -> Scan:
    import SimpleITK as sitk

    try:
        with _quiet_stderr():
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:  # ITK's message leads with its own source file and line: keep the reason
        lines = [line for line in str(exc).splitlines() if "ERROR" in line] or [str(exc)]
        reason = lines[0].split("ERROR:")[-1].split("): ")[-1].strip()
        raise MedsightError(f"cannot read as MetaImage: {reason}", path) from exc
    nd = image.GetDimension()
    if nd not in (2, 3):
        raise MedsightError(f"unsupported MetaImage dimension {nd}; medsight reads 2D and 3D images", path)
    arr = sitk.GetArrayFromImage(image)  # (z, y, x[, C]) or (y, x[, C])
    arr = np.moveaxis(arr, -1, 0) if image.GetNumberOfComponentsPerPixel() > 1 else arr[None]
    arr = np.ascontiguousarray(np.moveaxis(arr, range(1, nd + 1), range(nd, 0, -1)))  # -> (C, x, y[, z])
    direction = np.asarray(image.GetDirection(), float).reshape(nd, nd)
    lps = np.eye(4)
    lps[:nd, :nd] = direction * np.asarray(image.GetSpacing(), float)[None, :]
    lps[:nd, 3] = image.GetOrigin()
    return Scan(arr, LPS_TO_RAS @ lps, {"format": "metaimage"})


def write(scan: Scan, path: Path) -> None:
    import SimpleITK as sitk

    nd = scan.ndim
    arr = scan.array
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    # back to SimpleITK's (z, y, x[, C]) order
    spatial = np.moveaxis(arr, range(1, nd + 1), range(nd, 0, -1))
    vector = scan.channels > 1
    data = np.moveaxis(spatial, 0, -1) if vector else spatial[0]
    image = sitk.GetImageFromArray(np.ascontiguousarray(data), isVector=vector)
    lps = LPS_TO_RAS @ scan.affine
    if nd == 2 and not np.allclose(lps[2, :2], 0):
        raise MedsightError(
            "a 2D scan whose plane is tilted out of x-y cannot be stored as 2D MetaImage", path
        )
    columns = lps[:nd, :nd]
    spacing = np.linalg.norm(lps[:3, :nd], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (columns / spacing[None, :]).ravel()])
    image.SetOrigin([float(v) for v in lps[:nd, 3]])
    sitk.WriteImage(image, str(path), useCompression=True)
