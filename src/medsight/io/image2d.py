"""2D pictures (PNG, JPEG, BMP, GIF through Pillow; TIFF through tifffile, with imagecodecs for
LZW/deflate/JPEG-compressed TIFF such as DRIVE's; 16-bit colour PNG through pypng).

The array is (C, rows, cols): grey gives one channel, RGB three (an opaque alpha channel is
dropped). Palette images keep their indices, because label maps are often stored that way; a GIF
whose palette is all greys is a grey picture stored the only way GIF can (DRIVE's 0/255 masks) and
gives those greys. Pillow turns 16-bit colour PNG into 8 bits (55255 -> 215), so those are read and written
with pypng, which keeps every bit. Pixel spacing is 1 unless a TIFF says otherwise.
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


# PNG colour types (IHDR byte 25) that Pillow reduces to 8 bits when they hold 16-bit samples
_PNG_COLOUR_WITH_16_BIT_LOSS = (2, 4, 6)  # RGB, grey + alpha, RGBA


def _is_16_bit_colour_png(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(26)
    is_png = head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return is_png and len(head) == 26 and head[24] == 16 and head[25] in _PNG_COLOUR_WITH_16_BIT_LOSS


def _read_png_16(path: Path) -> np.ndarray:
    import png

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    arr = np.vstack([np.asarray(row, np.uint16) for row in rows]).reshape(height, width, planes)
    if planes == 2:  # grey + alpha: keep the grey when the alpha is opaque everywhere
        if arr[..., 1].min() != arr[..., 1].max():
            raise MedsightError("grey+alpha image with real transparency; flatten it first", path)
        return arr[..., 0]
    return arr


def _write_png_16(arr: np.ndarray, path: Path) -> None:
    import png

    rows, cols, planes = arr.shape
    writer = png.Writer(cols, rows, greyscale=False, alpha=planes == 4, bitdepth=16)
    with open(path, "wb") as handle:
        writer.write(handle, arr.reshape(rows, cols * planes).astype(np.uint16))


def _grey_palette(img) -> bool:
    """GIF has no grey mode, so a grey picture (DRIVE's 0/255 masks) is stored as a palette of greys:
    its grey values, not the palette indices, are what was drawn."""
    if img.mode != "P":
        return False
    palette = np.asarray(img.getpalette() or [], np.uint8).reshape(-1, 3)
    used = np.unique(np.asarray(img))
    used = used[used < len(palette)]
    return bool(len(used)) and bool(np.all(palette[used] == palette[used, :1]))


def read(path: Path) -> Scan:
    if suffix_of(path) in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(str(path))
    elif suffix_of(path) == ".png" and _is_16_bit_colour_png(path):
        arr = _read_png_16(path)
    else:
        from PIL import Image

        with Image.open(path) as img:
            img.load()  # forces decoding now: a truncated file fails here, not later
            if img.mode in ("1", "LA") or (img.format == "GIF" and _grey_palette(img)):
                img = img.convert("L")
            arr = np.asarray(img)
    return Scan(_to_channels_first(arr, path), np.eye(4), {"format": "image"})


def write(scan: Scan, path: Path) -> None:
    if suffix_of(path) == ".gif":  # GIF stores a re-ordered palette, so label values would not survive
        raise MedsightError("medsight reads GIF but does not write it; write .png", path)
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
    if arr.ndim == 3 and arr.dtype == np.uint16:
        if suffix_of(path) != ".png":
            raise MedsightError("16-bit colour pictures can be written as .png or .tif only", path)
        _write_png_16(arr, path)
        return
    from PIL import Image

    Image.fromarray(arr).save(path)
