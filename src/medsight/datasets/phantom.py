"""Synthetic image-label-text triples, so every method can run without outside data.

A 3D phantom is an abdomen-like MRI volume: an organically deformed ellipsoidal body with a bright
subcutaneous fat rim, an unlabelled organ, and labelled structures (1 cyst, 2 vessel, 3 tumour with
one to three foci) at random positions per seed. Tissues get MRI-like intensities, partial-volume
blur, a smooth multiplicative bias field and Rician noise; the affine carries anisotropic spacing.

A 2D phantom is an H&E-like microscopy tile: pink stroma and purple nuclei (label 1), mixed with
Beer-Lambert stain vectors, with nuclei denser in one random region, as in MoNuSeg.

The text of every phantom comes from :func:`describe`, which reads only the label map, so the
image-text pair is honest: what the sentence says is what the mask shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsight.errors import MedsightError
from medsight.scan import Scan

LABELS_3D: dict[int, str] = {1: "cyst", 2: "vessel", 3: "tumour"}
LABELS_2D: dict[int, str] = {1: "nucleus"}

# T1-weighted, contrast-enhanced abdominal MRI, arbitrary units: fat bright, fluid dark, enhancing vessel brightest.
TISSUE_INTENSITY_3D: dict[str, float] = {
    "air": 0.0,
    "fat": 900.0,
    "parenchyma": 420.0,
    "organ": 560.0,
    "cyst": 120.0,
    "vessel": 1000.0,
    "tumour": 300.0,
}

# Further MRI contrasts for multi-channel (BraTS-style) phantoms, after channel 0 (the T1c table above):
# T1 (no enhancement: the vessel is not bright), T2 and FLAIR (fluid bright on T2, dark on FLAIR;
# the tumour bright on both, as oedema is).
EXTRA_CONTRASTS_3D: dict[str, dict[str, float]] = {
    "T1": {**TISSUE_INTENSITY_3D, "vessel": 380.0, "tumour": 330.0},
    "T2": {**TISSUE_INTENSITY_3D, "fat": 700.0, "parenchyma": 300.0, "cyst": 1100.0, "tumour": 800.0},
    "FLAIR": {**TISSUE_INTENSITY_3D, "fat": 600.0, "parenchyma": 350.0, "cyst": 80.0, "tumour": 950.0},
}
CHANNEL_NAMES_3D = ("T1c", *EXTRA_CONTRASTS_3D)

# Optical-density stain vectors (RGB) of haematoxylin and eosin (Ruifrok & Johnston 2001).
_HAEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.07, 0.99, 0.11])

_PLURALS = {"nucleus": "nuclei", "focus": "foci"}
_NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


# -- shapes ------------------------------------------------------------------------------------
def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A uniformly random rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _tilted_rotation(rng: np.random.Generator, max_tilt: float) -> np.ndarray:
    """A 3D rotation that tilts the z axis by at most ``max_tilt`` radians (vessels run head-to-foot)."""
    spin, tilt, azimuth = rng.uniform(0, 2 * np.pi), rng.uniform(0, max_tilt), rng.uniform(0, 2 * np.pi)

    def about_z(a: float) -> np.ndarray:
        return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])

    about_x = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    return about_z(azimuth) @ about_x @ about_z(spin)


class _SmoothNoise:
    """A smooth zero-mean, unit-variance random function: a sum of random plane waves.

    ``frequency`` is the typical number of cycles per unit of the coordinates it is evaluated on.
    Cheaper than filtering white noise, and defined everywhere, so a shape's deformation can live in
    the shape's own frame.
    """

    def __init__(self, rng: np.random.Generator, ndim: int, frequency: float, terms: int = 12):
        self.waves = rng.standard_normal((terms, ndim)) * (2 * np.pi * frequency / np.sqrt(ndim))
        self.phases = rng.uniform(0, 2 * np.pi, terms)

    def on_grid(self, axes, matrix: np.ndarray) -> np.ndarray:
        """Evaluate at ``x @ matrix`` for every ``x`` of the grid spanned by the 1-D coordinate ``axes``.

        The coordinates are linear in the grid, so each wave factorises into one complex exponential
        per axis: a few broadcast products instead of a cosine per voxel and wave.
        """
        gains = np.asarray(matrix, dtype=float) @ self.waves.T  # (grid axes, terms)
        n = len(axes)
        field = np.exp(1j * self.phases).astype(np.complex64).reshape(-1, *[1] * n)
        for e, ax in enumerate(axes):
            shape = [-1] + [1] * n
            shape[e + 1] = len(ax)
            field = field * np.exp(1j * np.outer(gains[e], ax)).astype(np.complex64).reshape(shape)
        return field.real.sum(axis=0) * np.sqrt(2.0 / len(self.phases))


class _Blob:
    """An ellipsoid whose surface is pushed in and out by smooth noise defined in its own frame.

    With normalised coordinates ``q = R^T (x - c) / r``, a point is inside when
    ``|q| < 1 + roughness * noise(q)``; ``frequency`` sets how lumpy the surface is.
    """

    def __init__(
        self, rng: np.random.Generator, radii_mm, rotation: np.ndarray, roughness: float, frequency: float
    ):
        self.radii = np.asarray(radii_mm, dtype=float)
        self.rotation = rotation
        self.roughness = roughness
        self.noise = _SmoothNoise(rng, len(self.radii), frequency)

    def scaled(self, factor: float) -> _Blob:
        """The same shape, every radius times ``factor``."""
        if factor == 1.0:
            return self
        shrunk = object.__new__(_Blob)
        shrunk.__dict__.update(self.__dict__, radii=self.radii * factor)
        return shrunk

    def mask(self, shape, spacing, centre_mm) -> np.ndarray:
        spacing = np.asarray(spacing, dtype=float)
        reach = self.radii.max() * (1 + 3 * self.roughness) + spacing.max()
        lo = np.maximum(np.floor((np.asarray(centre_mm) - reach) / spacing).astype(int), 0)
        hi = np.minimum(np.ceil((np.asarray(centre_mm) + reach) / spacing).astype(int) + 1, shape)
        out = np.zeros(shape, dtype=bool)
        if np.any(hi <= lo):
            return out
        axes = [np.arange(a, b) * s - c for a, b, s, c in zip(lo, hi, spacing, centre_mm, strict=True)]
        to_frame = self.rotation / self.radii[None, :]  # offset (row) @ to_frame = q
        n = len(axes)
        rho2 = 0.0
        for d in range(n):
            q_d = sum(
                ax.reshape([-1 if k == e else 1 for k in range(n)]) * to_frame[e, d]
                for e, ax in enumerate(axes)
            )
            rho2 = rho2 + q_d**2
        inside = np.sqrt(rho2) < 1.0 + self.roughness * self.noise.on_grid(axes, to_frame)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        out[box] = _largest_component(inside)
        return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep one solid piece: a structure the generator calls one focus must be one component."""
    from scipy import ndimage

    components, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if n == 0:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return ndimage.binary_fill_holes(components == (np.argmax(sizes) + 1))


def _smooth_field(rng: np.random.Generator, shape, cycles: float) -> np.ndarray:
    """Smooth random field over the grid with about ``cycles`` undulations across it, unit std."""
    axes = [np.linspace(0.0, 1.0, n) for n in shape]
    return _SmoothNoise(rng, len(shape), cycles).on_grid(axes, np.eye(len(shape)))


def _place(
    rng: np.random.Generator,
    blob_for_scale,
    allowed: np.ndarray,
    occupied: np.ndarray,
    spacing,
    min_voxels: int,
    what: str,
    attempts: int = 80,
) -> np.ndarray:
    """Drop a blob at random allowed centres until it fits inside ``allowed`` without touching ``occupied``.

    A blob too small to cover ``min_voxels`` grows; one that keeps colliding shrinks every 20 tries,
    so small or crowded phantoms still get every structure.
    """
    from scipy import ndimage

    forbidden = ndimage.binary_dilation(occupied, structure=np.ones((3,) * occupied.ndim)) | ~allowed
    candidates = np.argwhere(allowed)
    if len(candidates) == 0:
        raise MedsightError(f"phantom too small to hold a {what}; use a larger shape")
    scale, collisions = 1.0, 0
    for _ in range(attempts):
        centre = (candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, allowed.ndim)) * spacing
        mask = blob_for_scale(scale).mask(allowed.shape, spacing, centre)
        if mask.sum() < min_voxels:
            scale *= 1.15
        elif (mask & forbidden).any():
            collisions += 1
            if collisions % 20 == 0:
                scale *= 0.8
        else:
            return mask
    raise MedsightError(f"could not fit a {what} into the phantom; use a larger shape or fewer structures")


def _checked_grid(shape, spacing, ndim: int, min_size: int) -> tuple[tuple[int, ...], np.ndarray]:
    """``shape`` as ints and ``spacing`` as floats, refused unless ``ndim`` sizes >= ``min_size`` and
    positive spacing."""
    shape, spacing = tuple(int(s) for s in shape), np.asarray(spacing, dtype=float)
    if len(shape) != ndim or len(spacing) != ndim or min(shape) < min_size or np.any(spacing <= 0):
        count = {2: "two", 3: "three"}[ndim]
        raise MedsightError(
            f"{ndim}D phantom needs {count} sizes >= {min_size} and positive spacing, got {shape}, "
            f"{tuple(spacing)}"
        )
    return shape, spacing


def _phantom_scans(image, label, affine, facts: dict, names: dict[int, str]) -> tuple[Scan, Scan, str]:
    """The ``(image, label, text)`` triple on one affine; each scan's meta holds its own copy of ``facts``."""
    image_scan = Scan(image, affine, meta={"phantom": facts})
    label_scan = Scan.from_spatial(label, affine.copy(), meta={"phantom": dict(facts)})
    return image_scan, label_scan, describe(label_scan, names=names)


# -- 3D ------------------------------------------------------------------------------------------
def make_phantom_3d(
    seed: int,
    shape: tuple[int, int, int] = (64, 64, 40),
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
    n_structures: int = 3,
    *,
    noise: float = 25.0,
    bias: float = 0.2,
    channels: int = 1,
) -> tuple[Scan, Scan, str]:
    """An abdomen-like MRI phantom: ``(image, label, text)``.

    ``channels`` (1..4) MRI contrasts of the same anatomy, in the order of :data:`CHANNEL_NAMES_3D`
    (T1c, T1, T2, FLAIR, as BraTS stacks them), sharing the bias field, each with its own noise;
    channel 0 is the same whatever ``channels`` is.

    ``n_structures`` (1..3) labels are used, in the order of :data:`LABELS_3D`; every one is present.
    ``noise`` is the Rician sigma in intensity units; ``bias`` the log-amplitude of the linear part of the
    multiplicative bias field (the field is ``exp(bias * (ramp + 0.3 * smooth noise))``). Voxel axes
    are RAS (i to the patient's right, j anterior, k superior); the volume is centred on world 0.
    """
    shape, spacing = _checked_grid(shape, spacing, 3, 8)
    if not 1 <= n_structures <= len(LABELS_3D):
        raise MedsightError(f"n_structures must be 1..{len(LABELS_3D)}, got {n_structures}")
    if not 1 <= channels <= len(CHANNEL_NAMES_3D):
        raise MedsightError(f"channels must be 1..{len(CHANNEL_NAMES_3D)}, got {channels}")
    rng = np.random.default_rng(seed)
    tissues, scale = _abdomen(rng, shape, spacing)
    label = _structures(rng, n_structures, tissues["allowed"], spacing, scale)

    # Tissue intensities with mild texture, then partial-volume blur, bias field and Rician noise.
    textures = _smooth_field(rng, shape, cycles=3), _smooth_field(rng, shape, cycles=5)
    bias_field = _bias_field(rng, shape, spacing, bias)
    # Channel 0 draws exactly what a one-channel phantom draws; the other contrasts draw afterwards.
    contrasts = [TISSUE_INTENSITY_3D, *list(EXTRA_CONTRASTS_3D.values())[: channels - 1]]
    image = np.stack(
        [_rician(rng, _contrast(t, tissues, label, textures, spacing) * bias_field, noise) for t in contrasts]
    )

    affine = Scan.affine_from_spacing(spacing, origin=-(np.asarray(shape) - 1) / 2 * spacing)
    names = {v: LABELS_3D[v] for v in range(1, n_structures + 1)}
    facts = {"seed": int(seed), "labels": names, "noise": noise, "bias": bias, "modality": "MRI"}
    return _phantom_scans(image, label, affine, facts, names)


def _abdomen(rng: np.random.Generator, shape, spacing: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    """The body's tissue masks (``fat`` rim, ``interior``, the unlabelled ``organ``, and ``allowed``: where
    structures may lie, clear of the rim) and the size scale of the structures."""
    from scipy import ndimage

    extent = np.asarray(shape) * spacing
    centre = extent / 2
    # Body: wider left-right than front-back, running past both ends of the stack like a real abdomen.
    body_radii = extent * np.array([0.44, 0.37, 0.75]) * rng.uniform(0.9, 1.0, 3)
    body = _Blob(rng, body_radii, _tilted_rotation(rng, 0.1), roughness=0.05, frequency=0.3).mask(
        shape, spacing, centre
    )
    depth = ndimage.distance_transform_edt(body, sampling=spacing)
    rim_mm = rng.uniform(2.5, 4.0)
    interior = body & (depth >= rim_mm)
    scale = min(body_radii[:2]) / 24.0  # structure sizes follow the body, so small or large shapes both work

    organ_centre = centre + extent * np.array([rng.choice([-0.12, 0.12]), rng.uniform(-0.05, 0.1), 0.0])
    organ = _Blob(rng, body_radii * [0.5, 0.55, 0.6], _random_rotation(rng, 3), 0.1, 0.35)
    tissues = {
        "fat": body & (depth < rim_mm),
        "interior": interior,
        "organ": organ.mask(shape, spacing, organ_centre) & interior,
        "allowed": body & (depth >= rim_mm + max(2 * spacing.min(), 1.0)),
    }
    return tissues, scale


def _structures(rng: np.random.Generator, n_structures: int, allowed, spacing, scale: float) -> np.ndarray:
    """The label map: every focus of the first ``n_structures`` of :data:`LABELS_3D` inside ``allowed``,
    none touching another."""
    label = np.zeros(allowed.shape, dtype=np.uint8)
    occupied = np.zeros(allowed.shape, dtype=bool)
    for value in range(1, n_structures + 1):
        name = LABELS_3D[value]
        for focus in _foci(rng, name, scale):
            mask = _place(rng, focus, allowed, occupied, spacing, min_voxels=6, what=name)
            label[mask] = value
            occupied |= mask
    return label


def _foci(rng: np.random.Generator, name: str, scale: float) -> list:
    """The shapes of one structure's foci, as ``scale -> _Blob`` for :func:`_place`: a roundish cyst,
    a vessel running head-to-foot, or one to three lumpy tumour foci."""
    if name == "cyst":
        radii = rng.uniform(3.5, 6.5) * scale * rng.uniform(0.85, 1.15, 3)
        return [_Blob(rng, radii, _random_rotation(rng, 3), 0.08, 0.3).scaled]
    if name == "vessel":
        radii = np.array([rng.uniform(2.5, 3.8), rng.uniform(2.5, 3.8), rng.uniform(14, 22)]) * scale
        return [_Blob(rng, radii, _tilted_rotation(rng, 0.5), 0.12, 0.4).scaled]
    foci = []
    for _ in range(int(rng.integers(1, 4))):
        radii = rng.uniform(2.5, 4.5) * scale * rng.uniform(0.7, 1.3, 3)
        foci.append(_Blob(rng, radii, _random_rotation(rng, 3), 0.3, 0.8).scaled)
    return foci


def _contrast(intensity: dict[str, float], tissues, label, textures, spacing: np.ndarray) -> np.ndarray:
    """One MRI contrast: each tissue at its ``intensity``, textured (``textures``: of the parenchyma and
    organ, of the tumour), blurred as partial volumes blur it."""
    from scipy import ndimage

    texture, lesion_texture = textures
    interior, organ = tissues["interior"], tissues["organ"]
    tissue = np.zeros(label.shape, dtype=np.float64)
    tissue[interior] = intensity["parenchyma"] * (1 + 0.04 * texture[interior])
    tissue[organ] = intensity["organ"] * (1 + 0.04 * texture[organ])
    tissue[tissues["fat"]] = intensity["fat"]
    for value, name in LABELS_3D.items():
        where = label == value
        heterogeneity = 0.12 if name == "tumour" else 0.0
        tissue[where] = intensity[name] * (1 + heterogeneity * lesion_texture[where])
    return ndimage.gaussian_filter(tissue, sigma=0.6 / spacing * spacing.min())


def _bias_field(rng: np.random.Generator, shape, spacing: np.ndarray, bias: float) -> np.ndarray:
    """``exp(bias * (ramp + 0.3 * smooth noise))``: the ramp runs along a random direction and is +-1
    at the volume's corners along it."""
    extent = np.asarray(shape) * spacing
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    grids = np.meshgrid(
        *[(np.arange(n) + 0.5) * s - c for n, s, c in zip(shape, spacing, extent / 2, strict=True)],
        indexing="ij",
    )
    ramp = sum(g * d for g, d in zip(grids, direction, strict=True)) / (np.abs(direction) @ (extent / 2))
    return np.exp(bias * (ramp + 0.3 * _smooth_field(rng, shape, cycles=1.5)))


def _rician(rng: np.random.Generator, signal: np.ndarray, noise: float) -> np.ndarray:
    """The magnitude of ``signal`` plus complex Gaussian noise of sigma ``noise``, as MRI measures it."""
    real = rng.standard_normal(signal.shape)
    imaginary = rng.standard_normal(signal.shape)
    return np.sqrt((signal + noise * real) ** 2 + (noise * imaginary) ** 2).astype(np.float32)


# -- 2D ------------------------------------------------------------------------------------------
def make_phantom_2d(
    seed: int,
    shape: tuple[int, int] = (128, 128),
    spacing: tuple[float, float] = (0.001, 0.001),
    n_structures: int | None = None,
    *,
    rgb: bool = True,
    noise: float = 0.04,
) -> tuple[Scan, Scan, str]:
    """An H&E-like microscopy tile: ``(image, label, text)`` with label 1 = nucleus.

    ``n_structures`` is the number of nuclei (random 15..30 when None); they crowd into one random
    region (a quadrant, a half, or nowhere in particular). ``spacing`` is in mm (default 1 um). With
    ``rgb`` the image is uint8 (3, rows, cols); without, one grey (brightfield luminance) uint8 channel.
    ``noise`` is the optical-density noise sigma.
    """
    shape, spacing = _checked_grid(shape, spacing, 2, 32)
    rng = np.random.default_rng(seed)
    count = int(rng.integers(15, 31)) if n_structures is None else int(n_structures)
    if count < 1:
        raise MedsightError(f"n_structures must be at least 1, got {count}")
    crowd = _crowded_region(rng, shape)
    scale = min(shape) / 128.0
    label = _nuclei(rng, count, crowd, spacing, scale)
    image = _stained(rng, label, scale, noise, rgb)

    affine = Scan.affine_from_spacing(spacing, origin=(0.01, 0.02))
    facts = {"seed": int(seed), "labels": dict(LABELS_2D), "modality": "H&E microscopy"}
    return _phantom_scans(image, label, affine, facts, LABELS_2D)


def _crowded_region(rng: np.random.Generator, shape) -> np.ndarray:
    """Where nuclei crowd: a quadrant, a half, or evenly, in image terms (row 0 is the top)."""
    rows, cols = np.indices(shape)
    regions = {
        "even": np.ones(shape, bool),
        "upper left": (rows < shape[0] / 2) & (cols < shape[1] / 2),
        "upper right": (rows < shape[0] / 2) & (cols >= shape[1] / 2),
        "lower left": (rows >= shape[0] / 2) & (cols < shape[1] / 2),
        "lower right": (rows >= shape[0] / 2) & (cols >= shape[1] / 2),
        "left": cols < shape[1] / 2,
        "right": cols >= shape[1] / 2,
    }
    return regions[list(regions)[rng.integers(len(regions))]]


def _nuclei(rng: np.random.Generator, count: int, crowd, spacing: np.ndarray, scale: float) -> np.ndarray:
    """The label map of ``count`` separate nuclei, 60% of them inside ``crowd`` when they fit there."""
    shape = crowd.shape
    edge = np.zeros(shape, bool)
    edge[3:-3, 3:-3] = True
    label = np.zeros(shape, dtype=np.uint8)
    occupied = np.zeros(shape, dtype=bool)
    for index in range(count):
        radii = rng.uniform(4.0, 6.5) * scale * np.array([1.0, rng.uniform(0.6, 0.95)])
        angle = rng.uniform(0, np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        blob = _Blob(rng, radii * spacing.min(), rotation, 0.12, 0.4)
        allowed = edge & (crowd if index < 0.6 * count else True)
        try:
            mask = _place(rng, blob.scaled, allowed, occupied, spacing, 6, "nucleus", attempts=40)
        except MedsightError:
            mask = _place(rng, blob.scaled, edge, occupied, spacing, 6, "nucleus")
        label[mask] = 1
        occupied |= mask
    return label


def _stained(
    rng: np.random.Generator, label: np.ndarray, scale: float, noise: float, rgb: bool
) -> np.ndarray:
    """The brightfield picture (uint8, RGB or grey luminance) of the tissue stained with H&E."""
    from scipy import ndimage

    shape = label.shape
    # Stain concentrations: eosin stroma with gaps of bare slide, haematoxylin-dense nuclei.
    stroma = np.clip(0.55 + 0.35 * _smooth_field(rng, shape, cycles=3), 0.0, 1.0)
    fibres = np.abs(_smooth_field(rng, shape, cycles=10))
    eosin = stroma * (0.5 + 0.25 * fibres)
    nucleus_density = ndimage.gaussian_filter(label.astype(float), 0.8 * scale)
    chromatin = 1 + 0.25 * _smooth_field(rng, shape, cycles=14)
    haematoxylin = 0.08 * stroma + 1.1 * nucleus_density * chromatin
    eosin = eosin * (1 - 0.6 * nucleus_density)
    od = haematoxylin[..., None] * _HAEMATOXYLIN + eosin[..., None] * _EOSIN
    od = od + noise * rng.standard_normal(od.shape)
    colour = np.clip(255 * np.exp(-np.clip(od, 0, None)), 0, 255)
    if rgb:
        return np.moveaxis(colour, -1, 0).round().astype(np.uint8)
    return (colour @ np.array([0.299, 0.587, 0.114]))[None].round().astype(np.uint8)


# -- text ----------------------------------------------------------------------------------------
def _plural(name: str) -> str:
    return _PLURALS.get(name, name + "s")


def _count_words(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _axis_words(affine: np.ndarray | None, ndim: int) -> list[tuple[str, str]]:
    """(low-index word, high-index word) per voxel axis.

    2D label maps follow picture convention (row 0 at the top). 3D maps follow the affine's world
    directions (RAS when none is given), so "right" means the patient's right.
    """
    if ndim == 2:
        return [("upper", "lower"), ("left", "right")]
    words_for_world = [("left", "right"), ("posterior", "anterior"), ("lower", "upper")]
    columns = np.eye(3) if affine is None else np.asarray(affine)[:3, :3]
    out = []
    for axis in range(3):
        world = int(np.argmax(np.abs(columns[:, axis])))
        low, high = words_for_world[world]
        out.append((low, high) if columns[world, axis] > 0 else (high, low))
    return out


def _order_key(word: str) -> int:
    # Radiology order: vertical, then lateral, then front-back ("upper right anterior").
    order = ["upper", "lower", "left", "right", "anterior", "posterior"]
    return order.index(word)


def _position(fractions, axis_words) -> str:
    words = []
    for f, (low, high) in zip(fractions, axis_words, strict=True):
        if f < 0.4:
            words.append(low)
        elif f > 0.6:
            words.append(high)
    return " ".join(sorted(words, key=_order_key)) if words else "central"


def _size(voxels: int, voxel_size: float, ndim: int) -> tuple[str, str]:
    """(volume or area, equivalent-sphere or circle diameter) as text."""
    amount = voxels * voxel_size
    if ndim == 3:
        ml = amount / 1000.0
        volume = f"{ml:.0f} mL" if ml >= 10 else f"{ml:.1f} mL" if ml >= 1 else f"{ml:.2f} mL"
        diameter = (6 * amount / np.pi) ** (1 / 3)
    else:
        volume = f"{amount:.1f} mm²" if amount >= 1 else f"{amount * 1e6:.0f} µm²"
        diameter = 2 * np.sqrt(amount / np.pi)
    if diameter >= 1 or ndim == 3:
        across = f"{diameter:.0f} mm" if diameter >= 10 else f"{diameter:.1f} mm"
    else:
        across = f"{diameter * 1000:.0f} µm"
    return volume, across


def _density_region(fractions: np.ndarray, axis_words) -> str | None:
    """Where component centroids crowd: a quadrant/octant, else a half, else None (even)."""
    n = len(fractions)
    high = fractions >= 0.5
    cells, counts = np.unique(high, axis=0, return_counts=True)
    best = int(np.argmax(counts))
    if counts[best] >= 1.75 * n / 2 ** fractions.shape[1]:
        words = [hi if bit else lo for bit, (lo, hi) in zip(cells[best], axis_words, strict=True)]
        return " ".join(sorted(words, key=_order_key))
    for axis, (low, high_word) in enumerate(axis_words):
        share = high[:, axis].mean()
        if share >= 0.65:
            return high_word
        if share <= 0.35:
            return low
    return None


def describe(label, spacing=None, names: dict[int, str] | None = None, *, affine=None) -> str:
    """A sentence about the structures in a label map: how many, how large, and where.

    ``label`` is a Scan (spacing and affine taken from it) or a spatial array (2D or 3D). Positions come
    from each component's centroid relative to the image extent (below 40% or above 60% along an
    axis gives a word). Sizes are volumes in mL (3D) or areas (2D) with the equivalent diameter.
    With more than three components of a label, the sentence says where they are densest instead.
    """
    from scipy import ndimage

    if isinstance(label, Scan):
        spacing = label.spacing if spacing is None else spacing
        affine = label.affine if affine is None else affine
        label = label.array[0]
    label = np.asarray(label)
    ndim = label.ndim
    if ndim not in (2, 3):
        raise MedsightError(f"describe needs a 2D or 3D label map, got shape {label.shape}")
    spacing = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=float)[:ndim]
    if names is None:
        names = {int(v): f"structure {int(v)}" for v in np.unique(label) if v != 0}
    voxel_size = float(np.prod(spacing))
    axis_words = _axis_words(affine, ndim)
    extent = np.asarray(label.shape, dtype=float)

    sentences = []
    for value, name in names.items():
        components, n = ndimage.label(label == value, structure=np.ones((3,) * ndim))
        if n == 0:
            sentences.append(f"No {name} is visible.")
            continue
        index = list(range(1, n + 1))
        sizes = ndimage.sum_labels(np.ones_like(components), components, index).astype(int)
        centroids = np.array(ndimage.center_of_mass(np.ones_like(components), components, index))
        fractions = (centroids + 0.5) / extent
        order = np.argsort(-sizes, kind="stable")
        if n == 1:
            volume, across = _size(int(sizes[0]), voxel_size, ndim)
            place = _position(fractions[0], axis_words)
            where = "in the centre" if place == "central" else f"in the {place} part"
            sentences.append(f"There is one {volume} {name} ({across} across) {where}.")
        elif n <= 3:
            volumes = [_size(int(sizes[i]), voxel_size, ndim)[0] for i in order]
            places = [_position(fractions[i], axis_words) for i in order]
            places = ["centre" if p == "central" else f"{p} part" for p in places]
            sentences.append(
                f"There are {_count_words(n)} {_plural(name)} ({', '.join(volumes[:-1])} and {volumes[-1]}) "
                f"in the {', '.join(places[:-1])} and {places[-1]}."
            )
        else:
            mean_size, _ = _size(int(round(sizes.mean())), voxel_size, ndim)
            region = _density_region(fractions, axis_words)
            crowd = (
                f"The {_plural(name)} density in the {region} is high"
                if region
                else f"The {_plural(name)} are evenly distributed"
            )
            sentences.append(
                f"{crowd} ({_count_words(n)} {_plural(name)}, mean {'volume' if ndim == 3 else 'area'} {mean_size})."
            )
    return " ".join(sentences)


# -- datasets on disk ----------------------------------------------------------------------------
def write_phantom_dataset(
    out_dir: str | Path,
    n_cases: int,
    dim: int = 3,
    seed: int = 0,
    layout: str | None = None,
    overwrite: bool = False,
    *,
    channels: int = 1,
    shape: tuple[int, int, int] | None = None,
    compress: bool = True,
) -> Path:
    """Write ``n_cases`` phantoms as a dataset the readers in :mod:`medsight.datasets` accept.

    3D uses the Medical Segmentation Decathlon layout (``layout="msd"``: dataset.json, imagesTr/, labelsTr/,
    plus texts.csv and a ``texts`` entry in dataset.json); 2D uses the LViT layout (``layout="lvit"``:
    Train_Folder/ and Val_Folder/ with img/, labelcol/ and a text sheet). Case ``i`` uses seed ``seed + i``.
    A non-empty ``out_dir`` is refused unless ``overwrite``; then only stale ``phantom_*`` files are removed.
    3D only: ``channels`` MRI contrasts per case (4 gives a BraTS-style T1c/T1/T2/FLAIR stack in one 4D
    NIfTI), ``shape`` the voxel grid (default that of :func:`make_phantom_3d`; any other shape is
    isotropic 1 mm), ``compress=False`` writes .nii instead of .nii.gz.
    """
    out_dir = Path(out_dir)
    layout = layout or ("msd" if dim == 3 else "lvit")
    if (dim, layout) not in ((3, "msd"), (2, "lvit")):
        raise MedsightError(
            f"phantom datasets are 3D in layout 'msd' or 2D in layout 'lvit', not {dim}D '{layout}'", out_dir
        )
    if n_cases < 1:
        raise MedsightError(f"need at least one case, got {n_cases}", out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MedsightError("exists and is not a folder", out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise MedsightError(
            "folder is not empty; pass --overwrite (or overwrite=True in Python) to write into it", out_dir
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if dim == 2 and (channels != 1 or shape is not None or not compress):
        raise MedsightError("channels, shape and compress apply to 3D phantoms only", out_dir)
    if layout == "msd":
        _write_msd(out_dir, n_cases, seed, channels, shape, ".nii.gz" if compress else ".nii")
    else:
        _write_lvit(out_dir, n_cases, seed)
    return out_dir


def _remove_stale(folder: Path, keep: set[str]) -> None:
    if folder.is_dir():
        for path in folder.glob("phantom_*"):
            if path.name not in keep and path.is_file():
                path.unlink()


def _write_msd(out_dir: Path, n_cases: int, seed: int, channels: int, shape, suffix: str) -> None:
    import csv
    import io as text_io
    import json

    from medsight import io

    grid = {} if shape is None else {"shape": tuple(shape), "spacing": (1.0, 1.0, 1.0)}
    training, texts = [], {}
    names = [f"phantom_{i:03d}{suffix}" for i in range(n_cases)]
    for sub in ("imagesTr", "labelsTr"):
        _remove_stale(out_dir / sub, set(names))
    for i, name in enumerate(names):
        image, label, text = make_phantom_3d(seed + i, channels=channels, **grid)
        io.write(image, out_dir / "imagesTr" / name, overwrite=True)
        io.write(label, out_dir / "labelsTr" / name, overwrite=True)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        texts[name.removesuffix(suffix)] = text
    manifest = {
        "name": "Phantom",
        "description": "Synthetic abdomen-like MRI phantoms generated by medsight (no patient data)",
        "reference": "medsight",
        "licence": "CC0 1.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"}
        if channels == 1
        else {str(i): n for i, n in enumerate(CHANNEL_NAMES_3D[:channels])},
        "labels": {"0": "background", **{str(k): v for k, v in LABELS_3D.items()}},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "texts": texts,
    }
    io.write_text(
        out_dir / "dataset.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", overwrite=True
    )
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "Description"])
    writer.writerows(texts.items())
    io.write_text(out_dir / "texts.csv", buffer.getvalue(), overwrite=True)


def _write_lvit(out_dir: Path, n_cases: int, seed: int) -> None:
    import pandas as pd

    from medsight import io

    n_val = max(1, round(0.2 * n_cases)) if n_cases >= 2 else 0
    splits = {"Train_Folder": range(n_cases - n_val), "Val_Folder": range(n_cases - n_val, n_cases)}
    for folder, indices in splits.items():
        if not indices:
            continue
        names = [f"phantom_{i:03d}.png" for i in indices]
        for sub in ("img", "labelcol"):
            _remove_stale(out_dir / folder / sub, set(names))
        rows = []
        for i, name in zip(indices, names, strict=True):
            image, label, text = make_phantom_2d(seed + i, rgb=True)
            io.write(image, out_dir / folder / "img" / name, overwrite=True)
            mask = label.with_array((label.array > 0).astype(np.uint8) * 255)
            io.write(mask, out_dir / folder / "labelcol" / name, overwrite=True)
            rows.append({"Image": name, "Description": text})
        sheet = out_dir / folder / f"{folder.split('_')[0]}_text.xlsx"
        with io.atomic_path(sheet, overwrite=True) as tmp:
            pd.DataFrame(rows, columns=["Image", "Description"]).to_excel(
                tmp, index=False, sheet_name="Sheet1"
            )
