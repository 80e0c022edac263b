"""Turning preprocessed volumes into network inputs: slice stacks for 2D/2.5D models, patches for 3D.

Working arrays are channel-first with the slice axis moved last: image (C, H, W, S), label (H, W, S).
A 2.5D input for slice s is the k slices around s (edge slices repeated at the volume's ends),
laid out (C, k, H, W); a 2D input is (C, H, W).
"""

from __future__ import annotations

import math

import numpy as np

MULTIPLE = 16  # every U-Net here downsamples four times at most


def round_up(n: int, multiple: int = MULTIPLE) -> int:
    return int(math.ceil(n / multiple) * multiple)


def to_working(array: np.ndarray, slice_axis: int) -> np.ndarray:
    """(C, X, Y, Z) -> (C, H, W, S) with the slice axis last."""
    return np.moveaxis(array, 1 + slice_axis, -1)


def from_working(array: np.ndarray, slice_axis: int) -> np.ndarray:
    return np.moveaxis(array, -1, 1 + slice_axis)


def stack(image: np.ndarray, s: int, slices: int) -> np.ndarray:
    """The ``slices`` slices centred on ``s`` as (C, k, H, W); slices=1 gives (C, H, W)."""
    depth = image.shape[-1]
    idx = np.clip(np.arange(s - slices // 2, s + slices // 2 + 1), 0, depth - 1)
    chunk = np.moveaxis(image[..., idx], -1, 1)  # (C, k, H, W)
    return chunk[:, 0] if slices == 1 else chunk


def pad_to(array: np.ndarray, shape: tuple[int, ...], value: float = 0.0) -> np.ndarray:
    """Pad the trailing axes at their end up to ``shape`` (no cropping)."""
    lead = array.ndim - len(shape)
    pads = [(0, 0)] * lead + [(0, max(0, t - n)) for n, t in zip(array.shape[lead:], shape, strict=True)]
    return np.pad(array, pads, constant_values=value) if any(p[1] for p in pads) else array


def sample_axes(kind: str, scan_axis: int, slice_axis: int) -> tuple[int, int | None] | None:
    """Where a scan's spatial axis lies in one training sample: (image axis, label axis or None).

    3D patches keep the scan's axes, (C, X, Y, Z) and (X, Y, Z). Slices, (C, H, W) or stacks
    (C, k, H, W), with their label (H, W), keep the in-plane axes in the scan's order; the slice axis
    is the stack axis, which the centre slice's label does not have, and is absent from a 2D input
    (None).
    """
    if kind == "3d":
        return 1 + scan_axis, scan_axis
    stack_axes = 1 if kind == "2.5d" else 0
    if scan_axis == slice_axis:
        return (1, None) if stack_axes else None
    in_plane = [a for a in range(3) if a != slice_axis].index(scan_axis)
    return 1 + stack_axes + in_plane, in_plane


class PatchSampler:
    """Random training inputs from in-memory volumes, with nnU-Net-style foreground oversampling:
    a third of the samples are centred on a foreground voxel of a class drawn uniformly from those
    present, so a small class (a lesion beside a large organ) is seen as often as the large one.

    ``mirror_axes`` (the scan's spatial axes) mirrors each sample along each of them with
    probability 1/2. With ``transpose`` (2D pictures), when both in-plane axes are mirror axes and
    the patch is square, a sample is also transposed with probability 1/2: the two mirrors and the
    transposition draw all eight rotations and mirror images of a picture whose orientation means
    nothing (nuclei, cells), as the text-guided trainer's crops do. Volumes never transpose: a
    mirror along each axis does not make the swap of two anatomical axes plausible.

    ``images`` and ``labels`` are sequences indexed per sample, so they may be memory-mapped arrays
    (or a sequence that opens one on access): a sample reads only its window. ``class_locations``
    (one list per volume, holding per class present a sequence of voxel coordinates in the label's
    axis order, e.g. a sample of them as nnU-Net keeps) replaces the scan of every label for its
    foreground voxels, which would read every volume whole.
    """

    def __init__(
        self,
        images,
        labels,
        kind: str,
        patch: tuple[int, ...],
        slices: int,
        rng,
        fg_fraction=0.33,
        mirror_axes=(),
        slice_axis: int = 2,
        class_locations=None,
        transpose: bool = False,
    ):
        self.images, self.labels = images, labels
        self.kind, self.patch, self.slices, self.rng = kind, tuple(patch), slices, rng
        self.fg_fraction = fg_fraction
        self.mirrors = [m for a in mirror_axes if (m := sample_axes(kind, a, slice_axis))]
        self.transpose = (
            transpose and kind == "2d" and len(self.mirrors) == 2 and self.patch[0] == self.patch[1]
        )
        if class_locations is None:
            class_locations = [
                [np.argwhere(lab == value) for value in np.unique(lab) if value > 0] for lab in labels
            ]
        self.fg_voxels = class_locations

    def _centre(self, v: int) -> np.ndarray | None:
        by_class = self.fg_voxels[v]
        if by_class and self.rng.random() < self.fg_fraction:
            voxels = by_class[self.rng.integers(len(by_class))]
            return voxels[self.rng.integers(len(voxels))]
        return None

    def _crop_start(self, size: int, patch: int, centre: int | None) -> int:
        if size <= patch:
            return 0
        if centre is None:
            return int(self.rng.integers(0, size - patch + 1))
        return int(
            np.clip(centre - patch // 2 + self.rng.integers(-patch // 4, patch // 4 + 1), 0, size - patch)
        )

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        v = int(self.rng.integers(len(self.images)))
        image, label = self.images[v], self.labels[v]
        centre = self._centre(v)
        if centre is not None:
            centre = np.asarray(centre)
        if self.kind == "3d":
            starts = [
                self._crop_start(n, p, None if centre is None else int(c))
                for n, p, c in zip(
                    label.shape, self.patch, centre if centre is not None else [0] * 3, strict=True
                )
            ]
            window = tuple(slice(s, s + p) for s, p in zip(starts, self.patch, strict=True))
            x, y = image[(slice(None), *window)], label[window]
        else:
            s = int(centre[2]) if centre is not None else int(self.rng.integers(label.shape[-1]))
            x, y = stack(image, s, self.slices), label[..., s]
            h0 = self._crop_start(y.shape[0], self.patch[0], None if centre is None else int(centre[0]))
            w0 = self._crop_start(y.shape[1], self.patch[1], None if centre is None else int(centre[1]))
            x = x[..., h0 : h0 + self.patch[0], w0 : w0 + self.patch[1]]
            y = y[h0 : h0 + self.patch[0], w0 : w0 + self.patch[1]]
        for x_axis, y_axis in self.mirrors:
            if self.rng.random() < 0.5:
                x = np.flip(x, x_axis)
                y = y if y_axis is None else np.flip(y, y_axis)
        if self.transpose and self.rng.random() < 0.5:
            x, y = np.swapaxes(x, -1, -2), y.T
        return pad_to(x, self.patch), pad_to(y, self.patch)

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = zip(*(self.sample() for _ in range(size)), strict=True)
        return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int64)
