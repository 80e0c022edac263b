"""Imaging-plane geometry for anatomy-oriented self-supervised pretraining (METHODS.md section 4).

Conventions (one place, used everywhere in this module):

- World coordinates are RAS+ millimetres, as every ``Scan.affine`` (DICOM's LPS is converted on entry).
- A ``Plane`` is a DICOM image plane: ``origin`` is the world position of the *centre* of pixel
  ``(row 0, col 0)``; ``row_dir`` is the unit vector along which the *column index* increases (the first
  ImageOrientationPatient triplet) and ``col_dir`` the one along which the *row index* increases (the
  second triplet); ``spacing = (row_spacing, col_spacing)`` as DICOM PixelSpacing (distance between
  rows, distance between columns); ``size = (rows, cols)``. The image of a plane is an array
  ``image[row, col]``.
- Pixel coordinates are ``(row, col)`` pairs, fractional allowed. A ``Line`` in an image is a point
  ``(row, col)`` and a unit direction ``(drow, dcol)``; its normal form uses ``x = col, y = row``:
  ``rho = x cos(theta) + y sin(theta)`` with ``theta`` in ``[0, pi)``.
- The slice ``k`` of a volume along spatial axis ``a`` is the plane whose columns follow the lower
  remaining voxel axis and rows the higher one, so for ``a = 2`` its image is ``array[c, :, :, k].T``
  and a DICOM series read by ``medsight.io`` gives back exactly its slices' tags.

``medsight.scan.Plane`` (from ``Scan.slice_plane``) describes the same slice without a size: its ``u``
is ``row_dir``, ``v`` is ``col_dir``, and its spacing is ordered (along u, along v), the reverse of
PixelSpacing's (row, col) used here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from medsight.errors import MedsightError
from medsight.io.dicom import LPS_TO_RAS
from medsight.scan import Scan

__all__ = [
    "Frame",
    "Line",
    "Plane",
    "Views",
    "anatomical_frame",
    "angle_error_deg",
    "foreground_mask",
    "intersection_line",
    "line_from_heatmap",
    "line_heatmap",
    "offset_error_px",
    "pixel_to_world",
    "planes_of_scan",
    "position_error",
    "pretext_errors",
    "sample_plane",
    "sample_views",
    "stack_positions",
    "views_from_dicom_study",
    "world_to_pixel",
]

_PARALLEL_SIN = 1e-6  # |sin(angle)| between normals below which two planes count as parallel


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


@dataclass(frozen=True, eq=False)  # array fields: compare planes with np.allclose, not ==
class Plane:
    """An image plane in RAS world space (see the module docstring for the conventions)."""

    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    spacing: tuple[float, float]
    size: tuple[int, int]

    @cached_property
    def normal(self) -> np.ndarray:
        """``row_dir x col_dir``: towards increasing slice index in a series read by ``medsight.io``."""
        return _unit(np.cross(self.row_dir, self.col_dir))

    @property
    def centre(self) -> np.ndarray:
        """World position of the image centre."""
        rows, cols = self.size
        return pixel_to_world(self, ((rows - 1) / 2, (cols - 1) / 2))

    @classmethod
    def from_dicom(cls, ds) -> Plane:
        """The plane of one DICOM image from ImagePositionPatient / ImageOrientationPatient / PixelSpacing."""
        try:
            iop = np.asarray([float(x) for x in ds.ImageOrientationPatient])
            ipp = np.asarray([float(x) for x in ds.ImagePositionPatient])
            ps = [float(x) for x in (ds.get("PixelSpacing") or ds.ImagerPixelSpacing)]
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError) as exc:
            raise MedsightError(f"DICOM image lacks usable plane geometry ({exc})", _ds_path(ds)) from exc
        if iop.size != 6 or ipp.size != 3 or len(ps) != 2:
            raise MedsightError("ImageOrientationPatient/ImagePositionPatient malformed", _ds_path(ds))
        flip = LPS_TO_RAS[:3, :3]
        return cls(flip @ ipp, _unit(flip @ iop[:3]), _unit(flip @ iop[3:]), (ps[0], ps[1]), (rows, cols))

    @classmethod
    def centred(
        cls, centre, row_dir, col_dir, spacing: float | Sequence[float], size: Sequence[int]
    ) -> Plane:
        """A plane of ``size`` pixels whose image centre is ``centre``."""
        sp = (float(spacing), float(spacing)) if np.isscalar(spacing) else tuple(float(s) for s in spacing)
        rows, cols = int(size[0]), int(size[1])
        row_dir, col_dir = _unit(row_dir), _unit(col_dir)
        origin = (
            np.asarray(centre, float) - (cols - 1) / 2 * sp[1] * row_dir - (rows - 1) / 2 * sp[0] * col_dir
        )
        return cls(origin, row_dir, col_dir, sp, (rows, cols))


def _ds_path(ds) -> Path | None:
    name = getattr(ds, "filename", None)
    return Path(name) if isinstance(name, str) else None


def pixel_to_world(plane: Plane, rc) -> np.ndarray:
    """World mm (..., 3) of pixel coordinates ``(..., 2)`` as ``(row, col)``."""
    rc = np.asarray(rc, dtype=float)
    r, c = rc[..., :1], rc[..., 1:2]
    return plane.origin + c * plane.spacing[1] * plane.row_dir + r * plane.spacing[0] * plane.col_dir


def world_to_pixel(plane: Plane, xyz) -> np.ndarray:
    """``(row, col)`` (..., 2) of the orthogonal projection of world points (..., 3) onto the plane."""
    d = np.asarray(xyz, dtype=float) - plane.origin
    return np.stack([d @ plane.col_dir / plane.spacing[0], d @ plane.row_dir / plane.spacing[1]], axis=-1)


def planes_of_scan(scan: Scan, axis: int = 2) -> list[Plane]:
    """Every slice of a 3D scan along spatial ``axis`` as a Plane (from the affine)."""
    if scan.ndim != 3:
        raise MedsightError("planes_of_scan needs a 3D scan", scan.path)
    axis = axis % 3
    p, q = (a for a in range(3) if a != axis)
    cols = scan.affine[:3, :3]
    spacing = scan.spacing
    row_dir, col_dir = _unit(cols[:, p]), _unit(cols[:, q])
    size = (scan.spatial_shape[q], scan.spatial_shape[p])
    planes = []
    for k in range(scan.spatial_shape[axis]):
        ijk = np.zeros(3)
        ijk[axis] = k
        planes.append(Plane(scan.voxel_to_world(ijk), row_dir, col_dir, (spacing[q], spacing[p]), size))
    return planes


# -- lines --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Line:
    """A line in an image: a point ``(row, col)`` and a unit direction ``(drow, dcol)``."""

    point: np.ndarray
    direction: np.ndarray

    def normal_form(self) -> tuple[float, float]:
        """``(theta, rho)`` with ``rho = col cos(theta) + row sin(theta)``, ``theta`` in ``[0, pi)``."""
        drow, dcol = self.direction
        theta = float(np.arctan2(dcol, -drow)) % np.pi  # the normal in (x, y) is (-drow, dcol)
        rho = float(self.point[1] * np.cos(theta) + self.point[0] * np.sin(theta))
        return theta, rho

    @classmethod
    def from_normal_form(cls, theta: float, rho: float) -> Line:
        nx, ny = np.cos(theta), np.sin(theta)
        point = np.array([rho * ny, rho * nx])  # (row, col) of the foot of the normal from the origin
        return cls(point, np.array([nx, -ny]))

    def distance(self, rc) -> np.ndarray:
        """Unsigned pixel distance of points ``(..., 2)`` to the line."""
        d = np.asarray(rc, dtype=float) - self.point
        return np.abs(d[..., 0] * self.direction[1] - d[..., 1] * self.direction[0])


def intersection_line(a: Plane, b: Plane) -> Line | None:
    """Where plane ``b`` cuts plane ``a``, in ``a``'s pixel coordinates; None for parallel planes."""
    na, nb = a.normal, b.normal
    d = np.cross(na, nb)
    if np.linalg.norm(d) < _PARALLEL_SIN:
        return None
    d = _unit(d)
    centre = a.centre
    # the point of the line nearest a's image centre: on both planes, and level with the centre along d
    point = np.linalg.solve(np.stack([na, nb, d]), [na @ a.origin, nb @ b.origin, d @ centre])
    step = np.array([d @ a.col_dir / a.spacing[0], d @ a.row_dir / a.spacing[1]])
    return Line(world_to_pixel(a, point), step / np.linalg.norm(step))


def line_heatmap(line: Line | None, size: Sequence[int], sigma_px: float) -> np.ndarray:
    """Gaussian ridge ``exp(-d^2 / (2 sigma^2))`` around ``line`` (d in pixels); zeros for no line."""
    rows, cols = int(size[0]), int(size[1])
    if line is None:
        return np.zeros((rows, cols), np.float32)
    rc = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), axis=-1)
    return np.exp(-(line.distance(rc) ** 2) / (2.0 * float(sigma_px) ** 2)).astype(np.float32)


def stack_positions(planes: Sequence[Plane]) -> np.ndarray:
    """Each plane's position along the stack normal, ``(loc - min) / (max - min)`` in ``[0, 1]``.

    ``loc = origin . normal`` with the first plane's normal, so 0 is the end the normal points away
    from (the first slice of a series read by ``medsight.io``). The reference code takes
    ``-normal . ImagePositionPatient`` instead, which gives ``1 -`` these values.
    """
    if len(planes) < 2:
        raise MedsightError("a stack position needs at least two planes")
    normal = planes[0].normal
    for p in planes[1:]:
        if np.linalg.norm(np.cross(normal, p.normal)) > 1e-3:
            raise MedsightError("stack_positions needs parallel planes; these are not")
    loc = np.array([p.origin @ normal for p in planes])
    span = loc.max() - loc.min()
    if span < 1e-6:
        raise MedsightError("all planes of the stack lie at one position")
    return (loc - loc.min()) / span


# -- sampling -----------------------------------------------------------------------------------


def sample_plane(scan: Scan, plane: Plane, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Resample a 3D scan on ``plane``'s pixel grid: ``(C, rows, cols)`` float32; outside is ``cval``.

    ``order`` is the spline order of ``scipy.ndimage.map_coordinates`` (1: trilinear).
    """
    from scipy.ndimage import map_coordinates

    if scan.ndim != 3:
        raise MedsightError("sample_plane needs a 3D scan", scan.path)
    rows, cols = plane.size
    inv = np.linalg.inv(scan.affine)
    # voxel index is affine in (row, col): one 3x3 product instead of a per-pixel world round trip
    start = inv[:3, :3] @ plane.origin + inv[:3, 3]
    d_col = inv[:3, :3] @ (plane.row_dir * plane.spacing[1])
    d_row = inv[:3, :3] @ (plane.col_dir * plane.spacing[0])
    r = np.arange(rows, dtype=float)[:, None, None]
    c = np.arange(cols, dtype=float)[None, :, None]
    ijk = (start + r * d_row + c * d_col).reshape(-1, 3).T
    # a voxel covers +-0.5 around its centre: points within it take the edge value (also absorbing the
    # round-off of the inverse affine at the border); points beyond it are outside the scan
    shape = np.asarray(scan.spatial_shape, dtype=float)[:, None]
    outside = ((ijk < -0.5) | (ijk > shape - 0.5)).any(axis=0).reshape(rows, cols)
    out = np.empty((scan.channels, rows, cols), np.float32)
    for ch in range(scan.channels):
        vol = np.asarray(scan.array[ch], dtype=np.float32)
        out[ch] = map_coordinates(vol, ijk, order=order, mode="nearest").reshape(rows, cols)
    out[:, outside] = cval
    return out


# -- anatomical frame and sampled views ---------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """Axes of a scan's foreground: ``axes[0]`` the long axis, rows are unit vectors (RAS).

    ``extent[i]`` is the (min, max) of the foreground's projection on ``axes[i]``, in mm from ``centre``,
    and ``sd[i]`` its standard deviation (mm).
    """

    centre: np.ndarray
    axes: np.ndarray
    extent: np.ndarray
    sd: np.ndarray


def foreground_mask(scan: Scan) -> np.ndarray:
    """Largest connected component above the Otsu threshold of the channel-mean image (no labels)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    image = np.asarray(scan.array, dtype=np.float32).mean(axis=0)
    finite = np.isfinite(image)
    if not finite.any() or np.ptp(image[finite]) == 0:
        raise MedsightError("the scan is constant: no foreground to orient views on", scan.path)
    mask = finite & (image > threshold_otsu(image[finite]))
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    return mask


def anatomical_frame(scan: Scan, long_axis: str = "pca", cross_axes: str = "pca") -> Frame:
    """Centre and axes of the foreground (see ``foreground_mask``), ``axes[0]`` the long axis.

    ``long_axis="pca"``: the principal axes (PCA of the foreground's world coordinates) by decreasing
    spread; each is signed to have a positive component along the RAS axis it is closest to, so
    flipping or permuting the array (with the affine compensating) gives the same frame. When two
    spreads (``Frame.sd``) are within ~10 % of each other their axes are ill-defined (a brain's
    left-right and anterior-posterior extents can be); for scans already in a standard orientation
    (co-registered brains) name the long axis instead: ``"R"``, ``"A"`` or ``"S"`` takes the world
    axes, that one first and the other two in R, A, S order. ``cross_axes="world"`` keeps the PCA long
    axis but fixes the other two from the world instead (the first of R, A, S that is not the long
    axis' own, made orthogonal to it, then their cross product), for anatomy that is clearly
    elongated but round in cross-section: hippocampus crops have the two smaller spreads within 10 %
    in a third of the cases, so the stack's in-plane orientation would swap between scans.
    """
    if scan.ndim != 3:
        raise MedsightError("anatomical_frame needs a 3D scan", scan.path)
    if long_axis not in ("pca", "R", "A", "S") or cross_axes not in ("pca", "world"):
        raise MedsightError(
            f"long_axis must be 'pca', 'R', 'A' or 'S' (got {long_axis!r}) and cross_axes 'pca' or "
            f"'world' (got {cross_axes!r})",
            scan.path,
        )
    mask = foreground_mask(scan)
    if mask.sum() < 4:
        raise MedsightError("the foreground is too small to define an anatomical frame", scan.path)
    xyz = scan.voxel_to_world(np.argwhere(mask))
    centre = xyz.mean(axis=0)
    centred = xyz - centre
    if long_axis == "pca":
        _, vectors = np.linalg.eigh(centred.T @ centred / len(xyz))
        axes = vectors[:, ::-1].T.copy()  # decreasing variance
        for i, axis in enumerate(axes):
            if axis[np.argmax(np.abs(axis))] < 0:
                axes[i] = -axis
        if cross_axes == "world":
            world = np.eye(3)[next(i for i in range(3) if i != int(np.argmax(np.abs(axes[0]))))]
            axes[1] = _unit(world - (world @ axes[0]) * axes[0])
            axes[2] = np.cross(axes[0], axes[1])
            if axes[2][np.argmax(np.abs(axes[2]))] < 0:
                axes[2] = -axes[2]
    else:
        first = "RAS".index(long_axis)
        axes = np.eye(3)[[first] + [i for i in range(3) if i != first]]
    proj = centred @ axes.T
    extent = np.stack([proj.min(axis=0), proj.max(axis=0)], axis=1)
    return Frame(centre, axes, extent, proj.std(axis=0))


@dataclass
class Views:
    """One pretext sample: a stack, the long-axis views that cut it, and the targets.

    ``stack_images`` is ``(n_stack, C, rows, cols)``; ``long_images`` one ``(C, rows, cols)`` per view;
    ``heatmaps`` is ``(n_stack, n_long, rows, cols)``: channel ``k`` of slice ``s`` is the ridge where
    long view ``k`` cuts slice ``s``; ``positions`` is ``(n_stack,)`` in ``[0, 1]``.
    """

    stack_images: np.ndarray
    long_images: list[np.ndarray]
    stack_planes: list[Plane]
    long_planes: list[Plane]
    heatmaps: np.ndarray
    positions: np.ndarray
    names: list[str]


def _rotate(v: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of ``v`` about unit ``axis``."""
    return v * np.cos(angle) + np.cross(axis, v) * np.sin(angle) + axis * (axis @ v) * (1 - np.cos(angle))


def _tilt(direction: np.ndarray, rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """``direction`` tilted by up to ``max_deg`` about a random perpendicular axis."""
    if max_deg <= 0:
        return direction
    perp = _unit(np.cross(direction, _unit(rng.normal(size=3))))
    return _unit(_rotate(direction, perp, np.deg2rad(rng.uniform(-max_deg, max_deg))))


def _targets(stack: list[Plane], views: list[Plane], sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = stack[0].size
    heat = np.zeros((len(stack), len(views), rows, cols), np.float32)
    for s, plane in enumerate(stack):
        for k, view in enumerate(views):
            heat[s, k] = line_heatmap(intersection_line(plane, view), (rows, cols), sigma_px)
    return heat, stack_positions(stack).astype(np.float32)


def sample_views(
    scan: Scan,
    rng: np.random.Generator,
    n_stack: int = 8,
    n_long: int = 2,
    size: Sequence[int] = (40, 40),
    spacing: float = 1.0,
    jitter_deg: float = 10.0,
    jitter_mm: float = 3.0,
    roll_deg: float = 30.0,
    sigma_px: float = 2.0,
    frame: Frame | None = None,
    margin: float = 0.1,
    order: int = 1,
    cval: float | None = None,
) -> Views:
    """A "short-axis" stack across the frame's longest axis and ``n_long`` "long-axis" views around it.

    The long views are placed on the anatomy, as a technician places them: view ``k`` contains the
    frame's long axis and its centre, turned about it by ``k * 180 / n_long`` degrees from the
    frame's second axis (two views lie 90 degrees apart like 2- and 4-chamber views). The stack is
    where the randomness goes, as a scanner's slice grid is not aligned to the anatomy: its normal
    is the long axis tilted by up to ``jitter_deg``, its centre moved by up to ``jitter_mm`` on each
    world axis and its pixel grid rolled by up to ``roll_deg`` about the normal. Each slice's lines
    therefore follow from what the slice shows (how the anatomy sits in it); jittering the views
    themselves would add noise no image reveals. The ``n_stack`` slices span the foreground along
    the axis less ``margin`` at each end. Pass ``frame`` to skip recomputing it (it costs more than
    a sample). The defaults suit hippocampus crops (~35 x 51 x 35 mm at 1 mm): a stack slice's
    cross-section is ~36 x 38 mm, so 40 x 40 px at the native 1 mm keeps the anatomy's scale for the
    segmentation network and wastes little on padding; the ridge's sigma of 2 px is the paper's 6 px
    at 224 px scaled to the image, kept above 1 px so the ridge stays learnable.
    Pixels outside the scan get ``cval``, by default the scan's minimum (its background, also when the
    intensities are z-scored).
    """
    if n_stack < 2 or n_long < 1:
        raise MedsightError("sample_views needs n_stack >= 2 and n_long >= 1")
    frame = anatomical_frame(scan) if frame is None else frame
    long_axis = frame.axes[0]
    views = []
    for k in range(n_long):
        phi = np.pi * k / n_long
        in_plane = -np.sin(phi) * frame.axes[1] + np.cos(phi) * frame.axes[2]
        views.append(Plane.centred(frame.centre, _unit(in_plane), long_axis, spacing, size))
    axis = _tilt(long_axis, rng, jitter_deg)
    e1 = _unit(frame.axes[1] - (frame.axes[1] @ axis) * axis)
    e1 = _rotate(e1, axis, np.deg2rad(rng.uniform(-roll_deg, roll_deg)))
    centre = frame.centre + rng.uniform(-jitter_mm, jitter_mm, 3)
    lo, hi = frame.extent[0]
    offsets = np.linspace(lo + margin * (hi - lo), hi - margin * (hi - lo), n_stack)
    stack = [Plane.centred(centre + t * axis, e1, np.cross(axis, e1), spacing, size) for t in offsets]
    heat, positions = _targets(stack, views, sigma_px)
    cval = float(np.nanmin(scan.array)) if cval is None else float(cval)
    return Views(
        np.stack([sample_plane(scan, p, order, cval) for p in stack]),
        [sample_plane(scan, p, order, cval) for p in views],
        stack,
        views,
        heat,
        positions,
        [f"view{k}" for k in range(n_long)],
    )


def _series_planes(folder: Path) -> tuple[Scan, list[Plane], set[str]]:
    """A one-series DICOM folder: the scan, its slices' planes from the tags (in the scan's order), FoR UIDs."""
    import pydicom

    from medsight.io import dicom

    scan = dicom.read(folder)
    files = dicom.list_series(folder)[0].files
    headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    planes = [Plane.from_dicom(h) for h in headers]
    normal = planes[0].normal
    planes.sort(key=lambda p: float(p.origin @ normal))
    return scan, planes, {str(h.get("FrameOfReferenceUID", "")) for h in headers}


def _regrid(image: np.ndarray, source: Plane, target: Plane, order: int = 1) -> np.ndarray:
    """An image ``(C, rows, cols)`` on ``source`` resampled in-plane on ``target`` (coplanar); 0 outside."""
    from scipy.ndimage import map_coordinates

    rows, cols = target.size
    grid = np.stack(np.mgrid[0:rows, 0:cols], axis=-1).astype(float)
    rc = world_to_pixel(source, pixel_to_world(target, grid)).reshape(-1, 2).T
    return np.stack(
        [map_coordinates(ch, rc, order=order, mode="constant").reshape(rows, cols) for ch in image]
    ).astype(np.float32)


def views_from_dicom_study(
    series_dirs: Sequence[Path | str],
    sigma_px: float = 6.0,
    spacing: float | None = None,
    size: Sequence[int] | None = None,
) -> Views:
    """Pretext sample from a real study: the stack is the series with most slices, each other series'
    central slice is a long-axis view; targets come from the DICOM tags.

    Every series must share one FrameOfReferenceUID. Series parallel to the stack cut it nowhere and
    are left out (their names are not in ``Views.names``); a study with none left is refused. With
    ``spacing`` (mm) and ``size`` (rows, cols), every image is resampled in its own plane onto a grid
    of that size about its centre (the paper: 1.26 mm, 224 x 224), and the targets follow that grid;
    without them images and targets stay on the native pixel grids.
    """
    if len(series_dirs) < 2:
        raise MedsightError("a DICOM study needs at least two series (a stack and a view)")
    if (spacing is None) != (size is None):
        raise MedsightError("give both spacing and size to resample the study, or neither")
    loaded = [(Path(d), *_series_planes(Path(d))) for d in series_dirs]
    frames = set().union(*(f for *_, f in loaded))
    if len(frames) != 1 or "" in frames:
        raise MedsightError(
            "these series do not share one FrameOfReferenceUID, so their planes cannot be related",
            Path(series_dirs[0]),
        )
    loaded.sort(key=lambda item: -len(item[2]))
    folder, scan, stack, _ = loaded[0]
    if len(stack) < 2:
        raise MedsightError("the stack series has a single slice", folder)

    def image_of(series: Scan, k: int) -> np.ndarray:
        return np.asarray(series.array[..., k], np.float32).transpose(
            0, 2, 1
        )  # (C, cols, rows) -> (C, rows, cols)

    def regridded(plane: Plane, image: np.ndarray) -> tuple[Plane, np.ndarray]:
        if spacing is None:
            return plane, image
        target = Plane.centred(plane.centre, plane.row_dir, plane.col_dir, spacing, size)
        return target, _regrid(image, plane, target)

    names, views, images = [], [], []
    for other_folder, other, planes, _ in loaded[1:]:
        k = len(planes) // 2
        if intersection_line(stack[0], planes[k]) is None:
            continue
        view, image = regridded(planes[k], image_of(other, k))
        names.append(other_folder.name)
        views.append(view)
        images.append(image)
    if not views:
        raise MedsightError(
            "no other series of this study is oblique to the stack (all parallel), so there are no true "
            "planes to learn from; convert its series to NIfTI (medsight convert) into one folder and "
            "pretrain on that folder: its volumes get sampled views",
            folder,
        )
    pairs = [regridded(p, image_of(scan, k)) for k, p in enumerate(stack)]
    stack = [plane for plane, _ in pairs]
    heat, positions = _targets(stack, views, sigma_px)
    return Views(np.stack([image for _, image in pairs]), images, stack, views, heat, positions, names)


# -- pretext accuracy ---------------------------------------------------------------------------


def line_from_heatmap(heatmap: np.ndarray) -> Line | None:
    """The line through a ridge: weighted PCA of the largest connected region at or above half the
    maximum (so a stray blob in a predicted map does not pull the line); None if the map is flat."""
    from scipy import ndimage

    h = np.asarray(heatmap, dtype=float)
    peak = h.max() if h.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        return None
    labels, n = ndimage.label(h >= peak / 2)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        labels = labels == int(sizes.argmax())
    rc = np.argwhere(labels > 0)
    if len(rc) < 2:
        return None
    w = h[tuple(rc.T)]
    centre = (rc * w[:, None]).sum(axis=0) / w.sum()
    d = rc - centre
    _, vectors = np.linalg.eigh((d * w[:, None]).T @ d)
    return Line(centre, vectors[:, -1])


def angle_error_deg(pred: Line | None, true: Line) -> float:
    """Undirected angle between two lines, in ``[0, 90]``; NaN when there is no predicted line."""
    if pred is None:
        return float("nan")
    cos = abs(float(pred.direction @ true.direction))
    return float(np.degrees(np.arccos(min(1.0, cos))))


def offset_error_px(pred: Line | None, true: Line, size: Sequence[int]) -> float:
    """Distance from the true line's point nearest the image centre to the predicted line (pixels)."""
    if pred is None:
        return float("nan")
    centre = (np.asarray(size, dtype=float) - 1) / 2
    foot = true.point + ((centre - true.point) @ true.direction) * true.direction
    return float(pred.distance(foot))


def position_error(pred, true) -> np.ndarray:
    """``|pred - true|`` per slice."""
    return np.abs(np.asarray(pred, dtype=float) - np.asarray(true, dtype=float))


def pretext_errors(pred_heatmaps, pred_positions, views: Views) -> dict[str, float]:
    """Pretext accuracy of one sample against its exact geometry (not against the target ridges).

    ``pred_heatmaps`` is ``(n_stack, n_long, rows, cols)`` and ``pred_positions`` ``(n_stack,)``, either
    may be None to skip it. Returns the mean ``angle_error_deg`` and ``offset_px`` over the maps that
    show a ridge, ``missed`` (how many were flat) and the mean ``position_error``.
    """
    out: dict[str, float] = {}
    if pred_heatmaps is not None:
        pred = np.asarray(pred_heatmaps, dtype=float)
        angles, offsets, missed = [], [], 0
        for s, plane in enumerate(views.stack_planes):
            for k, view in enumerate(views.long_planes):
                true = intersection_line(plane, view)
                found = line_from_heatmap(pred[s, k])
                if true is None:
                    continue
                if found is None:
                    missed += 1
                    continue
                angles.append(angle_error_deg(found, true))
                offsets.append(offset_error_px(found, true, plane.size))
        out["angle_error_deg"] = float(np.mean(angles)) if angles else float("nan")
        out["offset_px"] = float(np.mean(offsets)) if offsets else float("nan")
        out["missed"] = float(missed)
    if pred_positions is not None:
        out["position_error"] = float(position_error(pred_positions, views.positions).mean())
    return out
