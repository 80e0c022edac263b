"""Progress bars for long single-item work (reading a large DICOM series, segmenting one big scan).

A bar appears on stderr only when the work is long (more than ``LONG_WORK`` steps) and stderr is a
terminal, so logs, pipes and tests stay clean; ``MEDSIGHT_PROGRESS=0`` turns bars off everywhere
(what a ``--quiet`` option sets).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

LONG_WORK = 50  # files, slices or windows


def wanted(steps: int) -> bool:
    """Whether work of ``steps`` steps should show a bar now."""
    return steps > LONG_WORK and os.environ.get("MEDSIGHT_PROGRESS", "1") != "0" and sys.stderr.isatty()


def bar(items: Iterable, steps: int, description: str, unit: str = "it") -> Iterable:
    """``items`` wrapped in a tqdm bar when :func:`wanted`, else ``items`` unchanged."""
    if not wanted(steps):
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit=unit, leave=False, file=sys.stderr)
