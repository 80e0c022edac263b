"""Models-Genesis-style corruptions (Zhou et al., MedIA 2021) for the generic restoration pretext.

The network sees ``genesis_corrupt(image)`` and learns to give back ``image``. Images are 2D,
channel-first ``(C, H, W)``, with intensities already scaled to ``[0, 1]`` (the corruptions draw
noise and curve values in that range). Every function takes the caller's ``numpy`` Generator so a
seeded run is reproducible, and returns a new array.
"""

from __future__ import annotations

import numpy as np

__all__ = ["genesis_corrupt", "inpaint", "local_shuffle", "nonlinear_intensity", "outpaint"]


def nonlinear_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map intensities through a random monotonic cubic Bezier curve from (0, 0) to (1, 1), half the
    time inverted.

    Monotonic, so the ordering of tissues survives while their contrast changes: restoring it means
    knowing what the tissue is.
    """
    p1, p2 = rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)
    t = np.linspace(0, 1, 1001)
    bx = 3 * (1 - t) ** 2 * t * p1[0] + 3 * (1 - t) * t**2 * p2[0] + t**3
    by = 3 * (1 - t) ** 2 * t * p1[1] + 3 * (1 - t) * t**2 * p2[1] + t**3
    # sorting both coordinates makes the mapping monotonic even where the curve doubles back
    out = np.interp(np.clip(image, 0, 1), np.sort(bx), np.sort(by))
    if rng.random() < 0.5:
        out = 1.0 - out
    return out.astype(np.float32)


def local_shuffle(image: np.ndarray, rng: np.random.Generator, n_blocks: int = 100, max_frac: float = 0.1):
    """Shuffle the pixels inside ``n_blocks`` small random windows (each side up to ``max_frac`` of the image)."""
    out = np.array(image, dtype=np.float32, copy=True)
    _, h, w = out.shape
    for _ in range(n_blocks):
        bh = int(rng.integers(1, max(2, int(h * max_frac)) + 1))
        bw = int(rng.integers(1, max(2, int(w * max_frac)) + 1))
        r, c = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        block = out[:, r : r + bh, c : c + bw].reshape(out.shape[0], -1)
        out[:, r : r + bh, c : c + bw] = block[:, rng.permutation(block.shape[1])].reshape(-1, bh, bw)
    return out


def inpaint(image: np.ndarray, rng: np.random.Generator, n_boxes: int = 5) -> np.ndarray:
    """Replace up to ``n_boxes`` random boxes (each side 1/6 to 1/3 of the image) with uniform noise."""
    out = np.array(image, dtype=np.float32, copy=True)
    _, h, w = out.shape
    for _ in range(int(rng.integers(1, n_boxes + 1))):
        bh, bw = (
            int(rng.integers(max(1, h // 6), max(2, h // 3) + 1)),
            int(rng.integers(max(1, w // 6), max(2, w // 3) + 1)),
        )
        r, c = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        out[:, r : r + bh, c : c + bw] = rng.uniform(0, 1, (out.shape[0], bh, bw))
    return out


def outpaint(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep one random central box (each side 1/2 to 7/8 of the image) and fill the rest with noise."""
    out = rng.uniform(0, 1, image.shape).astype(np.float32)
    _, h, w = image.shape
    bh, bw = (
        int(rng.integers(h // 2, max(h // 2 + 1, 7 * h // 8) + 1)),
        int(rng.integers(w // 2, max(w // 2 + 1, 7 * w // 8) + 1)),
    )
    bh, bw = min(bh, h), min(bw, w)
    r, c = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    out[:, r : r + bh, c : c + bw] = image[:, r : r + bh, c : c + bw]
    return out


def genesis_corrupt(
    image: np.ndarray,
    rng: np.random.Generator,
    p_nonlinear: float = 0.9,
    p_shuffle: float = 0.5,
    p_paint: float = 0.9,
    p_inpaint: float = 0.2,
) -> np.ndarray:
    """The Models-Genesis chain: non-linear intensity, local shuffling, then in- or out-painting.

    Defaults follow the Models Genesis paper: painting 90 % of the time, in-painting 20 % of those
    and out-painting the rest.
    """
    out = np.asarray(image, dtype=np.float32)
    if out.ndim != 3:
        raise ValueError(f"genesis_corrupt expects (C, H, W), got shape {out.shape}")
    if rng.random() < p_nonlinear:
        out = nonlinear_intensity(out, rng)
    if rng.random() < p_shuffle:
        out = local_shuffle(out, rng)
    if rng.random() < p_paint:
        out = inpaint(out, rng) if rng.random() < p_inpaint else outpaint(out, rng)
    return out
