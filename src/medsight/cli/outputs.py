"""Where the segmenting commands write: one output per input, all named and checked before any work."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medsight.errors import MedsightError


def output_paths(
    inputs: list[Path], out: Path, name_of: Callable[[Path], str], overwrite: bool
) -> list[Path]:
    """``out / name_of(input)`` for each input, refused up front if any exists (without
    ``overwrite``) rather than after the first inputs were segmented.

    Inputs that share a name, as in BraTS-style datasets (one folder per case, each holding
    ``flair.nii.gz``), are told apart by their folder's name; should that collide too, the second
    input is refused instead of silently replacing the first one's output.
    """
    from medsight.io import check_writable

    names = [name_of(p) for p in inputs]
    repeated = {n for n in names if names.count(n) > 1}
    names = [f"{p.parent.name}_{n}" if n in repeated else n for p, n in zip(inputs, names, strict=True)]
    first: dict[str, Path] = {}
    for path, name in zip(inputs, names, strict=True):
        if name in first:
            raise MedsightError(f"its output {name} would replace that of {first[name]}", path)
        first[name] = path
    return [check_writable(out / name, overwrite) for name in names]
