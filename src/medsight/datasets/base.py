"""Case and Dataset: what a layout finds on disk, read lazily and never converted.

A :class:`Case` only holds paths (one image file per channel, or one multi-channel file) plus
an optional label path, text and split. :meth:`Dataset.load_case` reads them through
:func:`medsight.io.read` and stacks the channels channel-first into one :class:`Scan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsight.errors import MedsightError
from medsight.scan import Scan, require_finite

PICTURE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".gif")

# Split names a layout may report, normalised so splitting code has one vocabulary.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "tr": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
    "ts": "test",
}


def normalise_split(name: str | None) -> str | None:
    if name is None or str(name).strip() == "" or str(name).lower() == "nan":
        return None
    key = str(name).strip().lower()
    return SPLIT_ALIASES.get(key, key)


@dataclass
class Case:
    case_id: str
    images: list[Path]
    label: Path | None = None
    text: str | None = None
    split: str | None = None


@dataclass
class Dataset:
    """A dataset as found on disk.

    ``labels`` maps label value -> name (0 is background); an empty dict means the layout does not
    declare its classes (the values are then discovered by :func:`medsight.datasets.fingerprint`).
    ``label_mapping`` maps raw stored values to class values (e.g. ``{255: 1}`` for 0/255 PNG
    masks); :meth:`load_case` applies it, the fingerprint reports raw values.
    ``expects_labels`` is False for image-only manifests, so a missing label is not a problem there.
    """

    root: Path
    layout: str
    cases: list[Case] = field(repr=False)
    labels: dict[int, str] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=list)
    modality: str | None = None
    dim: int = 3
    label_mapping: dict[int, int] = field(default_factory=dict)
    expects_labels: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    @property
    def splits(self) -> dict[str | None, list[str]]:
        """Case ids per split as the layout gives them (``None`` when the layout has no split)."""
        out: dict[str | None, list[str]] = {}
        for case in self.cases:
            out.setdefault(case.split, []).append(case.case_id)
        return out

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise MedsightError(f"no case '{case_id}' in this {self.layout} dataset", self.root)

    # -- reading ------------------------------------------------------------------------
    def read_image(self, case: Case) -> Scan:
        """All channels of ``case`` stacked channel-first; they must share one geometry."""
        from medsight import io

        if not case.images:
            raise MedsightError(f"case '{case.case_id}' lists no image", self.root)
        # every reader of training images comes through here: a NaN voxel is refused before any step
        scans = [require_finite(io.read(path), case.case_id) for path in case.images]
        first = scans[0]
        for path, scan in zip(case.images[1:], scans[1:], strict=True):
            if not first.same_geometry(scan):
                raise MedsightError(
                    f"channel geometry differs from {case.images[0].name} "
                    f"(shape {list(scan.spatial_shape)} vs {list(first.spatial_shape)}, or affine)",
                    path,
                )
        if len(scans) == 1:
            return first
        stacked = np.concatenate([s.array for s in scans], axis=0)
        return Scan(
            stacked, first.affine, {**first.meta, "channel_files": [str(p) for p in case.images]}, first.path
        )

    def read_label(self, case: Case, raw: bool = False) -> Scan | None:
        """The label map as one channel; ``raw=False`` applies ``label_mapping`` and makes integral
        float labels integer (some datasets store class values as float32)."""
        from medsight import io

        if case.label is None:
            return None
        scan = io.read(case.label)
        arr = scan.array
        if arr.shape[0] > 1:
            # RGB-saved masks repeat the same values in every channel; anything else is not a label map.
            if not all(np.array_equal(arr[0], arr[c]) for c in range(1, arr.shape[0])):
                raise MedsightError(
                    f"label has {arr.shape[0]} differing channels; expected one label map", case.label
                )
            arr = arr[:1]
        if raw:
            return scan.with_array(arr)
        if (
            np.issubdtype(arr.dtype, np.floating)
            and np.all(np.isfinite(arr))
            and np.all(arr == np.round(arr))
        ):
            arr = arr.astype(np.int16 if arr.min() < 0 or arr.max() > 255 else np.uint8)
        if self.label_mapping:
            mapped = arr.copy()
            for source, target in self.label_mapping.items():
                mapped[arr == source] = target
            arr = mapped
        return scan.with_array(arr)

    def load_case(self, case: Case) -> tuple[Scan, Scan | None]:
        """(image, label) for ``case``; the label has ``label_mapping`` applied and is put on the
        image's grid (:func:`medsight.scan.align_to`: a LAS label on an LPS image is resampled, a
        label elsewhere in space or covering only part of the image is refused)."""
        from medsight.scan import align_to

        image = self.read_image(case)
        label = self.read_label(case)
        if label is not None:
            label = align_to(label, image, "label", "image", cover=True)
        return image, label


def dim_from_suffix(path: Path) -> int:
    """2 for pictures, 3 otherwise (NIfTI, NRRD, NumPy volumes)."""
    from medsight.io import suffix_of

    return 2 if suffix_of(path) in PICTURE_SUFFIXES else 3
