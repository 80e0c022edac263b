"""One registry of dataset layouts: each knows how to recognise itself and how to list its cases.

``detect_layout(path)`` asks each layout in registry order (the most specific first) and
``open_dataset(path, layout=None, **options)`` opens the dataset in place: files are read when a
case is loaded, never converted or copied.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsight.datasets import bids, decathlon, dicom_study, folders, manifest, named_pairs, parallel
from medsight.datasets.base import Dataset
from medsight.errors import MedsightError


@dataclass(frozen=True)
class Layout:
    name: str
    summary: str
    detect: Callable[[Path], bool]
    open: Callable[..., Dataset]

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.open).parameters)[1:]


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("nnunet", "nnU-Net raw v2: dataset.json with channel_names/file_ending", decathlon.is_nnunet,
               decathlon.open_nnunet),
        Layout("msd", "Medical Segmentation Decathlon: dataset.json with a training list", decathlon.is_msd,
               decathlon.open_msd),
        Layout("lvit", "LViT: Train_Folder/Val_Folder/Test_Folder with img/, labelcol/, text sheet",
               folders.is_lvit, folders.open_lvit),
        Layout("csv", "CSV manifest with image[,label,text,split] columns", manifest.is_manifest,
               manifest.open_manifest),
        Layout("bids", "BIDS: sub-*/[ses-*/]anat/*.nii.gz, labels in derivatives/<pipeline>/", bids.is_bids,
               bids.open_bids),
        Layout("parallel-folders", "images/ beside a label folder (DRIVE: 1st_manual/, mask/ = field of view)",
               parallel.is_parallel_folders, parallel.open_parallel_folders),
        Layout("image-mask-pairs", "<case>_image.* with <case>_label.* or _mask.* in one folder (pyradiomics)",
               named_pairs.is_named_pairs, named_pairs.open_named_pairs),
        Layout("dicom-study", "DICOM series folders: one study (case), or one study folder per patient",
               dicom_study.is_dicom_study, dicom_study.open_dicom_study),
        Layout("case-folders", "one folder per case (BraTS style), optional split folders",
               folders.is_case_folders, folders.open_case_folders),
    )
}  # fmt: skip


def detect_layout(path: str | Path) -> str:
    """Name of the first layout that recognises ``path``; MedsightError when none does."""
    path = Path(path)
    if not path.exists():
        raise MedsightError("no such file or folder", path)
    for layout in LAYOUTS.values():
        if layout.detect(path):
            return layout.name
    raise MedsightError(
        "no known dataset layout here (looked for dataset.json, LViT Train_Folder/img, a CSV manifest with an "
        "'image' column, BIDS sub-*/anat, images/ beside a label folder, *_image/*_label pairs, DICOM series "
        "folders, or case folders holding scan files); pass --layout to say which it is",
        path,
    )


def parse_labels(labels: Any) -> dict[int, str] | None:
    """Accept {value: name}, a list of names (value = position) or "background,tumour"."""
    if labels is None:
        return None
    if isinstance(labels, str):
        labels = [n.strip() for n in labels.split(",") if n.strip()]
    if isinstance(labels, list | tuple):
        return dict(enumerate(str(n) for n in labels))
    return {int(k): str(v) for k, v in dict(labels).items()}


def _layout_for(path: Path, options: dict[str, Any]) -> str:
    """The detected layout; naming files (image_names, label_name) means case folders unless the
    detected layout takes those options too (BIDS does)."""
    naming = {"image_names", "label_name"} & set(options)
    try:
        detected = detect_layout(path)
    except MedsightError:
        if naming:
            return "case-folders"
        raise
    return "case-folders" if naming - set(LAYOUTS[detected].options) else detected


def open_dataset(path: str | Path, layout: str | None = None, **options: Any) -> Dataset:
    """Open the dataset at ``path``; ``options`` are layout-specific (see ``LAYOUTS[name].options``),
    ``None`` values are ignored so a CLI can pass its defaults straight through."""
    path = Path(path)
    if not path.exists():
        raise MedsightError("no such file or folder", path)
    options = {k: v for k, v in options.items() if v is not None}
    if layout is None:
        layout = _layout_for(path, options)
    if layout not in LAYOUTS:
        raise MedsightError(f"unknown layout '{layout}'; known: {', '.join(LAYOUTS)}", path)
    chosen = LAYOUTS[layout]
    unknown = sorted(set(options) - set(chosen.options))
    if unknown:
        raise MedsightError(
            f"layout '{layout}' takes no option {', '.join(unknown)} (it takes: {', '.join(chosen.options)})",
            path,
        )
    if "labels" in options:
        options["labels"] = parse_labels(options["labels"])
    root = path if path.is_dir() or layout == "csv" else path.parent
    dataset = chosen.open(root, **options)
    if not dataset.cases:
        raise MedsightError(f"no cases found ({layout} layout)", path)
    return dataset
