"""2D pictures (PNG, JPEG, BMP through Pillow; TIFF through tifffile).

The array is (C, rows, cols): grey gives one channel, RGB three (an opaque alpha channel is
dropped). Palette images keep their indices, because label maps are often stored that way.
Pixel spacing is 1 unless a TIFF says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsight.errors import MedsightError
from medsight.io.registry import suffix_of
from medsight.scan import Scan


def _to_channels_first(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if arr.shape[-1] == 4:
            alpha = arr[..., 3]
            if alpha.min() != alpha.max():
                raise MedsightError("RGBA image with real transparency; flatten it first", path)
            arr = arr[..., :3]
        return np.moveaxis(arr, -1, 0)
    raise MedsightError(f"unsupported picture shape {arr.shape}", path)


def read(path: Path) -> Scan:
    if suffix_of(path) in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(str(path))
    else:
        from PIL import Image

        with Image.open(path) as img:
            img.load()  # forces decoding now: a truncated file fails here, not later
            if img.mode in ("1", "LA"):
                img = img.convert("L")
            arr = np.asarray(img)
    return Scan(_to_channels_first(arr, path), np.eye(4), {"format": "image"})


def write(scan: Scan, path: Path) -> None:
    if scan.ndim != 2:
        raise MedsightError("only 2D scans can be written as a picture; use .nii.gz for volumes", path)
    arr = scan.array
    if arr.shape[0] not in (1, 3):
        raise MedsightError(f"{arr.shape[0]} channels cannot be written as a picture", path)
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    if suffix_of(path) in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(str(path), arr)
        return
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype not in (np.uint8, np.uint16) and not np.issubdtype(arr.dtype, np.integer):
        raise MedsightError(f"{arr.dtype} pixels cannot be stored losslessly here; use .tif or .nii.gz", path)
    if arr.min() < 0 or arr.max() > 65535:
        raise MedsightError("pixel values outside 0..65535 cannot be stored in a picture", path)
    arr = arr.astype(np.uint8 if arr.max() <= 255 else np.uint16)
    from PIL import Image

    Image.fromarray(arr).save(path)
