"""One reader (and optionally one writer) per format, chosen by file suffix from one table
(``FORMATS``); :func:`register` adds a format.

The contract (:class:`Reader`, :class:`Writer`): a reader takes a path (and format options such as
``series=``) and returns a :class:`~medsight.scan.Scan`, channel-first with its 4x4 RAS affine; bad
input raises :class:`~medsight.errors.MedsightError` (any other exception is turned into one, naming
the file); :func:`read` sets ``scan.path``. A writer takes a Scan and the exact path to write (a
temporary sibling that :func:`write` renames into place, so a failed write leaves nothing behind).
Built-in formats name a module ``medsight.io.<module>`` defining ``read`` and ``write``, imported on
first use so that importing medsight.io stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Protocol

from medsight.errors import MedsightError
from medsight.io.atomic import atomic_path
from medsight.scan import Scan


class Reader(Protocol):
    def __call__(self, path: Path, **options) -> Scan: ...


class Writer(Protocol):
    def __call__(self, scan: Scan, path: Path) -> None: ...


@dataclass(frozen=True)
class Format:
    name: str
    suffixes: tuple[str, ...]
    module: str  # medsight.io.<module> defines read(path) and, if writable, write(scan, path)
    writable: bool
    reader: Callable | None = None  # a registered format's own functions, instead of a module
    writer: Callable | None = None

    def impl(self):
        if self.reader is not None:
            return SimpleNamespace(read=self.reader, write=self.writer)
        return importlib.import_module(f"medsight.io.{self.module}")


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("nifti", (".nii", ".nii.gz"), "nifti", True),
        Format("dicom", (".dcm",), "dicom", False),  # a folder is read as DICOM too
        Format("nrrd", (".nrrd", ".nhdr"), "nrrd", True),
        Format("image", (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".gif"), "image2d", True),
        Format("metaimage", (".mha",), "metaimage", True),
        # a .mhd header names a separate data file, which a write-then-rename would orphan: read only
        Format("metaimage-header", (".mhd",), "metaimage", False),
        Format("numpy", (".npy", ".npz"), "numpy_io", True),
    )
}


def register(
    suffixes: tuple[str, ...] | list[str], reader: Reader, writer: Writer | None = None, name: str = ""
):
    """Add a format read by ``reader`` (and written by ``writer``) for files with these suffixes
    (lower case, with the dot: ``(".mha",)``). A suffix another format already reads is refused."""
    suffixes = tuple(s.lower() for s in suffixes)
    taken = {s: f.name for f in FORMATS.values() for s in f.suffixes}
    clash = [f"{s} ({taken[s]})" for s in suffixes if s in taken]
    if clash or not suffixes or not all(s.startswith(".") for s in suffixes):
        raise ValueError(f"suffixes must be new and start with a dot; taken: {', '.join(clash) or '-'}")
    fmt = Format(name or suffixes[0].lstrip("."), suffixes, "", writer is not None, reader, writer)
    FORMATS[fmt.name] = fmt
    return fmt


def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def case_name(path: str | Path) -> str:
    """A file's name without its image suffix, or a folder's (a DICOM series) whole name.

    Only suffixes medsight reads are stripped, so dots inside a name survive: DICOM UIDs
    (``1.3.6.1...0001.nii.gz``) and BIDS entities (``sub-01_ses-1.5T.nii.gz``). The one place that
    turns an input into a case id or an output name, so predict, evaluate and the layouts agree.
    """
    name = Path(path).name
    suffix = suffix_of(name)
    known = {s for fmt in FORMATS.values() for s in fmt.suffixes}
    return name[: -len(suffix)] if suffix in known and len(name) > len(suffix) else name


def format_of(path: str | Path) -> Format:
    path = Path(path)
    if path.is_dir():
        return FORMATS["dicom"]
    suffix = suffix_of(path)
    for fmt in FORMATS.values():
        if suffix in fmt.suffixes:
            return fmt
    known = ", ".join(s for f in FORMATS.values() for s in f.suffixes)
    raise MedsightError(
        f"unsupported format '{suffix or '(no suffix)'}'; medsight reads {known} and DICOM folders", path
    )


def read(path: str | Path, **options) -> Scan:
    """Read any supported scan; ``options`` go to the format's reader (e.g. ``series=`` for DICOM)."""
    path = Path(path)
    if not path.exists():
        raise MedsightError("no such file or folder", path)
    fmt = format_of(path)
    try:
        scan = fmt.impl().read(path, **options)
    except MedsightError:
        raise
    except Exception as exc:  # a library's own error on a corrupt file: say which file, in one line
        raise MedsightError(f"cannot read as {fmt.name}: {type(exc).__name__}: {exc}", path) from exc
    scan.path = path
    scan.meta.setdefault("format", fmt.name)
    return scan


def write(scan: Scan, path: str | Path, overwrite: bool = False) -> Path:
    """Write atomically; refuses to replace an existing file unless ``overwrite``."""
    path = Path(path)
    fmt = format_of(path) if not path.is_dir() else None
    if fmt is None or not fmt.writable:
        raise MedsightError("cannot write this format; write .nii.gz, .nrrd, .png/.tif or .npy/.npz", path)
    with atomic_path(path, overwrite) as tmp:
        try:
            fmt.impl().write(scan, tmp)
        except MedsightError as err:
            if err.path != tmp:
                raise
            # the writer only knows the hidden temporary name; the user gave ``path``
            raise MedsightError(err.message, path) from err
    return path
