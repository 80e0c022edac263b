"""Write-then-rename, so an interrupted run never leaves a half-written output.

Temporaries are hidden siblings named ``.<name>.medsight-tmp-<pid>-<random><suffix>``: the pid
says who wrote them, so the next write into the folder removes those whose writer is gone (a
killed ``convert`` or ``predict``), and never a live run's. Every operating-system error on the
way (read-only folder or filesystem, disk full, a path under a file) becomes one MedsightError
naming the path.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from medsight.errors import MedsightError

TEMP_MARK = ".medsight-tmp-"
_TEMP = re.compile(r"^\..*\.medsight-tmp-(\d+)-[0-9a-f]+(\..*)?$")
_swept: set[Path] = set()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a pid of another user's process counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete our temporaries in ``folder`` whose writing process no longer runs; returns them."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed


def _existing_ancestor(path: Path) -> Path:
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_folder_writable(folder: str | Path, shown: str | Path | None = None) -> Path:
    """Refuse, before any work, a folder that cannot be created or written: a path under a file, a
    read-only folder or filesystem. ``shown``: the path to name in the message (default: ``folder``)."""
    folder = Path(folder)
    shown = Path(shown) if shown is not None else folder
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise MedsightError(f"cannot be written: {base} is a file, not a folder", shown)
    if not os.access(base, os.W_OK | os.X_OK):
        what = "folder" if base == folder.absolute() else f"folder {base}"
        raise MedsightError(f"cannot be written: the {what} is read-only (no write permission)", shown)
    return folder


def check_writable(path: str | Path, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise MedsightError(
            "already exists; pass --overwrite (or overwrite=True in Python) to replace it", path
        )
    check_folder_writable(path.parent, path)
    return path


def check_run_folder(path: str | Path) -> Path:
    """A training run writes a folder; refuse a path that is an existing file before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MedsightError("is a file; the run needs a folder", path)
    return check_folder_writable(path)


def write_error(path: Path, exc: OSError) -> MedsightError:
    """One line for an operating-system error while writing ``path``."""
    reason = exc.strerror or type(exc).__name__
    return MedsightError(f"cannot be written ({reason}); nothing was left half-written", path)


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``.

    The temporary name keeps the full suffix (``.nii.gz`` ...) so writers that pick the format
    from the name still work. On any error the temporary file is removed and ``path`` is untouched.
    """
    path = check_writable(path, overwrite)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix or '.tmp'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.absolute() not in _swept:  # once per folder and process: folders can be large
            _swept.add(path.parent.absolute())
            remove_stale_temporaries(path.parent)
        yield tmp
        # the output gets the usual umask permissions
        umask = os.umask(0)
        os.umask(umask)
        if tmp.exists():
            tmp.chmod(0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
