"""Write-then-rename, so an interrupted run never leaves a half-written output."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medsight.errors import MedsightError


def check_writable(path: str | Path, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise MedsightError(
            "already exists; pass --overwrite (or overwrite=True in Python) to replace it", path
        )
    return path


def check_run_folder(path: str | Path) -> Path:
    """A training run writes a folder; refuse a path that is an existing file before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MedsightError("is a file; the run needs a folder", path)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``.

    The temporary name keeps the full suffix (``.nii.gz`` ...) so writers that pick the format
    from the name still work. On any error the temporary file is removed and ``path`` is untouched.
    """
    path = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp makes the file private (0600); the output should get the usual umask permissions
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
