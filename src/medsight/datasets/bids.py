"""BIDS: ``sub-<id>/[ses-<id>/]anat/*.nii[.gz]`` images, labels under ``derivatives/<pipeline>/``.

One case per subject and session (``sub-01_ses-1``). A file's *role* is its name without the
``sub-``/``ses-`` entities and without suffix: ``sub-01_ses-1_ce-gd_T1w.nii.gz`` has role
``ce-gd_T1w``. As for case folders, roles present in at least half of the cases are the channels
(in case-insensitive alphabetical order). The label is the case's file in ``derivatives/`` (the
same ``sub-``/``ses-``/``anat`` path below any pipeline folder) whose role names a segmentation:
``dseg`` first, then roles saying seg/label/lesion/tumour..., then ``mask`` (a ``label-brain``
mask is a helper, not the label). Without such files the dataset is image-only and a missing
label is no problem.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from medsight.datasets.base import Case, Dataset
from medsight.datasets.folders import _make_ids_unique, _scan_files, _stem, label_rank
from medsight.errors import MedsightError

_VOLUME_SUFFIXES = (".nii", ".nii.gz")
_SESSION_ENTITIES = re.compile(r"(?:^|_)(?:sub|ses)-[A-Za-z0-9]+")
_HELPER_ROLE = re.compile(r"label-(?:brain|head|wm|gm|csf)", re.IGNORECASE)


def _anat_folders(root: Path) -> list[Path]:
    """``sub-*/anat`` and ``sub-*/ses-*/anat`` under ``root``, sorted."""
    found = [p for p in root.glob("sub-*/anat") if p.is_dir()]
    found += [p for p in root.glob("sub-*/ses-*/anat") if p.is_dir()]
    return sorted(found)


def _volumes(folder: Path) -> list[Path]:
    return [p for p in _scan_files(folder) if p.name.lower().endswith(_VOLUME_SUFFIXES)]


def is_bids(root: Path) -> bool:
    return root.is_dir() and any(_volumes(anat) for anat in _anat_folders(root))


def _role(path: Path) -> str:
    return _SESSION_ENTITIES.sub("", _stem(path.name)).lstrip("_") or _stem(path.name)


def _label_rank(role: str) -> int | None:
    """0 for a discrete segmentation (dseg), then folders.label_rank's order; None for a helper."""
    tokens = role.lower().split("_")
    if tokens[-1] == "dseg":
        return 0
    if _HELPER_ROLE.search(role) or "brainmask" in role.lower():
        return None
    if any(word in role.lower() for word in ("lesion", "tumor", "tumour", "roi")):
        return 1
    rank = label_rank(role)
    return None if rank is None else rank + 1


def _label_candidates(root: Path, relative: Path) -> dict[str, Path]:
    """Role -> file in ``derivatives/<pipeline>/<relative>`` (the label is chosen among them)."""
    found: dict[str, Path] = {}
    derivatives = root / "derivatives"
    if not derivatives.is_dir():
        return found
    for pipeline in sorted(p for p in derivatives.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in _volumes(pipeline / relative):
            found.setdefault(_role(path), path)
    return found


def _case_id(anat: Path, root: Path) -> str:
    return "_".join(anat.relative_to(root).parts[:-1])  # sub-01[_ses-1]


def open_bids(root: Path, image_names=None, label_name=None, labels=None, modality=None) -> Dataset:
    anats = [a for a in _anat_folders(root) if _volumes(a)]
    per_case = []
    for anat in anats:
        relative = anat.relative_to(root)
        images = {_role(p): p for p in _volumes(anat)}
        per_case.append((_case_id(anat, root), anat, images, _label_candidates(root, relative)))
    half = math.ceil(len(per_case) / 2)
    image_counts = Counter(role for _, _, images, _ in per_case for role in images)
    label_counts = Counter(
        role for _, _, _, found in per_case for role in found if _label_rank(role) is not None
    )
    if isinstance(image_names, str):
        image_names = [n.strip() for n in image_names.split(",") if n.strip()]
    if not image_names:
        image_names = sorted((r for r, n in image_counts.items() if n >= half), key=str.lower)
    if not image_names:
        raise MedsightError("no anat image common to the subjects; name them with --image-names", root)
    if label_name is None and label_counts:
        common = [r for r, n in label_counts.items() if n >= half] or list(label_counts)
        ranked = sorted((_label_rank(r), r) for r in common)
        if len(ranked) > 1 and ranked[0][0] == ranked[1][0]:
            names = ", ".join(r for _, r in ranked)
            raise MedsightError(
                f"several derivatives look like the label ({names}); choose one with --label-name", root
            )
        label_name = ranked[0][1]
    cases = []
    for case_id, anat, images, found in per_case:
        paths = [_by_role(images, name, anat, case_id) for name in image_names]
        label = None
        if label_name:
            relative = anat.relative_to(root)
            label = found.get(label_name) or _expected_label(root, relative, case_id, label_name, per_case)
        cases.append(Case(case_id, paths, label))
    _make_ids_unique(cases)
    return Dataset(
        root=root,
        layout="bids",
        cases=cases,
        labels=dict(labels) if labels is not None else {},
        channel_names=list(image_names),
        modality=modality,
        dim=3,
        expects_labels=label_name is not None,
        extra={"image_names": list(image_names), "label_name": label_name},
    )


def _by_role(files: dict[str, Path], role: str, anat: Path, case_id: str) -> Path:
    for name, path in files.items():
        if name.lower() == role.lower():
            return path
    return anat / f"{case_id}_{role}.nii.gz"  # absent: the fingerprint reports it missing


def _expected_label(root: Path, relative: Path, case_id: str, role: str, per_case) -> Path:
    """Where this case's label would be, following another case's pipeline folder, to name it missing."""
    for _, _, _, found in per_case:
        if role in found:
            pipeline = found[role].relative_to(root / "derivatives").parts[0]
            return root / "derivatives" / pipeline / relative / f"{case_id}_{role}.nii.gz"
    return root / "derivatives" / relative / f"{case_id}_{role}.nii.gz"
