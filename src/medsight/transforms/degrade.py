"""Low-resolution degradation models for super-resolution pairs, with the true low-resolution geometry.

As in TorchIO, a random transform (:class:`RandomDegrade`) only samples parameters from a seeded
``numpy.random.Generator``; the work is a deterministic function of the scan and those parameters
(:func:`degrade`), so a pair can be rebuilt from its parameters alone.

Modes
-----
``inplane`` (scale 2, 3 or 4): every in-plane axis (both axes of a 2D scan; the two axes other
than ``slice_axis`` of a 3D scan) is averaged then decimated by ``scale``. Profiles:

- ``gaussian`` (default): a Gaussian point-spread function whose full width at half maximum equals
  the low-resolution voxel, ``sigma = fwhm * scale / (2 sqrt(2 ln 2))`` HR voxels (``fwhm`` = 1
  unless jittered). This is the usual model of an acquisition's slice/pixel profile in MRI
  super-resolution; its attenuation at the new Nyquist frequency ``1 / (2 scale)`` is
  ``exp(-pi^2 / (16 ln 2)) = 0.41`` for every scale, a moderate anti-aliasing filter.
- ``box``: plain block (area) average of ``scale`` voxels.
- ``kspace`` (MRI): the centred k-space is truncated to ``1/scale`` of its extent per in-plane
  axis and transformed back; amplitudes are divided by ``scale`` per axis so intensities keep
  their level (the inverse FFT of the shorter spectrum divides by the shorter length).

``thick`` (3D only, integer scale 2..8): ``k = scale`` neighbouring slices along ``slice_axis``
are averaged with a slab profile (``box``: equal weights over the k slices; ``gaussian``: FWHM of
k slices; ``triangular``: weights ``1 - |d|/k``, FWHM k slices) and one slab is kept per k slices.

Geometry: low-resolution voxel ``i`` summarises high-resolution voxels ``i*k .. i*k + k - 1``
(its profile is centred on them), so its world position is their mean: the spacing grows by ``k``
and the origin moves by ``(k - 1)/2`` high-resolution voxels along each decimated axis.
:func:`upsample_geometry` inverts this for the network output. The axis lengths must be
multiples of the scale (:func:`crop_to_multiple` trims the far end, which leaves the affine as it is).

Near the borders a profile's weights are renormalised over the voxels that exist, so a constant
image stays exactly constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsight.errors import MedsightError
from medsight.scan import Scan

MODES = ("inplane", "thick")
INPLANE_SCALES = (2, 3, 4)
THICK_SCALES = tuple(range(2, 9))
INPLANE_PROFILES = ("gaussian", "box", "kspace")
SLAB_PROFILES = ("box", "gaussian", "triangular")
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))

__all__ = [
    "DegradeParams",
    "RandomDegrade",
    "crop_to_multiple",
    "decimated_axes",
    "degrade",
    "downsample_geometry",
    "from_planes",
    "in_dtype_of",
    "make_pair",
    "plane_axes",
    "to_planes",
    "upsample_geometry",
]


@dataclass(frozen=True)
class DegradeParams:
    """Everything :func:`degrade` needs: ``profile`` is one of INPLANE_PROFILES or SLAB_PROFILES."""

    mode: str = "inplane"
    scale: int = 2
    profile: str = "gaussian"
    fwhm: float = 1.0  # profile width in low-resolution voxels (gaussian/triangular only)
    slice_axis: int = -1  # spatial axis of the slices of a 3D scan


def decimated_axes(ndim: int, mode: str, slice_axis: int = -1) -> tuple[int, ...]:
    """Spatial axes a degradation shrinks: in-plane axes, or the slice axis for ``thick``."""
    if mode not in MODES:
        raise MedsightError(f"unknown degradation mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "thick":
        if ndim != 3:
            raise MedsightError(
                "thick-slice degradation needs a 3D scan; this one is 2D (use --mode inplane)"
            )
        return (slice_axis % 3,)
    if ndim == 2:
        return (0, 1)
    return tuple(a for a in range(3) if a != slice_axis % 3)


def _check(params: DegradeParams, scan: Scan) -> tuple[int, ...]:
    axes = decimated_axes(scan.ndim, params.mode, params.slice_axis)
    scales, profiles = (
        (INPLANE_SCALES, INPLANE_PROFILES) if params.mode == "inplane" else (THICK_SCALES, SLAB_PROFILES)
    )
    if params.scale not in scales:
        raise MedsightError(
            f"{params.mode} scale must be one of {list(scales)}, got {params.scale}", scan.path
        )
    if params.profile not in profiles:
        raise MedsightError(
            f"{params.mode} profile must be one of {', '.join(profiles)}, got {params.profile!r}", scan.path
        )
    if not params.fwhm > 0:
        raise MedsightError(f"profile fwhm must be > 0, got {params.fwhm}", scan.path)
    bad = [scan.spatial_shape[a] for a in axes if scan.spatial_shape[a] % params.scale]
    if bad:
        raise MedsightError(
            f"scale {params.scale} does not divide the axis length(s) {bad} of shape {scan.spatial_shape}; "
            "crop the scan to a multiple first",
            scan.path,
        )
    return axes


def _profile_matrix(n: int, k: int, profile: str, fwhm: float) -> np.ndarray:
    """``(n // k, n)`` weights: row ``i`` is the profile centred on HR voxels ``i*k .. i*k+k-1``."""
    centres = np.arange(n // k) * k + (k - 1) / 2.0
    d = np.arange(n)[None, :] - centres[:, None]
    if profile == "box":
        w = (np.abs(d) <= (k - 1) / 2.0 + 1e-9).astype(np.float64)
    elif profile == "gaussian":
        sigma = fwhm * k * FWHM_TO_SIGMA
        w = np.exp(-0.5 * (d / sigma) ** 2) * (np.abs(d) <= 4.0 * sigma)
    elif profile == "triangular":
        w = np.clip(1.0 - np.abs(d) / (fwhm * k), 0.0, None)
    else:  # pragma: no cover - _check rejects it first
        raise ValueError(profile)
    return w / w.sum(axis=1, keepdims=True)


def _kspace_truncate(x: np.ndarray, axis: int, k: int) -> np.ndarray:
    """Keep the centred ``n/k`` frequencies of ``axis``, sampled at the block centres (real output)."""
    n = x.shape[axis]
    m = n // k
    spectrum = np.fft.fftshift(np.fft.fft(x, axis=axis), axes=axis)
    start = n // 2 - m // 2  # the DC bin sits at n//2 after fftshift, and at m//2 in the cropped one
    kept = np.take(spectrum, np.arange(start, start + m), axis=axis)
    freqs = (np.arange(m) - m // 2) / n  # cycles per HR voxel
    # a shift by (k-1)/2 HR voxels puts LR sample i at the centre of HR block i, as the geometry says
    phase = np.exp(2j * np.pi * freqs * (k - 1) / 2.0)
    shape = [1] * x.ndim
    shape[axis] = m
    kept = kept * phase.reshape(shape)
    return np.fft.ifft(np.fft.ifftshift(kept, axes=axis), axis=axis).real / k


def downsample_geometry(affine: np.ndarray, scale: int, axes: Sequence[int]) -> np.ndarray:
    """Affine of the LR grid: spacing times ``scale``, origin at the centre of the first HR block."""
    out = np.array(affine, dtype=np.float64)
    for a in axes:
        out[:3, 3] += (scale - 1) / 2.0 * out[:3, a]
        out[:3, a] *= scale
    return out


def upsample_geometry(lr_affine: np.ndarray, scale: int, axes: Sequence[int]) -> np.ndarray:
    """Affine of the HR grid that :func:`downsample_geometry` came from (the inverse)."""
    out = np.array(lr_affine, dtype=np.float64)
    for a in axes:
        out[:3, a] /= scale
        out[:3, 3] -= (scale - 1) / 2.0 * out[:3, a]
    return out


def crop_to_multiple(scan: Scan, scale: int, axes: Sequence[int]) -> Scan:
    """Trim the far end of ``axes`` to a multiple of ``scale`` (voxel 0 stays: the affine is unchanged)."""
    index = [slice(None)] * scan.array.ndim
    for a in axes:
        index[a + 1] = slice(0, scan.spatial_shape[a] - scan.spatial_shape[a] % scale)
    return scan.with_array(scan.array[tuple(index)])


def degrade(scan: Scan, params: DegradeParams) -> Scan:
    """The low-resolution scan (float32) with its true geometry; ``meta['degrade']`` holds the params."""
    axes = _check(params, scan)
    x = np.asarray(scan.array, dtype=np.float64)
    for a in axes:
        axis = a + 1  # channel first
        if params.profile == "kspace":
            x = _kspace_truncate(x, axis, params.scale)
        else:
            w = _profile_matrix(x.shape[axis], params.scale, params.profile, params.fwhm)
            x = np.moveaxis(np.tensordot(w, np.moveaxis(x, axis, 0), axes=1), 0, axis)
    meta = {**scan.meta, "degrade": params}
    return Scan(x.astype(np.float32), downsample_geometry(scan.affine, params.scale, axes), meta, scan.path)


class RandomDegrade:
    """Samples :class:`DegradeParams` from a seeded generator, then calls :func:`degrade`.

    ``scales`` and ``profiles`` are drawn uniformly; ``fwhm_jitter`` draws the profile width
    from ``U(1 - j, 1 + j)`` low-resolution voxels (0: always exactly one voxel).
    """

    def __init__(
        self,
        mode: str = "inplane",
        scales: Sequence[int] = (2,),
        profiles: Sequence[str] | None = None,
        fwhm_jitter: float = 0.0,
        slice_axis: int = -1,
    ):
        if mode not in MODES:
            raise MedsightError(f"unknown degradation mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 0.0 <= fwhm_jitter < 1.0:
            raise MedsightError(f"fwhm_jitter must be in [0, 1), got {fwhm_jitter}")
        self.mode = mode
        self.scales = tuple(int(s) for s in scales)
        default = "gaussian" if mode == "inplane" else "box"
        self.profiles = tuple(profiles) if profiles else (default,)
        self.fwhm_jitter = float(fwhm_jitter)
        self.slice_axis = slice_axis

    def sample(self, rng: np.random.Generator) -> DegradeParams:
        scale = self.scales[int(rng.integers(len(self.scales)))]
        profile = self.profiles[int(rng.integers(len(self.profiles)))]
        fwhm = 1.0 + float(rng.uniform(-self.fwhm_jitter, self.fwhm_jitter)) if self.fwhm_jitter else 1.0
        return DegradeParams(self.mode, scale, profile, fwhm, self.slice_axis)

    def __call__(self, scan: Scan, rng: np.random.Generator) -> Scan:
        return degrade(scan, self.sample(rng))


def in_dtype_of(array: np.ndarray, dtype) -> np.ndarray:
    """``array`` in ``dtype``: integers (a PNG, a DICOM's stored values) rounded and clipped to the
    type's range, so a picture stays a picture of the same depth; anything else as float32."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(array), info.min, info.max).astype(dtype)
    return np.asarray(array, dtype=np.float32)


def make_pair(scan: Scan, params: DegradeParams) -> tuple[Scan, Scan]:
    """``(low, high)``: the scan cropped to a multiple of the scale (same affine) and its degradation."""
    axes = decimated_axes(scan.ndim, params.mode, params.slice_axis)
    high = crop_to_multiple(scan, params.scale, axes)
    if any(high.spatial_shape[a] == 0 for a in axes):
        raise MedsightError(
            f"the scan ({scan.spatial_shape}) is smaller than the scale {params.scale} along an axis it shrinks",
            scan.path,
        )
    return degrade(high, params), high


def plane_axes(ndim: int, mode: str, slice_axis: int = -1) -> tuple[int | None, int, int]:
    """``(stack, row, col)`` spatial axes of the 2D images the SR network works on.

    ``inplane``: the slices (rows/columns are the in-plane axes, stacked along the slice axis; a 2D
    scan is one image). ``thick``: rows are the slice axis (the one to upsample), columns the second
    in-plane axis, stacked along the first in-plane axis.
    """
    if ndim == 2:
        if mode == "thick":
            decimated_axes(ndim, mode)  # raises the one-line error
        return None, 0, 1
    s = slice_axis % 3
    first, second = (a for a in range(3) if a != s)
    return (s, first, second) if mode == "inplane" else (first, s, second)


def to_planes(array: np.ndarray, mode: str, slice_axis: int = -1) -> np.ndarray:
    """``(C, *spatial)`` -> ``(N, C, rows, cols)`` images for the network (see :func:`plane_axes`)."""
    stack, row, col = plane_axes(array.ndim - 1, mode, slice_axis)
    if stack is None:
        return array[None]
    return np.transpose(array, (stack + 1, 0, row + 1, col + 1))


def from_planes(planes: np.ndarray, ndim: int, mode: str, slice_axis: int = -1) -> np.ndarray:
    """Inverse of :func:`to_planes`: ``(N, C, rows, cols)`` -> ``(C, *spatial)`` with ``ndim`` spatial axes."""
    stack, row, col = plane_axes(ndim, mode, slice_axis)
    if stack is None:
        return planes[0]
    return np.transpose(planes, np.argsort([stack + 1, 0, row + 1, col + 1]))
