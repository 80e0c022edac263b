"""The one exception type a user sees: it names the file and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class MedsightError(Exception):
    """Bad input a person can act on. The CLI prints ``str(err)`` on one line and exits 2."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.message = " ".join(str(message).split())  # one line, always
        super().__init__(f"{self.path}: {self.message}" if self.path else self.message)
