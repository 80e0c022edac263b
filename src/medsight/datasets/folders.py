"""Folder layouts without an index file: LViT split folders and one-folder-per-case (BraTS style).

LViT: ``Train_Folder/``, ``Val_Folder/``, ``Test_Folder/``, each with ``img/``, ``labelcol/`` and
a text sheet (``*.xlsx`` or ``*.csv``, columns Image and Description). Masks are stored 0/255,
so the layout declares ``{0: background, 1: foreground}`` with ``label_mapping = {255: 1}``.

Case folders: one folder per case, optionally under split folders (``train/``, ``validation/``).
Which file is which is matched by a file's *role*: its name without suffix and without a
leading case id (``BraTS20_001_flair.nii.gz`` in folder ``BraTS20_001`` has role ``flair``).
When not given, the rule is:

- roles present in at least half of the case folders are used (a case lacking one of them is
  then reported missing that file, rather than the channel silently disappearing);
- only scan files count (NIfTI, NRRD, NumPy, pictures); text files such as licences are ignored;
- a role naming a label (contains ``seg``, ``label``, ``truth``, ``annot``, or is the word ``gt``,
  ``ot``, ``OTMultiClass`` or ``mask``) is the label; with several, ``seg``/``label`` names win;
- other roles containing ``mask`` (``brainmask``) are helper masks: neither label nor channel;
- the remaining roles are the channels, in case-insensitive alphabetical order.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from medsight.datasets.base import SPLIT_ALIASES, Case, Dataset, dim_from_suffix, normalise_split
from medsight.errors import MedsightError
from medsight.io import FORMATS, case_name, suffix_of

# Files medsight.io can read; DICOM is excluded because a series is a folder, not one file per case.
SCAN_SUFFIXES = tuple(s for f in FORMATS.values() if f.name != "dicom" for s in f.suffixes)

# -- LViT ------------------------------------------------------------------------------------
LVIT_SPLITS = (("Train_Folder", "train"), ("Val_Folder", "val"), ("Test_Folder", "test"))
LVIT_LABELS = {0: "background", 1: "foreground"}
LVIT_LABEL_MAPPING = {255: 1}


def is_lvit(root: Path) -> bool:
    return root.is_dir() and any((root / folder / "img").is_dir() for folder, _ in LVIT_SPLITS)


def _stem(name: str) -> str:
    return case_name(name)


def _scan_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _is_scan(p))


def _is_scan(path: Path) -> bool:
    return suffix_of(path) in SCAN_SUFFIXES


def read_text_sheet(folder: Path) -> dict[str, str | None]:
    """Image name -> description from the split's text sheet (empty when there is none)."""
    sheets = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in (".xlsx", ".xls", ".csv") and p.is_file()
    )
    sheets = [p for p in sheets if not p.name.startswith((".", "~$"))]
    if not sheets:
        return {}
    preferred = [p for p in sheets if "text" in p.name.lower()]
    return parse_text_sheet((preferred or sheets)[0])


def parse_text_sheet(sheet: Path) -> dict[str, str | None]:
    """Image name -> sentence from one ``.xlsx``/``.xls``/``.csv`` sheet with columns Image and
    Description (or Text), headers case-insensitive; whitespace is normalised, blanks are ``None``."""
    import pandas as pd

    try:
        table = (
            pd.read_csv(sheet, dtype=str)
            if sheet.suffix.lower() == ".csv"
            else pd.read_excel(sheet, dtype=str)
        )
    except Exception as exc:
        raise MedsightError(f"cannot read text sheet: {type(exc).__name__}: {exc}", sheet) from exc
    columns = {str(c).strip().lower(): c for c in table.columns}
    image_col = columns.get("image")
    text_col = columns.get("description", columns.get("text"))
    if image_col is None or text_col is None:
        raise MedsightError(
            f"text sheet needs columns Image and Description, found {list(table.columns)}", sheet
        )
    texts = {}
    for name, text in zip(table[image_col], table[text_col], strict=True):
        if isinstance(name, str) and name.strip():
            texts[name.strip()] = " ".join(text.split()) or None if isinstance(text, str) else None
    return texts


def _lvit_label(labelcol: Path, image_name: str, by_stem: dict[str, Path]) -> Path:
    """Masks share the image's name; some LViT datasets (QaTa-COV19) prefix them with ``mask_``."""
    for candidate in (image_name, f"mask_{image_name}"):
        if (labelcol / candidate).is_file():
            return labelcol / candidate
    stem = _stem(image_name)
    for key in (stem, f"mask_{stem}"):
        if key in by_stem:
            return by_stem[key]
    return labelcol / image_name


def _picture_channel_names(path: Path | None) -> list[str]:
    if path is not None and suffix_of(path) in (".tif", ".tiff", ".gif"):
        return _channel_names_from_pixels(path)
    if path is None or suffix_of(path) not in (".png", ".jpg", ".jpeg", ".bmp"):
        return ["image"]
    from PIL import Image

    try:
        with Image.open(path) as img:  # reads the header only
            mode = img.mode
    except Exception:
        return ["image"]
    return ["R", "G", "B"] if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr") else ["grey"]


def _channel_names_from_pixels(path: Path) -> list[str]:
    """TIFF and GIF headers do not say simply whether medsight will see grey or colour: read one."""
    from medsight import io

    try:
        channels = io.read(path).channels
    except MedsightError:
        return ["image"]
    return (
        ["R", "G", "B"]
        if channels == 3
        else ["grey"]
        if channels == 1
        else [f"ch{i}" for i in range(channels)]
    )


def open_lvit(root: Path, labels=None, modality=None, label_mapping=None) -> Dataset:
    cases: list[Case] = []
    for folder_name, split in LVIT_SPLITS:
        folder = root / folder_name
        if not (folder / "img").is_dir():
            continue
        img_dir, labelcol = folder / "img", folder / "labelcol"
        texts = read_text_sheet(folder)
        text_by_stem = {_stem(name): text for name, text in texts.items()}
        label_by_stem = {_stem(p.name): p for p in _scan_files(labelcol)}
        images = {p.name: p for p in _scan_files(img_dir)}
        # A sheet row whose image is absent is kept so that the fingerprint reports it missing.
        image_stems = {_stem(n) for n in images}
        for name in texts:
            if _stem(name) not in image_stems:
                images[name if suffix_of(Path(name)) else f"{name}.png"] = None
        for name in sorted(images):
            path = images[name] or img_dir / name
            text = texts.get(name, text_by_stem.get(_stem(name)))
            cases.append(Case(_stem(name), [path], _lvit_label(labelcol, name, label_by_stem), text, split))
    _make_ids_unique(cases)
    first = next((c.images[0] for c in cases if c.images[0].exists()), None)
    return Dataset(
        root=root,
        layout="lvit",
        cases=cases,
        labels=labels if labels is not None else dict(LVIT_LABELS),
        channel_names=_picture_channel_names(first),
        modality=modality,
        dim=2,
        label_mapping=dict(LVIT_LABEL_MAPPING if label_mapping is None else label_mapping),
    )


def _make_ids_unique(cases: list[Case]) -> None:
    counts = Counter(c.case_id for c in cases)
    for case in cases:
        if counts[case.case_id] > 1:
            case.case_id = f"{case.split}/{case.case_id}"


# -- one folder per case ---------------------------------------------------------------------
_LABEL_TOKENS = {"gt", "ot", "otmulticlass", "mask", "masks"}
_LABEL_WORDS = ("seg", "label", "truth", "annot")


def label_rank(role: str) -> int | None:
    """How strongly a role name says "label": 0 best, None for not a label."""
    lower = role.lower()
    if any(word in lower for word in _LABEL_WORDS):
        return 0
    tokens = set(re.split(r"[^a-z0-9]+", lower))
    if tokens & {"gt", "ot", "otmulticlass"}:
        return 1
    if tokens & _LABEL_TOKENS:
        return 2
    return None


def is_helper_mask(role: str) -> bool:
    return "mask" in role.lower() and label_rank(role) is None


def _role(path: Path, case_id: str) -> str:
    stem = _stem(path.name)
    if stem.lower().startswith(case_id.lower()) and len(stem) > len(case_id):
        rest = stem[len(case_id) :].lstrip("_-. ")
        if rest:
            return rest
    return stem


def split_folders(root: Path) -> list[Path]:
    """Subfolders named as splits (train, training, test...), for layouts whose other subfolders are
    cases rather than splits."""
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_ALIASES)


def find_case_folders(root: Path) -> list[tuple[Path, str | None]]:
    """Case folders directly under ``root`` or one level down under split folders."""
    found: list[tuple[Path, str | None]] = []
    if not root.is_dir():
        return found
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _scan_files(child):
            found.append((child, None))
            continue
        for grandchild in sorted(p for p in child.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if _scan_files(grandchild):
                found.append((grandchild, normalise_split(child.name)))
    return found


def is_case_folders(root: Path) -> bool:
    return bool(find_case_folders(root))


def _match_role(files: dict[str, Path], name: str) -> Path | None:
    """A file whose role or full stem equals ``name`` (case-insensitive; a suffix may be given)."""
    wanted = _stem(name).lower()
    for role, path in files.items():
        if role.lower() == wanted or _stem(path.name).lower() == wanted:
            return path
    return None


def open_case_folders(root: Path, image_names=None, label_name=None, labels=None, modality=None) -> Dataset:
    folders = find_case_folders(root)
    roles_per_case: list[tuple[Path, str | None, dict[str, Path]]] = []
    for folder, split in folders:
        roles = {_role(p, folder.name): p for p in _scan_files(folder)}
        roles_per_case.append((folder, split, roles))
    counts = Counter(role for _, _, roles in roles_per_case for role in roles)
    common = sorted((r for r, n in counts.items() if n >= math.ceil(len(folders) / 2)), key=str.lower)
    # How each role's file is named elsewhere (with or without the case id), to name a missing one.
    name_pattern: dict[str, tuple[bool, str]] = {}
    for folder, _, roles in roles_per_case:
        for role, path in roles.items():
            prefixed = path.name.lower().startswith(folder.name.lower())
            name_pattern.setdefault(
                role.lower(), (prefixed, path.name[len(folder.name) :] if prefixed else path.name)
            )

    if isinstance(image_names, str):
        image_names = [n.strip() for n in image_names.split(",") if n.strip()]
    if label_name is None and folders:
        ranked = sorted((label_rank(r), r) for r in common if label_rank(r) is not None)
        if len(ranked) > 1 and ranked[0][0] == ranked[1][0]:
            names = ", ".join(r for _, r in ranked)
            raise MedsightError(
                f"several files look like the label ({names}); choose one with --label-name", root
            )
        label_name = ranked[0][1] if ranked else None
        expects_labels = label_name is not None
    else:
        expects_labels = True
    if not image_names:
        image_names = [
            r for r in common if r != label_name and label_rank(r) is None and not is_helper_mask(r)
        ]
    if folders and not image_names:
        raise MedsightError("no image files common to the case folders; name them with --image-names", root)

    def expected_path(folder: Path, name: str, files: dict[str, Path]) -> Path:
        found = _match_role(files, name)
        if found:
            return found
        prefixed, rest = name_pattern.get(_stem(name).lower(), (False, f"{_stem(name)}.nii.gz"))
        return folder / (folder.name + rest if prefixed else rest)

    cases = []
    for folder, split, files in roles_per_case:
        images = [expected_path(folder, name, files) for name in image_names]
        label = expected_path(folder, label_name, files) if label_name else None
        cases.append(Case(folder.name, images, label, None, split))
    _make_ids_unique(cases)
    return Dataset(
        root=root,
        layout="case-folders",
        cases=cases,
        labels=dict(labels) if labels is not None else {},
        channel_names=[_stem(n) for n in image_names],
        modality=modality,
        dim=dim_from_suffix(cases[0].images[0]) if cases else 3,
        expects_labels=expects_labels,
        extra={"image_names": list(image_names), "label_name": label_name},
    )
