"""Scan: an image array with the geometry that places it in the patient.

The array is channel-first ``(C, *spatial)``; the 4x4 affine maps voxel indices to RAS+
millimetres (see the package docstring). Everything that resamples, predicts or writes a
scan keeps this affine, so results land where the input was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medsight.errors import MedsightError


@dataclass(frozen=True)
class Plane:
    """A slice plane in world space: a point, the unit normal and the two in-plane unit axes.

    ``u`` follows the first remaining voxel axis and ``v`` the second; ``spacing`` is the
    in-plane pixel size along ``u`` and ``v`` in mm.
    """

    origin: np.ndarray
    normal: np.ndarray
    u: np.ndarray
    v: np.ndarray
    spacing: tuple[float, float]

    def world(self, a: float, b: float) -> np.ndarray:
        """World position of in-plane pixel ``(a, b)``."""
        return self.origin + a * self.spacing[0] * self.u + b * self.spacing[1] * self.v


@dataclass
class Scan:
    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim not in (3, 4):
            raise ValueError(f"Scan.array must be (C, X, Y) or (C, X, Y, Z), got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Scan.affine must be 4x4, got {self.affine.shape}")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_spatial(cls, array: np.ndarray, affine: np.ndarray | None = None, **kw: Any) -> Scan:
        """Wrap a single-channel spatial array (no channel axis yet)."""
        return cls(np.asarray(array)[None], np.eye(4) if affine is None else affine, **kw)

    @staticmethod
    def affine_from_spacing(spacing, origin=None, directions=None) -> np.ndarray:
        """Affine for an axis-aligned (or given-direction) grid: columns are direction*spacing."""
        spacing = list(spacing) + [1.0] * (3 - len(spacing))
        aff = np.eye(4)
        d = np.eye(3) if directions is None else np.asarray(directions, dtype=float)
        aff[:3, :3] = d * np.asarray(spacing, dtype=float)[None, :]
        if origin is not None:
            aff[:3, 3] = list(origin) + [0.0] * (3 - len(origin))
        return aff

    def with_array(self, array: np.ndarray, **meta: Any) -> Scan:
        """Same geometry, new voxels (a prediction, a probability map...)."""
        return replace(self, array=np.asarray(array), meta={**self.meta, **meta})

    # -- geometry -----------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return self.array.shape[0]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.array.ndim - 1

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, : self.ndim], axis=0))

    @property
    def origin(self) -> np.ndarray:
        return self.affine[:3, 3].copy()

    @property
    def orientation(self) -> str:
        """Axis codes such as 'RAS' or 'LPI' (nibabel's aff2axcodes), one letter per spatial axis."""
        import nibabel as nib

        return "".join(nib.orientations.aff2axcodes(self.affine))[: self.ndim]

    def voxel_to_world(self, ijk) -> np.ndarray:
        """Map voxel indices (..., ndim) to world mm (..., 3)."""
        ijk = np.asarray(ijk, dtype=float)
        pad = np.zeros(ijk.shape[:-1] + (3 - ijk.shape[-1],))
        homog = np.concatenate([ijk, pad], axis=-1)
        return homog @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, xyz) -> np.ndarray:
        """Map world mm (..., 3) to (fractional) voxel indices (..., ndim)."""
        xyz = np.asarray(xyz, dtype=float)
        inv = np.linalg.inv(self.affine)
        return (xyz @ inv[:3, :3].T + inv[:3, 3])[..., : self.ndim]

    def slice_plane(self, index: int, axis: int = -1) -> Plane:
        """The world plane of slice ``index`` along spatial ``axis`` (default: the last)."""
        if self.ndim != 3:
            raise ValueError("slice_plane needs a 3D scan")
        axis = axis % 3
        if not 0 <= index < self.spatial_shape[axis]:
            raise IndexError(f"slice {index} outside 0..{self.spatial_shape[axis] - 1}")
        cols = self.affine[:3, :3]
        in_plane = [a for a in range(3) if a != axis]
        u, v = (cols[:, a] / np.linalg.norm(cols[:, a]) for a in in_plane)
        normal = np.cross(u, v)
        normal /= np.linalg.norm(normal)
        ijk = np.zeros(3)
        ijk[axis] = index
        spacing = self.spacing
        return Plane(self.voxel_to_world(ijk), normal, u, v, (spacing[in_plane[0]], spacing[in_plane[1]]))

    def same_geometry(self, other: Scan, atol: float = 1e-3) -> bool:
        return self.spatial_shape == other.spatial_shape and np.allclose(self.affine, other.affine, atol=atol)

    def describe(self) -> dict[str, Any]:
        """What `medsight info` prints: shape, spacing, orientation, intensity range."""
        a = self.array
        finite = np.isfinite(a) if np.issubdtype(a.dtype, np.floating) else np.ones(a.shape, bool)
        vals = a[finite]
        return {
            "path": str(self.path) if self.path else None,
            "format": self.meta.get("format"),
            "channels": self.channels,
            "shape": list(self.spatial_shape),
            "spacing_mm": [round(s, 6) for s in self.spacing],
            "orientation": self.orientation,
            "origin_mm": [round(float(o), 4) for o in self.origin],
            "dtype": str(a.dtype),
            "min": float(vals.min()) if vals.size else None,
            "max": float(vals.max()) if vals.size else None,
            "mean": float(vals.mean()) if vals.size else None,
            "std": float(vals.std()) if vals.size else None,
            "non_finite_voxels": int((~finite).sum()),
        }


# -- non-finite voxels ------------------------------------------------------------------------------
def non_finite_count(scan: Scan) -> int:
    """NaN and ±inf voxels (0 for integer scans, which cannot hold them)."""
    if not np.issubdtype(scan.array.dtype, np.floating):
        return 0
    return int(scan.array.size - np.count_nonzero(np.isfinite(scan.array)))


def require_finite(scan: Scan, case: str | None = None) -> Scan:
    """Training refuses a non-finite voxel: one NaN spreads through the normalisation and the loss."""
    count = non_finite_count(scan)
    if count:
        who = f"case '{case}': " if case else ""
        raise MedsightError(
            f"{who}{count} non-finite voxels (NaN or inf) in the image; training needs finite values, "
            "so replace them in the file first",
            scan.path,
        )
    return scan


def fill_non_finite(scan: Scan) -> Scan:
    """For segmenting: non-finite voxels take their channel's lowest finite value, with a warning.

    NaN in a scan usually marks voxels outside the field of view (resampling, defacing, masking),
    which is background. The channel's minimum (air in CT and MR) is the value such voxels would
    have had; 0 is not neutral (water in CT) and would be segmented as tissue. Left as NaN, they
    turn the whole normalised scan NaN and the mask all background.
    """
    count = non_finite_count(scan)
    if not count:
        return scan
    array = scan.array.copy()
    for channel in array:
        finite = np.isfinite(channel)
        if not finite.any():
            raise MedsightError("has no finite voxel (all NaN or inf); nothing to segment", scan.path)
        channel[~finite] = channel[finite].min()
    warnings.warn(
        f"{scan.path or 'scan'}: {count} non-finite voxels (NaN or inf) were replaced by the image's "
        "lowest finite value before segmenting",
        UserWarning,
        stacklevel=2,
    )
    return replace(scan, array=array)


# -- pairing two scans: a label (mask, prediction) on its image's grid ---------------------------------------
def _has_geometry(scan: Scan) -> bool:
    """Pictures and bare .npy arrays carry no patient geometry, only an identity placeholder."""
    return scan.meta.get("format") != "image" and not (
        scan.meta.get("format") == "numpy" and np.allclose(scan.affine, np.eye(4))
    )


def _label_voxel_box(label: Scan, image: Scan, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box, in the label's voxel indices, of the image grid's voxel centres."""
    nd = image.ndim
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in image.spatial_shape], indexing="ij"))
    corners = corners.reshape(nd, -1).T
    mapped = corners @ matrix[:nd, :nd].T + matrix[:nd, 3]
    return mapped.min(0), mapped.max(0)


def align_to(label: Scan, image: Scan, what: str = "label", of: str = "image", cover: bool = False) -> Scan:
    """``label`` on ``image``'s voxel grid: the one rule for every command that pairs two scans.

    Unchanged when both grids match (affines within 1e-3 mm); resampled with nearest neighbour
    when they differ but overlap in space (a LAS label on an LPS-read CT, a cropped label); refused
    when they do not overlap, or with ``cover`` when the label leaves part of the image uncovered
    (evaluation must not count unlabelled voxels as background). Voxels outside the label are 0.
    """
    if label.ndim != image.ndim:
        raise MedsightError(f"{what} is {label.ndim}D but the {of} is {image.ndim}D", label.path)
    if label.same_geometry(image):
        return label
    shapes = f"{what} shape {list(label.spatial_shape)} differs from {of} shape {list(image.spatial_shape)}"
    if not (_has_geometry(label) and _has_geometry(image)):
        if label.spatial_shape == image.spatial_shape:
            return replace(label, affine=image.affine.copy())  # no geometry to compare: same grid
        raise MedsightError(shapes, label.path)
    if np.allclose(label.affine, image.affine, atol=1e-3):  # a crop or resampling changes the affine
        raise MedsightError(
            f"{shapes} although their affines are the same; is it the right file?", label.path
        )
    nd = image.ndim
    matrix = np.linalg.inv(label.affine) @ image.affine  # image voxel -> label voxel
    low, high = _label_voxel_box(label, image, matrix)
    size = np.asarray(label.spatial_shape, float)
    if np.any(high < -0.5) or np.any(low > size - 0.5):
        raise MedsightError(
            f"{what} does not overlap the {of} in space: its geometry differs (origin "
            f"{np.round(label.origin, 2).tolist()} vs {np.round(image.origin, 2).tolist()}, spacing "
            f"{[round(s, 3) for s in label.spacing]} vs {[round(s, 3) for s in image.spacing]}, orientation "
            f"{label.orientation} vs {image.orientation}); was it made for another scan?",
            label.path,
        )
    if cover and (np.any(low < -0.5) or np.any(high > size - 0.5)):
        differs = (
            shapes
            if label.spatial_shape != image.spatial_shape
            else f"{what} geometry differs from the {of}'s (spacing {[round(s, 3) for s in label.spacing]} vs "
            f"{[round(s, 3) for s in image.spacing]}, origin {np.round(label.origin, 2).tolist()} vs "
            f"{np.round(image.origin, 2).tolist()})"
        )
        raise MedsightError(
            f"{differs} and covers only part of it in space; resample it onto the {of} first", label.path
        )
    from scipy.ndimage import affine_transform

    source = label.array.astype(np.uint8) if label.array.dtype == bool else label.array
    channels = [
        affine_transform(
            channel, matrix[:nd, :nd], offset=matrix[:nd, 3], output_shape=image.spatial_shape,
            order=0, mode="constant", cval=0, output=channel.dtype,
        )
        for channel in source
    ]  # fmt: skip
    array = np.stack(channels).astype(label.array.dtype, copy=False)
    return replace(label, array=array, affine=image.affine.copy(), meta={**label.meta, "resampled_to": of})
