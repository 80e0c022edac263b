"""Test-time augmentation: predict on transformed views of an input, map each prediction back, average.

One mechanism for every task. A view is a pair of functions on numpy arrays: one into the view, one
mapping a prediction on the view back onto the input's grid. The views here are symmetries of the
pixel grid (mirror images, 90-degree rotations), so mapping back is exact, with no interpolation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["View", "average_over_views", "dihedral_views", "mirror_views", "parse_axes"]

View = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def mirror_views(axes: Sequence[int]) -> list[View]:
    """Every combination of mirroring along ``axes`` (array axes), the identity first: 2**n views,
    nnU-Net's test-time mirroring."""
    views = []
    for bits in range(2 ** len(axes)):
        flipped = tuple(a for i, a in enumerate(axes) if bits >> i & 1)
        views.append((lambda a, f=flipped: np.flip(a, f), lambda a, f=flipped: np.flip(a, f)))
    return views


def dihedral_views(axes: tuple[int, int] = (-2, -1)) -> list[View]:
    """The four 90-degree rotations in the plane of ``axes``, each also mirrored along the second
    axis: the eight symmetries of a square pixel grid, the identity first."""
    views = []
    for turns in range(4):
        for mirror in (False, True):

            def into(a, k=turns, m=mirror):
                a = np.rot90(a, k, axes)
                return np.flip(a, axes[1]) if m else a

            def back(a, k=turns, m=mirror):
                return np.rot90(np.flip(a, axes[1]) if m else a, -k, axes)

            views.append((into, back))
    return views


def average_over_views(
    predict: Callable[[np.ndarray], np.ndarray], image: np.ndarray, views: Sequence[View]
) -> np.ndarray:
    """Mean over ``views`` of ``back(predict(into(image)))``; ``predict`` must keep the spatial axes
    the views act on where they were (e.g. (C, H, W) in, (K, H, W) out)."""
    total = None
    for into, back in views:
        prediction = back(predict(np.ascontiguousarray(into(image))))
        total = prediction.astype(np.float64) if total is None else total + prediction
    return (total / len(views)).astype(np.float32)


def parse_axes(text: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]`` (the empty string: no axes). Which axes are valid is the trainer's
    check (:func:`medsight.engine.train.train`), so the Python API and the command line agree."""
    try:
        return [int(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"axes are comma-separated integers such as 0 or 0,1, not {text!r}") from None
