"""Parallel folders: an image folder beside a label folder (DRIVE, Kvasir, most 2D challenge sets).

``images/`` holds the pictures and a label folder the annotations, one file per image, either at the
root or in each split folder (``training/``, ``test/``...). Label folders are named for manual
annotation (``1st_manual``, ``manual``, ``labels``, ``groundtruth``, ``gt``, ``annotations``,
``segmentations``) or ``masks``/``mask``. When both kinds exist, as in DRIVE, ``mask/`` is the
field-of-view mask (the camera's disc), not a label: it is kept in ``extra["fov_masks"]`` (case id -> file).
A second annotator's folder (``2nd_manual``) is ignored.

Files pair by name: the same stem, the stem plus ``_mask``/``_label``/``_seg`` (or a ``mask_``
prefix), or failing that the same leading number (DRIVE's ``21_training.tif`` and
``21_manual1.gif``). Picture labels stored 0/255 are mapped to 0/1.
"""

from __future__ import annotations

import re
from pathlib import Path

from medsight.datasets.base import Case, Dataset, dim_from_suffix, normalise_split
from medsight.datasets.folders import (
    _make_ids_unique,
    _picture_channel_names,
    _scan_files,
    _stem,
    split_folders,
)

IMAGE_FOLDERS = ("images", "image", "imgs")
LABEL_FOLDERS = (
    "1st_manual",
    "manual",
    "manual1",
    "labels",
    "label",
    "groundtruth",
    "ground_truth",
    "gt",
    "annotations",
    "segmentations",
    "segmentation",
    "masks",
    "mask",
)  # fmt: skip, in order of preference
FOV_FOLDERS = ("mask", "masks", "fov", "roi")
_LABEL_AFFIXES = ("_mask", "_label", "_labels", "_seg", "_gt", "_manual1", "-mask", "-label")
_LEADING_NUMBER = re.compile(r"^(\d+)(?:[_\-.]|$)")


def _child(folder: Path, names: tuple[str, ...]) -> Path | None:
    by_name = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else {}
    return next((by_name[n] for n in names if n in by_name), None)


def _image_folder(base: Path) -> Path | None:
    folder = _child(base, IMAGE_FOLDERS)
    return folder if folder is not None and _scan_files(folder) else None


def _groups(root: Path) -> list[tuple[str | None, tuple[Path, Path | None, Path | None]]]:
    """(split, (images, labels, field of view)) at the root or per split folder. The label folder is
    the preferred name found in any split, so a test split without annotations has no label folder
    (rather than its field-of-view masks being taken for labels)."""
    if not root.is_dir():
        return []
    candidates = [(None, root)] + [(normalise_split(c.name), c) for c in split_folders(root)]
    bases = [(split, base, images) for split, base in candidates if (images := _image_folder(base))]
    if bases and bases[0][0] is None:  # images/ at the root: its subfolders are not splits
        bases = bases[:1]
    present = {p.name.lower() for _, base, _ in bases for p in base.iterdir() if p.is_dir()}
    label_name = next((name for name in LABEL_FOLDERS if name in present), None)
    if label_name is None:
        return []
    fov_names = tuple(n for n in FOV_FOLDERS if n != label_name)
    return [
        (split, (images, _child(base, (label_name,)), _child(base, fov_names)))
        for split, base, images in bases
    ]


def is_parallel_folders(root: Path) -> bool:
    return bool(_groups(root))


def _partner(image: Path, candidates: list[Path]) -> Path | None:
    """The file in ``candidates`` that annotates ``image`` (see the module docstring)."""
    stem = _stem(image.name).lower()
    by_stem = {_stem(p.name).lower(): p for p in candidates}
    for key in (stem, *(stem + a for a in _LABEL_AFFIXES), f"mask_{stem}"):
        if key in by_stem:
            return by_stem[key]
    number = _LEADING_NUMBER.match(stem)
    if number:
        same = [p for p in candidates if _LEADING_NUMBER.match(_stem(p.name)) and
                _LEADING_NUMBER.match(_stem(p.name))[1] == number[1]]  # fmt: skip
        if len(same) == 1:
            return same[0]
    return None


def open_parallel_folders(root: Path, labels=None, modality=None, label_mapping=None) -> Dataset:
    cases: list[Case] = []
    fovs: list[Path | None] = []
    for split, (images, label_dir, fov_dir) in _groups(root):
        label_files = _scan_files(label_dir) if label_dir else []
        fov_files = _scan_files(fov_dir) if fov_dir else []
        for image in _scan_files(images):
            label = _partner(image, label_files)
            if label is None and label_dir:  # named as its image: the fingerprint reports it missing
                label = label_dir / image.name
            cases.append(Case(_stem(image.name), [image], label, None, split))
            fovs.append(_partner(image, fov_files))
    _make_ids_unique(cases)
    fov_masks = {case.case_id: str(fov) for case, fov in zip(cases, fovs, strict=True) if fov is not None}
    first = cases[0].images[0] if cases else None
    dim = dim_from_suffix(first) if first else 2
    if label_mapping is None:
        label_mapping = {255: 1} if dim == 2 else {}
    return Dataset(
        root=root,
        layout="parallel-folders",
        cases=cases,
        labels=dict(labels) if labels is not None else {},
        channel_names=_picture_channel_names(first) if dim == 2 else ["image"],
        modality=modality,
        dim=dim,
        label_mapping=dict(label_mapping),
        extra={"fov_masks": fov_masks},
    )
