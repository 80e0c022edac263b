"""One reader (and optionally one writer) per format, chosen by file suffix.

A reader takes a path and returns a Scan; a writer takes a Scan and a path. Modules are imported
on first use so that importing medsight.io stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from medsight.errors import MedsightError
from medsight.io.atomic import atomic_path
from medsight.scan import Scan


@dataclass(frozen=True)
class Format:
    name: str
    suffixes: tuple[str, ...]
    module: str  # medsight.io.<module> defines read(path) and, if writable, write(scan, path)
    writable: bool

    def impl(self):
        return importlib.import_module(f"medsight.io.{self.module}")


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("nifti", (".nii", ".nii.gz"), "nifti", True),
        Format("dicom", (".dcm",), "dicom", False),  # a folder is read as DICOM too
        Format("nrrd", (".nrrd", ".nhdr"), "nrrd", True),
        Format("image", (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"), "image2d", True),
        Format("numpy", (".npy", ".npz"), "numpy_io", True),
    )
}


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
