"""Slices of a scan for 2D networks that read volumes slice by slice (the few-shot models), and the
chunk protocol that pairs query slices with support slices (Roy et al. 2020, SSL-ALPNet).

Preprocessing, identical at training and inference: each scan is normalised per channel over the
whole scan (clip to its 0.5-99.5 percentiles, then z-score: ``Preprocessing.normalise``), cut into
slices along ``slice_axis`` and each slice resized to the working size (bilinear).
"""

from __future__ import annotations

import math

import numpy as np

NORMALISATION = {"name": "percentile-zscore", "clip_percentiles": [0.5, 99.5], "per": "scan and channel"}


def normalise_intensity(array: np.ndarray) -> np.ndarray:
    """Per channel, over the whole scan: clip to the 0.5-99.5 percentiles, then z-score."""
    from medsight.engine.preprocess import Preprocessing

    return Preprocessing(target_spacing=None).normalise(array)


def to_slices(array: np.ndarray, slice_axis: int) -> np.ndarray:
    """``(C, X, Y[, Z])`` -> ``(S, C, H, W)``: a 2D image is one slice; a volume is cut along ``slice_axis``."""
    if array.ndim == 3:
        return array[None]
    return np.moveaxis(array, 1 + slice_axis, 0)


def from_slices(slices: np.ndarray, slice_axis: int, ndim: int) -> np.ndarray:
    """Inverse of :func:`to_slices` for ``(S, H, W)`` masks -> spatial ``(X, Y[, Z])``."""
    return slices[0] if ndim == 2 else np.moveaxis(slices, 0, slice_axis)


def resize(batch: np.ndarray, size: tuple[int, int]):
    """``(N, C, H, W)`` float array -> torch tensor ``(N, C, *size)`` (bilinear, antialiased when shrinking)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


# -- chunk protocol ------------------------------------------------------------------------------
def chunk_centres(lo: int, hi: int, chunks: int) -> list[int]:
    """Centre slice of each of ``chunks`` equal chunks of ``lo..hi`` (inclusive)."""
    n = hi - lo + 1
    return [lo + (2 * c + 1) * n // (2 * chunks) for c in range(chunks)]


def chunk_of(index: int, lo: int, hi: int, chunks: int) -> int:
    """Which chunk of ``lo..hi`` slice ``index`` falls in."""
    return (index - lo) * chunks // (hi - lo + 1)


def matching_range(support_range: tuple[int, int], support_slices: int, query_slices: int) -> tuple[int, int]:
    """The query slices at the same fraction of the slice axis as ``support_range`` of the support's."""
    lo = math.floor(support_range[0] / support_slices * query_slices)
    hi = math.ceil((support_range[1] + 1) / support_slices * query_slices) - 1
    return max(0, lo), min(query_slices - 1, max(hi, lo))


def chunk_plan(
    support_range: tuple[int, int], query_range: tuple[int, int], chunks: int = 3
) -> dict[int, int]:
    """Query slice -> support slice for one support volume under the chunk protocol."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    centres = chunk_centres(*support_range, chunks)
    q0, q1 = query_range
    return {q: centres[chunk_of(q, q0, q1, chunks)] for q in range(q0, q1 + 1)}
