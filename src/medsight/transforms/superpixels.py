"""Superpixel pseudo-labels and the self-supervised few-shot episodes built from them (SSL-ALPNet).

No manual label is read. A slice is over-segmented with Felzenszwalb's graph method
(``skimage.segmentation.felzenszwalb``); superpixels that lie mostly in background/air or that are
too small or too large are dropped. An episode takes one superpixel (sometimes merged with an
adjacent one) as the support mask on the slice, and a randomly warped (rotation, scale,
translation, mild elastic) and re-contrasted (gamma, contrast, noise) copy of the same slice, with
the mask warped alongside, as the query. The network learns to find "the same stuff" again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def body_mask(volume: np.ndarray, air_fraction: float = 0.1, flat_share: float = 0.05) -> np.ndarray:
    """Voxels that are not background/air, for a raw ``(C, *spatial)`` array (first channel is used).

    Background is either a flat fill value around skull-stripped or already z-scored scans (BraTS
    stores 0 outside the brain, brighter than part of the brain): the most common border value,
    when at least ``flat_share`` of all voxels hold exactly it; or else dark air, below
    ``min + air_fraction * (p99.5 - min)``.
    """
    x = np.asarray(volume[0], dtype=np.float32)
    border = np.concatenate([np.moveaxis(x, a, 0)[[0, -1]].ravel() for a in range(x.ndim)])
    values, counts = np.unique(border, return_counts=True)
    flat = x == values[np.argmax(counts)]
    if flat.mean() >= flat_share:
        return ~flat
    low, high = float(x.min()), float(np.percentile(x, 99.5))
    return x > low + air_fraction * (high - low)


def superpixels(
    image: np.ndarray,
    body: np.ndarray | None = None,
    scale: float = 100.0,
    sigma: float = 0.8,
    min_size: int = 20,
    max_fraction: float = 0.4,
) -> np.ndarray:
    """Felzenszwalb superpixels of one normalised slice ``(C, H, W)`` or ``(H, W)``, as int32 labels.

    0 marks pixels that belong to no usable superpixel: more than half in background (``~body``),
    fewer than ``min_size`` pixels, or more than ``max_fraction`` of the slice. The others are
    numbered 1..n. The slice is rescaled to [0, 1] (1st-99th percentile) first, so ``scale`` means
    the same for any normalisation.
    """
    from skimage.segmentation import felzenszwalb, relabel_sequential

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[None]
    low, high = np.percentile(image, [1, 99])
    unit = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    channel_axis = -1 if unit.shape[0] > 1 else None
    pixels = np.moveaxis(unit, 0, -1) if channel_axis is not None else unit[0]
    labels = felzenszwalb(pixels, scale=scale, sigma=sigma, min_size=min_size, channel_axis=channel_axis) + 1
    sizes = np.bincount(labels.ravel())
    keep = (sizes >= min_size) & (sizes <= max_fraction * labels.size)
    if body is not None:
        inside = np.bincount(
            labels.ravel(), weights=np.asarray(body, dtype=float).ravel(), minlength=len(sizes)
        )
        keep &= inside > 0.5 * sizes
    keep[0] = False
    labels = np.where(keep[labels], labels, 0)
    return relabel_sequential(labels)[0].astype(np.int32)


@dataclass(frozen=True)
class Episode:
    """One self-supervised episode: support ``(C, H, W)`` + mask ``(H, W)``, query the same."""

    support_image: np.ndarray
    support_mask: np.ndarray
    query_image: np.ndarray
    query_mask: np.ndarray
    slice_index: int


@dataclass
class QueryTransform:
    """Strength of the random query transform (SSL-ALPNet found it matters: too weak teaches
    nothing, too strong breaks the correspondence). Geometric ranges: rotation in degrees, scale
    factor, translation as a fraction of the image half-width, a left-right flip, elastic
    displacement (same unit) on a 4x4 control grid. Large shifts and flips matter: with the
    query where the support was, a network learns "same place" instead of "same tissue". Photometric: gamma on the [0, 1]-rescaled slice, contrast factor about
    the mean, additive Gaussian noise in normalised intensity units."""

    rotation_deg: float = 25.0
    scale: tuple[float, float] = (0.8, 1.25)
    translate: float = 0.35
    flip_probability: float = 0.5
    elastic: float = 0.03
    gamma: tuple[float, float] = (0.6, 1.6)
    contrast: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.08


@dataclass
class EpisodeSampler:
    """Episodes from normalised slices ``(N, C, H, W)`` and their body masks ``(N, H, W)``.

    Invariants (tested): both masks are non-empty and the query image differs from the support.
    Superpixels are computed once per slice and cached; slices without a usable superpixel are
    skipped.
    """

    slices: np.ndarray
    bodies: np.ndarray
    rng: np.random.Generator
    scale: float = 100.0
    sigma: float = 0.8
    min_size: int = 20
    max_fraction: float = 0.4
    merge_probability: float = 0.3
    transform: QueryTransform = field(default_factory=QueryTransform)
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.slices) == 0:
            raise ValueError("EpisodeSampler needs at least one slice")
        if self.bodies.shape != (self.slices.shape[0], *self.slices.shape[2:]):
            raise ValueError(f"bodies {self.bodies.shape} do not match slices {self.slices.shape}")

    def labels(self, index: int) -> np.ndarray:
        if index not in self._cache:
            self._cache[index] = superpixels(
                self.slices[index],
                self.bodies[index],
                self.scale,
                self.sigma,
                self.min_size,
                self.max_fraction,
            )
        return self._cache[index]

    def support_mask(self, labels: np.ndarray) -> np.ndarray | None:
        """One random superpixel, with probability ``merge_probability`` united with a touching one."""
        n = int(labels.max())
        if n == 0:
            return None
        chosen = int(self.rng.integers(1, n + 1))
        mask = labels == chosen
        if self.rng.random() < self.merge_probability:
            from scipy import ndimage

            ring = ndimage.binary_dilation(mask) & ~mask
            neighbours = np.unique(labels[ring])
            neighbours = neighbours[neighbours > 0]
            if len(neighbours):
                mask |= labels == int(self.rng.choice(neighbours))
        return mask

    def warp(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Random affine (+ mild elastic) warp of image and mask together, then photometric changes."""
        import torch
        import torch.nn.functional as F

        t, rng = self.transform, self.rng
        angle = np.deg2rad(rng.uniform(-t.rotation_deg, t.rotation_deg))
        zoom = rng.uniform(*t.scale)
        shift = rng.uniform(-t.translate, t.translate, 2)
        c, s = np.cos(angle) / zoom, np.sin(angle) / zoom
        flip = -1.0 if rng.random() < t.flip_probability else 1.0
        theta = torch.tensor([[[flip * c, -s, shift[0]], [flip * s, c, shift[1]]]], dtype=torch.float32)
        h, w = mask.shape
        grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
        if t.elastic > 0:
            coarse = torch.from_numpy(rng.normal(0, t.elastic, (1, 2, 4, 4)).astype(np.float32))
            grid = grid + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).permute(
                0, 2, 3, 1
            )
        both = torch.from_numpy(np.concatenate([image, mask[None].astype(np.float32)])[None])
        warped = F.grid_sample(both, grid, mode="bilinear", padding_mode="reflection", align_corners=False)[
            0
        ].numpy()
        query, query_mask = warped[:-1], warped[-1] > 0.5

        low, high = query.min(), query.max()
        unit = (query - low) / max(high - low, 1e-6)
        unit = unit ** rng.uniform(*t.gamma)
        query = unit * (high - low) + low
        mean = query.mean()
        query = (query - mean) * rng.uniform(*t.contrast) + mean
        query = query + rng.normal(0, t.noise_std, query.shape)
        return query.astype(np.float32), query_mask

    def sample(self, attempts: int = 50) -> Episode:
        for _ in range(attempts):
            index = int(self.rng.integers(len(self.slices)))
            mask = self.support_mask(self.labels(index))
            if mask is None:
                continue
            image = self.slices[index]
            query, query_mask = self.warp(image, mask)
            if query_mask.any() and not np.array_equal(query, image):
                return Episode(image.astype(np.float32), mask, query, query_mask, index)
        raise ValueError(
            f"no usable superpixel in {attempts} random slices; the images may be empty or uniform "
            "(lower min_size or scale)"
        )

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``size`` episodes stacked: support images, support masks, query images, query masks."""
        episodes = [self.sample() for _ in range(size)]
        return (
            np.stack([e.support_image for e in episodes]),
            np.stack([e.support_mask for e in episodes]).astype(np.float32),
            np.stack([e.query_image for e in episodes]),
            np.stack([e.query_mask for e in episodes]).astype(np.int64),
        )
