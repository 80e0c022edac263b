"""NIfTI-1/2 through nibabel. NIfTI stores (X, Y, Z[, C]); Scan is channel-first.

The header's units (xyzt_units) travel in ``meta["nifti_xyzt_units"]`` so that reading then writing
keeps them; a scan from elsewhere is written in mm, the unit of every medsight affine. Voxels are
written in the array's own dtype (an int16 CT stays int16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsight.errors import MedsightError
from medsight.scan import Scan


def read(path: Path) -> Scan:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)  # applies scl_slope/inter, forces the full (truncation-revealing) read
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    elif data.ndim == 5 and data.shape[3] == 1:  # (X, Y, Z, 1, C) vector images
        data = np.moveaxis(data[:, :, :, 0], -1, 0)
    else:
        raise MedsightError(f"unsupported NIfTI shape {data.shape}", path)
    zooms = img.header.get_zooms()
    meta = {
        "format": "nifti",
        "header_zooms": [float(z) for z in zooms],
        "nifti_xyzt_units": int(img.header["xyzt_units"]),
    }
    return Scan(data, img.affine, meta=meta)


def write(scan: Scan, path: Path) -> None:
    import nibabel as nib

    arr = scan.array
    data = arr[0] if scan.channels == 1 else np.moveaxis(arr, 0, -1)
    if scan.ndim == 2:  # NIfTI is 3D at least: a 2D image becomes one slice
        data = data[:, :, None] if scan.channels == 1 else data[:, :, None, :]
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if data.dtype == np.int64:
        data = data.astype(np.int32)
    img = nib.Nifti1Image(data, scan.affine)
    img.set_qform(scan.affine, code=1)
    img.set_sform(scan.affine, code=1)
    units = scan.meta.get("nifti_xyzt_units")
    if units is None:
        img.header.set_xyzt_units(xyz="mm")
    else:
        img.header["xyzt_units"] = int(units)
    nib.save(img, str(path))
