"""DICOM studies: one folder per series, as scanners and PACS exports give them.

Either the folder itself is one case (its subfolders are the series, e.g. ``T1post/``, ``FLAIR/``,
``MaskTumor/``) or it holds one such folder per patient. Series whose names say mask/seg/label are
the label; the others are the channels, matched across studies by their SeriesDescription (or as
named by the ``series`` or ``image_names`` options), so channel 3 is the same sequence in every study.
"""

from __future__ import annotations

import re
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


def normalise_description(text: str) -> str:
    """``"T1 post-contrast"``, ``"t1_post_contrast"`` and ``"T1POSTCONTRAST"`` are one series kind."""
    return re.sub(r"[^a-z0-9]+", "", str(text).lower())


def _description(folder: Path) -> str:
    from medsight.io.dicom import _header

    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if _is_dicom_file(path):
            ds = _header(path)
            if ds is not None:
                return str(ds.get("SeriesDescription", "") or "").strip()
    return ""


def _series_keys(series: dict[str, Path]) -> dict[str, tuple[str, str]]:
    """Folder name -> (matching key, shown name): the SeriesDescription where it tells the study's
    series apart, else the folder name (exports that describe every series alike)."""
    described = {name: _description(path) for name, path in series.items()}
    keys = [normalise_description(d) for d in described.values()]
    distinct = all(keys) and len(set(keys)) == len(keys)
    return {
        name: (normalise_description(d), d) if distinct else (normalise_description(name), name)
        for name, d in described.items()
    }


def _parse_series(series) -> list[tuple[str, list[str]]]:
    """``"FLAIR,T1|T1pre,T1c|T1post|dT1,T2"`` -> ``[(shown name, matching keys)]``: one channel per
    comma, ``|`` between the descriptions (or folder names) that count as that channel."""
    if isinstance(series, str):
        series = [n for n in series.split(",") if n.strip()]
    channels = []
    for entry in series:
        aliases = [a.strip() for a in str(entry).split("|") if a.strip()]
        channels.append((aliases[0], [normalise_description(a) for a in aliases]))
    return channels


def _pick(study: Path, keys: dict[str, tuple[str, str]], aliases: list[str], shown: str) -> str | None:
    """The one series folder of ``study`` whose description (or folder name) is one of ``aliases``."""
    found = [
        name for name, (key, _) in keys.items() if key in aliases or normalise_description(name) in aliases
    ]
    if len(found) > 1:
        raise MedsightError(
            f"series {', '.join(found)} all match channel '{shown}'; tell them apart with the series= option",
            study,
        )
    return found[0] if found else None


def open_dicom_study(
    root: Path, image_names=None, label_name=None, labels=None, modality=None, series=None
) -> Dataset:
    """Channels are matched across studies by SeriesDescription (normalised: case, spaces and
    punctuation do not count), never by folder position. ``series``: the channels in order, e.g.
    ``"FLAIR,T1|T1pre,T1c|T1post,T2"`` (``|`` separates names that mean the same channel);
    ``image_names``: series folder names. A study lacking a channel gets a ``(missing series X)``
    placeholder that `data inspect` lists as a problem and training refuses."""
    if isinstance(image_names, str):
        image_names = [n.strip() for n in image_names.split(",") if n.strip()]
    wanted = _parse_series(series or image_names or [])
    cases = []
    for study in _study_folders(root):
        folders = {s.name: s for s in _subfolders(study) if _is_series(s)}
        keys = _series_keys(folders)
        label = (
            folders.get(label_name)
            if label_name
            else next((p for n, p in folders.items() if _is_label(n) or _is_label(keys[n][1])), None)
        )
        images = {n: keys[n] for n in folders if folders[n] != label}
        if not wanted:  # the first study's series define the channels, by description
            wanted = [(images[n][1], [images[n][0]]) for n in sorted(images, key=lambda n: images[n][0])]
        paths = []
        for shown, aliases in wanted:
            name = _pick(study, images, aliases, shown)
            paths.append(folders[name] if name else study / f"(missing series {shown})")
        cases.append(Case(study.name, paths, label))
    return Dataset(
        root=root,
        layout="dicom-study",
        cases=cases,
        labels=dict(labels or {}),
        channel_names=[shown for shown, _ in wanted],
        modality=modality,
        dim=3,
        expects_labels=any(c.label for c in cases),
    )
