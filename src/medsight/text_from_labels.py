"""Honest sentences from expert labels, for datasets without report text (image-text pairs for captioning).

For every named label value the sentence states only what the label map shows:

- **which** structure: its name;
- **where**: the offset of its centroid from a reference point (the image centre by default, or the
  centroid of all labelled voxels, or a given world point). 3D scans use RAS+ world coordinates from
  the affine, so the words are the patient's: world ``-x`` is the patient's *right*, ``+x`` left,
  ``+y`` anterior, ``-y`` posterior, ``+z`` superior, ``-z`` inferior. An axis gets a word only when the
  offset exceeds ``tolerance`` (default 10 %) of the image's world extent along it; otherwise the
  structure is central along that axis. 2D scans are pictures: rows give *upper* (low row index) /
  *lower*, columns the viewer's *left* / *right*. To describe one slice of a volume in the
  patient's words, pass it as a 3D scan with a single slice and its affine;
- **how large**: volume (mm^3, 3D) or area (mm^2, 2D; pixels when the spacing is 1) binned as
  *small* / *medium-sized* / *large* with per-structure thresholds the caller states, typically the
  terciles of that structure's size over the training set (:func:`tercile_bins`); without
  thresholds the size clause is left out;
- **how many pieces**: connected components with full connectivity (8 in 2D, 26 in 3D), so
  voxels touching at a corner count as one piece.

Example: ``the anterior hippocampus lies on the right side, anterior and inferior; it is large;
one piece``. Structures are separated by ``. ``; a named structure missing from the map gives
``no <name> is visible``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medsight.errors import MedsightError
from medsight.scan import Scan

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
WORLD_WORDS = (("right", "left"), ("posterior", "anterior"), ("inferior", "superior"))  # (-, +) per RAS axis

__all__ = ["LabelFacts", "describe_labels", "label_facts", "label_sizes", "tercile_bins"]


@dataclass(frozen=True)
class LabelFacts:
    name: str
    present: bool
    where: tuple[str, ...] = ()  # direction words, RAS order (3D) or (row, column) order (2D)
    size: float = 0.0  # mm^3 (3D) or mm^2 (2D)
    pieces: int = 0


def _voxel_size(scan: Scan) -> float:
    cols = scan.affine[:3, : scan.ndim]
    if scan.ndim == 3:
        return float(abs(np.linalg.det(cols)))
    return float(np.linalg.norm(np.cross(cols[:, 0], cols[:, 1])))


def _label_array(labels: Scan) -> np.ndarray:
    if labels.channels != 1:
        raise MedsightError(f"a label map has one channel, this one has {labels.channels}", labels.path)
    return np.asarray(labels.array[0])


def _where_3d(labels: Scan, mask: np.ndarray, ref: np.ndarray, tolerance: float) -> tuple[str, ...]:
    centroid = labels.voxel_to_world(np.argwhere(mask).mean(axis=0))
    # world extent of the image box: each voxel axis contributes |column| * length to every world axis
    extent = np.abs(labels.affine[:3, :3]) @ np.asarray(labels.spatial_shape, dtype=float)
    offset = centroid - ref
    return tuple(
        words[int(d > 0)]
        for d, e, words in zip(offset, extent, WORLD_WORDS, strict=True)
        if abs(d) > tolerance * e
    )


def _where_2d(labels: Scan, mask: np.ndarray, ref: np.ndarray, tolerance: float) -> tuple[str, ...]:
    offset = np.argwhere(mask).mean(axis=0) - ref
    words = (("upper", "lower"), ("left", "right"))
    shape = labels.spatial_shape
    return tuple(
        w[int(d > 0)] for d, n, w in zip(offset, shape, words, strict=True) if abs(d) > tolerance * n
    )


def _reference(labels: Scan, arr: np.ndarray, reference: str | Sequence[float]) -> np.ndarray:
    if not isinstance(reference, str):
        return np.asarray(reference, dtype=float)
    if reference == "image":
        centre = (np.asarray(labels.spatial_shape, dtype=float) - 1) / 2
    elif reference == "foreground":
        if not (arr > 0).any():
            return np.zeros(3 if labels.ndim == 3 else 2)  # unused: nothing is present
        centre = np.argwhere(arr > 0).mean(axis=0)
    else:
        raise MedsightError(f"reference must be 'image', 'foreground' or a point, got {reference!r}")
    return labels.voxel_to_world(centre) if labels.ndim == 3 else centre


def label_facts(
    labels: Scan,
    names: Mapping[int, str],
    reference: str | Sequence[float] = "image",
    tolerance: float = 0.1,
) -> list[LabelFacts]:
    """What :func:`describe_labels` says, as data: one :class:`LabelFacts` per named value.

    A point ``reference`` is in world mm (3D) or in (row, column) pixels (2D).
    """
    from scipy import ndimage

    arr = _label_array(labels)
    ref = _reference(labels, arr, reference)
    where = _where_3d if labels.ndim == 3 else _where_2d
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    facts = []
    for value, name in names.items():
        mask = arr == value
        if not mask.any():
            facts.append(LabelFacts(name, False))
            continue
        pieces = int(ndimage.label(mask, structure)[1])
        size = float(mask.sum()) * _voxel_size(labels)
        facts.append(LabelFacts(name, True, where(labels, mask, ref, tolerance), size, pieces))
    return facts


def _where_phrase(words: tuple[str, ...], picture: bool) -> str:
    if not words:
        return "in the centre" if picture else "centrally"
    if picture:
        return f"in the {' '.join(words)} part"
    side = [w for w in words if w in ("left", "right")]
    rest = [w for w in words if w not in ("left", "right")]
    parts = [f"on the {side[0]} side"] if side else []
    if rest:
        parts.append(" and ".join(rest))
    return ", ".join(parts)


def describe_labels(
    labels: Scan,
    names: Mapping[int, str],
    size_bins: Mapping[str, tuple[float, float]] | None = None,
    reference: str | Sequence[float] = "image",
    tolerance: float = 0.1,
) -> str:
    """One sentence per named structure, joined by ``. ``; see the module docstring.

    ``size_bins[name] = (small_below, large_above)`` in mm^3 (3D) or mm^2 (2D).
    """
    picture = labels.ndim == 2
    clauses = []
    for fact in label_facts(labels, names, reference, tolerance):
        if not fact.present:
            clauses.append(f"no {fact.name} is visible")
            continue
        parts = [f"the {fact.name} lies {_where_phrase(fact.where, picture)}"]
        if size_bins and fact.name in size_bins:
            small, large = size_bins[fact.name]
            parts.append(
                "it is "
                + ("small" if fact.size < small else "large" if fact.size > large else "medium-sized")
            )
        count = NUMBER_WORDS[fact.pieces] if fact.pieces < len(NUMBER_WORDS) else str(fact.pieces)
        parts.append(f"{count} piece" + ("" if fact.pieces == 1 else "s"))
        clauses.append("; ".join(parts))
    return ". ".join(clauses)


def label_sizes(labels: Scan, names: Mapping[int, str]) -> dict[str, float]:
    """Volume (mm^3) or area (mm^2) of every named structure present in ``labels``."""
    arr = _label_array(labels)
    voxel = _voxel_size(labels)
    return {
        name: float((arr == value).sum()) * voxel for value, name in names.items() if (arr == value).any()
    }


def tercile_bins(sizes: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float]]:
    """Per structure the 1/3 and 2/3 quantiles of its sizes over a dataset: small / medium / large in thirds."""
    out = {}
    for name, values in sizes.items():
        values = np.asarray(values, dtype=float)
        if values.size:
            out[name] = (float(np.quantile(values, 1 / 3)), float(np.quantile(values, 2 / 3)))
    return out
