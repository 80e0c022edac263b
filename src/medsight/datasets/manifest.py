"""CSV manifest: one row per case with columns ``image`` (required; several channels separated
by ``;``), ``label``, ``text``, ``split`` and optionally ``case_id``. Paths are relative to the CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from medsight.datasets.base import Case, Dataset, dim_from_suffix, normalise_split
from medsight.datasets.decathlon import case_id_of
from medsight.errors import MedsightError

CHANNEL_SEPARATOR = ";"


def _header(path: Path) -> list[str]:
    try:
        with path.open(newline="") as handle:
            return [c.strip().lower() for c in next(csv.reader(handle), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def find_manifest(path: Path) -> Path | None:
    """``path`` itself when it is a manifest CSV, or the single manifest CSV inside a folder."""
    if path.is_file():
        return path if path.suffix.lower() == ".csv" and "image" in _header(path) else None
    if not path.is_dir():
        return None
    found = [p for p in sorted(path.glob("*.csv")) if not p.name.startswith(".") and "image" in _header(p)]
    return found[0] if len(found) == 1 else None


def is_manifest(path: Path) -> bool:
    return find_manifest(path) is not None


def _cell(row: dict[str, str], key: str) -> str | None:
    value = (row.get(key) or "").strip()
    return value or None


def open_manifest(path: Path, labels=None, modality=None, channel_names=None) -> Dataset:
    manifest = find_manifest(path)
    if manifest is None:
        raise MedsightError("no CSV manifest with an 'image' column here", path)
    base = manifest.parent
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        rows = [{k.strip().lower(): v for k, v in row.items() if k is not None} for row in reader]
    cases: list[Case] = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        image_cell = _cell(row, "image")
        if image_cell is None:
            raise MedsightError(f"row {line} has no image", manifest)
        images = [base / p.strip() for p in image_cell.split(CHANNEL_SEPARATOR) if p.strip()]
        label = _cell(row, "label")
        case_id = _cell(row, "case_id") or _cell(row, "case") or case_id_of(images[0])
        if case_id in seen:
            raise MedsightError(f"row {line}: case id '{case_id}' appears twice", manifest)
        seen.add(case_id)
        cases.append(
            Case(
                case_id,
                images,
                base / label if label else None,
                _cell(row, "text"),
                normalise_split(_cell(row, "split")),
            )
        )
    n_channels = max((len(c.images) for c in cases), default=1)
    names = channel_names.split(",") if isinstance(channel_names, str) else channel_names
    return Dataset(
        root=base,
        layout="csv",
        cases=cases,
        labels=dict(labels) if labels is not None else {},
        channel_names=list(names)
        if names
        else (["image"] if n_channels == 1 else [f"ch{i}" for i in range(n_channels)]),
        modality=modality,
        dim=dim_from_suffix(cases[0].images[0]) if cases else 3,
        expects_labels="label" in fields,
        extra={"manifest": str(manifest)},
    )
