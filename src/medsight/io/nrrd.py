"""NRRD through pynrrd: 'space directions' and 'space origin' give the affine."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsight.errors import MedsightError
from medsight.scan import Scan

_TO_RAS = {  # NRRD spaces -> sign flips that bring them to RAS
    "right-anterior-superior": [1, 1, 1],
    "RAS": [1, 1, 1],
    "left-posterior-superior": [-1, -1, 1],
    "LPS": [-1, -1, 1],
    "left-anterior-superior": [-1, 1, 1],
    "LAS": [-1, 1, 1],
}


def read(path: Path) -> Scan:
    import nrrd

    data, header = nrrd.read(str(path))  # Fortran order: data[i, j, k] matches 'space directions'
    space = header.get("space", "right-anterior-superior")
    flips = np.asarray(_TO_RAS.get(space, [1, 1, 1]), dtype=float)
    dirs = header.get("space directions")
    kinds = header.get("kinds", [])
    channel_axis = None
    if dirs is not None:
        rows = []
        for axis, d in enumerate(dirs):
            if d is None or (np.ndim(d) == 1 and np.isnan(np.asarray(d, float)).all()):
                channel_axis = axis  # 'none' direction: a list/vector axis
            else:
                rows.append(np.asarray(d, float))
        directions = np.stack(rows, axis=1) if rows else np.eye(3)
    else:
        spacings = header.get("spacings", [1.0] * data.ndim)
        directions = np.diag(np.asarray(spacings, float)[:3])
    if channel_axis is None and kinds and any(k in ("vector", "list", "RGB-color") for k in kinds):
        channel_axis = next(i for i, k in enumerate(kinds) if k in ("vector", "list", "RGB-color"))
    data = np.moveaxis(data, channel_axis, 0) if channel_axis is not None else data[None]
    nd = data.ndim - 1
    if nd not in (2, 3):
        raise MedsightError(f"unsupported NRRD dimension {nd}", path)
    affine = np.eye(4)
    affine[: directions.shape[0], :nd] = directions[:, :nd]
    origin = header.get("space origin")
    if origin is not None:
        affine[: len(origin), 3] = np.asarray(origin, float)
    affine[:3] *= flips[:, None]
    return Scan(data, affine, {"format": "nrrd", "nrrd_space": space})


def write(scan: Scan, path: Path) -> None:
    import nrrd

    nd = scan.ndim
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ scan.affine
    header = {
        "space": "left-posterior-superior",
        "space origin": lps[:3, 3],
    }
    data = scan.array
    if scan.channels == 1:
        data = data[0]
        header["space directions"] = lps[:3, :nd].T
        header["kinds"] = ["domain"] * nd
    else:
        header["space directions"] = np.vstack([np.full(3, np.nan), lps[:3, :nd].T])
        header["kinds"] = ["vector"] + ["domain"] * nd
    if data.dtype == bool:
        data = data.astype(np.uint8)
    nrrd.write(str(path), np.ascontiguousarray(data), header, index_order="F")
