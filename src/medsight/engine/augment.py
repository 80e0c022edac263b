"""Training-time augmentation with MONAI transforms, in the spirit of nnU-Net's defaults.

Spatial: random rotation and isotropic scaling (image bilinear, label nearest), applied in-plane
to every slice of a 2.5D stack alike, in 3D to a patch. Intensity: multiplicative and additive
shifts, gamma, Gaussian noise and blur. No mirroring: label sets such as anterior/posterior or
left/right are defined by direction, and a flipped image would teach the wrong name.

Each batch re-seeds the transforms from the training loop's generator, so a run (and a resumed
run) draws exactly the same augmentations.
"""

from __future__ import annotations

import math

import numpy as np

LEVELS = ("none", "intensity", "spatial")


class Augmenter:
    """``Augmenter(kind, level)(x, y, rng)`` -> augmented batch; x (B, C, [k,] *spatial), y (B, *spatial)."""

    def __init__(self, kind: str, level: str = "spatial", patch: tuple[int, ...] | None = None):
        if level not in LEVELS:
            raise ValueError(f"augmentation level must be one of {LEVELS}, not {level!r}")
        from monai import transforms as mt

        self.kind, self.level = kind, level
        ndim = 3 if kind == "3d" else 2
        rotate = (math.radians(15),) * (3 if ndim == 3 else 1)
        self.spatial = mt.RandAffined(
            keys=("image", "label"),
            prob=0.5 if level == "spatial" else 0.0,
            rotate_range=rotate,
            scale_range=(0.15,) * ndim,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
            spatial_size=patch,
            cache_grid=patch is not None,
        )
        self.intensity = mt.Compose(
            [
                mt.RandScaleIntensity(factors=0.15, prob=0.3),
                mt.RandShiftIntensity(offsets=0.1, prob=0.3),
                mt.RandAdjustContrast(gamma=(0.7, 1.5), prob=0.3),
                mt.RandGaussianNoise(std=0.1, prob=0.15),
                mt.RandGaussianSmooth(sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.1),
            ]
        )

    def __call__(
        self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.level == "none":
            return x, y
        seed = int(rng.integers(2**31))
        self.spatial.set_random_state(seed=seed)
        self.intensity.set_random_state(seed=seed + 1)
        xs, ys = [], []
        for image, label in zip(x, y, strict=True):
            stacked = image.reshape(-1, *image.shape[-(3 if self.kind == "3d" else 2) :])  # (C*k, *spatial)
            out = self.spatial({"image": stacked, "label": label[None]})
            xs.append(np.asarray(self.intensity(out["image"])).reshape(image.shape))
            ys.append(np.asarray(out["label"])[0])
        return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int64)
