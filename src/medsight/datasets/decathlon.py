"""Layouts described by a ``dataset.json``: Medical Segmentation Decathlon and nnU-Net raw (v2).

MSD lists its cases (``training``: [{image, label}]) and declares ``labels`` as value -> name and
``modality`` as channel index -> name; a multi-channel case is one 4D NIfTI. nnU-Net v2 declares
``channel_names``, ``labels`` as name -> value and ``file_ending``, and stores one file per channel
(``<case>_0000``, ``_0001``...). An optional ``texts`` object in an MSD dataset.json (case id ->
sentence, written by medsight's phantom generator) becomes the cases' text. nnU-Net v1 wrote MSD-style json over ``_0000`` files; the MSD
reader follows those suffixed files when the listed name itself is absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from medsight.datasets.base import Case, Dataset, dim_from_suffix
from medsight.errors import MedsightError
from medsight.io import case_name, suffix_of

NNUNET_KEYS = ("channel_names", "file_ending")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def read_dataset_json(root: Path) -> dict[str, Any] | None:
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedsightError(f"cannot read dataset.json: {exc}", path) from exc
    if not isinstance(data, dict):
        raise MedsightError("dataset.json is not a JSON object", path)
    return data


def is_nnunet(root: Path) -> bool:
    data = read_dataset_json(root) if root.is_dir() else None
    return data is not None and any(key in data for key in NNUNET_KEYS)


def is_msd(root: Path) -> bool:
    data = read_dataset_json(root) if root.is_dir() else None
    return data is not None and "training" in data and not any(key in data for key in NNUNET_KEYS)


def case_id_of(path: Path) -> str:
    return case_name(path)


def _ordered_names(mapping: dict[str, str] | None) -> list[str]:
    if not mapping:
        return []
    return [str(mapping[k]) for k in sorted(mapping, key=lambda k: int(k))]


def _modality_of(channel_names: list[str]) -> str | None:
    unique = list(dict.fromkeys(channel_names))
    return "/".join(unique) if unique else None


def _msd_images(root: Path, listed: Path, n_channels: int) -> list[Path]:
    """The listed file, or nnU-Net v1's ``_0000``... channel files standing in for it."""
    if listed.exists():
        return [listed]
    suffix = suffix_of(listed)
    stem = listed.parent / case_id_of(listed)
    suffixed = [Path(f"{stem}_{i:04d}{suffix}") for i in range(max(n_channels, 1))]
    return suffixed if suffixed[0].exists() else [listed]


def open_msd(root: Path, labels=None, modality=None, include_test: bool = False) -> Dataset:
    data = read_dataset_json(root)
    json_path = root / "dataset.json"
    if data is None or not isinstance(data.get("training"), list):
        raise MedsightError(
            "not a Medical Segmentation Decathlon dataset.json (no 'training' list)", json_path
        )
    channel_names = _ordered_names(data.get("modality"))
    cases: list[Case] = []
    for entry in data["training"]:
        if not isinstance(entry, dict) or "image" not in entry:
            raise MedsightError(f"training entry without 'image': {entry!r}", json_path)
        listed = root / entry["image"]
        label = root / entry["label"] if entry.get("label") else None
        cases.append(Case(case_id_of(listed), _msd_images(root, listed, len(channel_names)), label))
    if include_test:
        for entry in data.get("test", []):
            listed = root / (entry["image"] if isinstance(entry, dict) else entry)
            cases.append(
                Case(case_id_of(listed), _msd_images(root, listed, len(channel_names)), None, split="test")
            )
    texts = data.get("texts") or {}  # a medsight extension: case id (or image name) -> text
    for case in cases:
        case.text = texts.get(case.case_id, texts.get(case.images[0].name))
    declared = {int(k): str(v) for k, v in (data.get("labels") or {}).items()}
    tensor_size = str(data.get("tensorImageSize", "")).upper()
    dim = 2 if tensor_size == "2D" else (dim_from_suffix(cases[0].images[0]) if cases else 3)
    return Dataset(
        root=root,
        layout="msd",
        cases=cases,
        labels=labels if labels is not None else declared,
        channel_names=channel_names,
        modality=modality or _modality_of(channel_names),
        dim=dim,
        extra={"name": data.get("name"), "description": data.get("description")},
    )


def _nnunet_labels(raw: dict[str, Any]) -> tuple[dict[int, str], dict[str, list[int]]]:
    """nnU-Net labels are name -> value; region-based training gives name -> [values]."""
    classes: dict[int, str] = {}
    regions: dict[str, list[int]] = {}
    for name, value in raw.items():
        if isinstance(value, list | tuple):
            regions[name] = [int(v) for v in value]
        else:
            classes[int(value)] = str(name)
    for values in regions.values():  # region members are classes too, even when not named alone
        for v in values:
            classes.setdefault(v, f"class_{v}")
    return dict(sorted(classes.items())), regions


def _channel_files(folder: Path, ending: str) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        match = _CHANNEL_SUFFIX.match(path.name[: -len(ending)])
        if match:
            found.setdefault(match["case"], set()).add(int(match["channel"]))
    return found


def open_nnunet(root: Path, labels=None, modality=None, include_test: bool = False) -> Dataset:
    data = read_dataset_json(root)
    json_path = root / "dataset.json"
    if data is None or "file_ending" not in data or "channel_names" not in data:
        raise MedsightError(
            "not an nnU-Net v2 dataset.json (needs 'channel_names' and 'file_ending')", json_path
        )
    ending = str(data["file_ending"])
    channel_names = _ordered_names(data["channel_names"])
    declared, regions = _nnunet_labels(data.get("labels") or {})
    cases: list[Case] = []
    if isinstance(data.get("dataset"), dict):  # explicit file lists, allowed by nnU-Net v2
        for case_id, entry in sorted(data["dataset"].items()):
            images = [root / p for p in entry.get("images", [])]
            label = root / entry["label"] if entry.get("label") else None
            cases.append(Case(case_id, images, label))
    else:
        images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
        ids = set(_channel_files(images_dir, ending))
        if labels_dir.is_dir():
            ids |= {p.name[: -len(ending)] for p in labels_dir.iterdir() if p.name.endswith(ending)}
            ids = {i for i in ids if not i.startswith(".")}
        for case_id in sorted(ids):
            images = [images_dir / f"{case_id}_{c:04d}{ending}" for c in range(len(channel_names))]
            cases.append(Case(case_id, images, labels_dir / f"{case_id}{ending}"))
        if include_test:
            test_dir = root / "imagesTs"
            for case_id in sorted(_channel_files(test_dir, ending)):
                images = [test_dir / f"{case_id}_{c:04d}{ending}" for c in range(len(channel_names))]
                cases.append(Case(case_id, images, None, split="test"))
    return Dataset(
        root=root,
        layout="nnunet",
        cases=cases,
        labels=labels if labels is not None else declared,
        channel_names=channel_names,
        modality=modality or _modality_of(channel_names),
        dim=2 if ending.lower() in (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff") else 3,
        extra={"name": data.get("name"), "file_ending": ending, "regions": regions},
    )
