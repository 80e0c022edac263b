"""Image/mask pairs in one folder, named ``<case>_image.<ext>`` and ``<case>_label.<ext>`` (or
``_mask``, ``_seg``, ``_segmentation``), as pyradiomics' examples and many radiomics sets store them.

Every ``*_image`` file is a case; its label is the file with the same case name and a label word.
Other files in the folder are ignored. Split folders (``train/``, ``test/``) holding such pairs work too.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from medsight.datasets.base import Case, Dataset, dim_from_suffix, normalise_split
from medsight.datasets.folders import (
    _make_ids_unique,
    _picture_channel_names,
    _scan_files,
    _stem,
    split_folders,
)
from medsight.io import suffix_of

_IMAGE = re.compile(r"^(?P<case>.+?)[_\-]image$", re.IGNORECASE)
LABEL_WORDS = ("label", "mask", "seg", "segmentation")


def _pairs(folder: Path) -> list[tuple[str, Path, Path | None]]:
    files = _scan_files(folder)
    by_stem = {_stem(p.name).lower(): p for p in files}
    found = []
    for path in files:
        match = _IMAGE.match(_stem(path.name))
        if not match:
            continue
        case = match["case"]
        separator = _stem(path.name)[len(case)]
        label = next(
            (by_stem[k] for w in LABEL_WORDS if (k := f"{case}{separator}{w}".lower()) in by_stem), None
        )
        found.append((case, path, label))
    return found


def _groups(root: Path) -> list[tuple[str | None, list[tuple[str, Path, Path | None]]]]:
    if not root.is_dir():
        return []
    here = _pairs(root)
    if any(label for _, _, label in here):
        return [(None, here)]
    groups = []
    for child in split_folders(root):
        pairs = _pairs(child)
        if any(label for _, _, label in pairs):
            groups.append((normalise_split(child.name), pairs))
    return groups


def is_named_pairs(root: Path) -> bool:
    return bool(_groups(root))


def open_named_pairs(root: Path, labels=None, modality=None) -> Dataset:
    groups = _groups(root)
    words = Counter(
        _stem(label.name)[len(case_id) + 1 :].lower()
        for _, pairs in groups
        for case_id, _, label in pairs
        if label
    )
    word = words.most_common(1)[0][0] if words else "label"
    cases = []
    for split, pairs in groups:
        for case_id, image, label in pairs:
            if label is None:  # named as the other cases' labels are, so the fingerprint reports it missing
                label = image.with_name(f"{case_id}_{word}{suffix_of(image)}")
            cases.append(Case(case_id, [image], label, None, split))
    _make_ids_unique(cases)
    dim = dim_from_suffix(cases[0].images[0]) if cases else 3
    return Dataset(
        root=root,
        layout="image-mask-pairs",
        cases=cases,
        labels=dict(labels) if labels is not None else {},
        channel_names=_picture_channel_names(cases[0].images[0]) if dim == 2 else ["image"],
        modality=modality,
        dim=dim,
        label_mapping={255: 1} if dim == 2 else {},
    )
