"""DICOM studies: one folder per series, as scanners and PACS exports give them.

Either the folder itself is one case (its subfolders are the series, e.g. ``T1post/``, ``FLAIR/``,
``MaskTumor/``) or it holds one such folder per patient. Series whose names say mask/seg/label are
the label; the others are the channels, in name order (or as named by ``image_names``).
"""

from __future__ import annotations

from pathlib import Path

from medsight.datasets.base import Case, Dataset
from medsight.datasets.folders import label_rank
from medsight.errors import MedsightError


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _is_series(folder: Path) -> bool:
    return folder.is_dir() and any(_is_dicom_file(p) for p in sorted(folder.iterdir())[:3] if p.is_file())


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _study_folders(root: Path) -> list[Path]:
    if any(_is_series(s) for s in _subfolders(root)):
        return [root]
    return [c for c in _subfolders(root) if any(_is_series(s) for s in _subfolders(c))]


def is_dicom_study(root: Path) -> bool:
    return root.is_dir() and bool(_study_folders(root))


def _is_label(name: str) -> bool:
    return label_rank(name) is not None or "mask" in name.lower()


def open_dicom_study(root: Path, image_names=None, label_name=None, labels=None, modality=None) -> Dataset:
    if isinstance(image_names, str):
        image_names = [n.strip() for n in image_names.split(",") if n.strip()]
    cases = []
    channel_names: list[str] = []
    for study in _study_folders(root):
        series = {s.name: s for s in _subfolders(study) if _is_series(s)}
        label = (
            series.get(label_name)
            if label_name
            else next((p for n, p in series.items() if _is_label(n)), None)
        )
        names = image_names or [n for n in series if series[n] != label]
        missing = [n for n in names if n not in series]
        if missing:
            raise MedsightError(f"no series folder {', '.join(missing)}; found {', '.join(series)}", study)
        channel_names = channel_names or names
        cases.append(Case(study.name, [series[n] for n in names], label))
    return Dataset(
        root=root,
        layout="dicom-study",
        cases=cases,
        labels=dict(labels or {}),
        channel_names=channel_names,
        modality=modality,
        dim=3,
        expects_labels=any(c.label for c in cases),
    )
