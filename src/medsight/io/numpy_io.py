"""NumPy arrays. ``.npy`` holds only voxels (2D/3D spatial, or 4D channel-first) with unit spacing;
``.npz`` may also carry ``affine`` (4x4) next to ``array``, and keeps geometry through a round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsight.errors import MedsightError
from medsight.io.registry import suffix_of
from medsight.scan import Scan


def read(path: Path) -> Scan:
    affine = np.eye(4)
    if suffix_of(path) == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "array" not in z:
                raise MedsightError(f"an .npz scan needs an 'array' entry; found {list(z.keys())}", path)
            arr = z["array"]
            if "affine" in z:
                affine = z["affine"]
            channel_first = bool(z["channel_first"]) if "channel_first" in z else arr.ndim == 4
    else:
        arr = np.load(path, allow_pickle=False)
        channel_first = arr.ndim == 4
    if not channel_first:
        arr = arr[None]
    if arr.ndim not in (3, 4):
        raise MedsightError(f"array of shape {arr.shape} is not a 2D or 3D image", path)
    return Scan(arr, affine, {"format": "numpy"})


def write(scan: Scan, path: Path) -> None:
    if suffix_of(path) == ".npz":
        with open(path, "wb") as fh:
            np.savez_compressed(fh, array=scan.array, affine=scan.affine, channel_first=True)
    else:
        if scan.channels > 1 and scan.ndim == 2:
            raise MedsightError("a multi-channel 2D image is ambiguous in .npy; write .npz", path)
        with open(path, "wb") as fh:
            np.save(fh, scan.array[0] if scan.channels == 1 else scan.array)
