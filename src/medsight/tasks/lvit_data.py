"""The data of the text-guided task (tasks/lvit.py): images with a sentence each, masks for some.

Reads a 2D dataset, splits it, keeps the masks of a seeded labeled subset, brings every image to the
working scale (z-scored per channel, area-averaged), embeds the sentences once (cached on disk),
matches each unlabeled image with the labeled image whose sentence is most similar, and makes the
augmented batches (labeled: image and mask; unlabeled: image, EPI pseudo-label and matched mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsight.errors import MedsightError


@dataclass
class Item:
    case_id: str
    image: np.ndarray  # (C, h, w) float32, normalised, at the working scale
    label: np.ndarray | None  # (h, w) int64 class indices, or None (unlabeled)
    text: Any = None  # TextEmbedding, joined once the run is accepted


def choose_labeled(train_ids: list[str], fraction: float, seed: int) -> list[str]:
    """The training ids that keep their masks: ``max(1, round(fraction * n))`` drawn by ``seed``."""
    if not 0.0 < fraction <= 1.0:
        raise MedsightError(f"labeled fraction must be in (0, 1], got {fraction}")
    ids = sorted(train_ids)
    n = max(1, round(fraction * len(ids)))
    if n >= len(ids):
        return ids
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:n])


def match_by_text(unlabeled: np.ndarray, labeled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each unlabeled sentence embedding ``(U, D)`` the index of the most cosine-similar labeled
    one ``(N, D)`` and that similarity; ties go to the lowest index."""
    unlabeled, labeled = np.asarray(unlabeled, np.float64), np.asarray(labeled, np.float64)
    if unlabeled.ndim != 2 or labeled.ndim != 2 or unlabeled.shape[1] != labeled.shape[1] or not len(labeled):
        raise ValueError(f"need (U, D) and (N>0, D) embeddings, got {unlabeled.shape} and {labeled.shape}")
    u = unlabeled / np.maximum(np.linalg.norm(unlabeled, axis=1, keepdims=True), 1e-12)
    n = labeled / np.maximum(np.linalg.norm(labeled, axis=1, keepdims=True), 1e-12)
    similarity = u @ n.T
    best = similarity.argmax(axis=1)
    return best, similarity[np.arange(len(u)), best]


def lvit_sheet(folder: Path) -> Path | None:
    """The sheet ``medsight.datasets.folders.read_text_sheet`` reads in an LViT split folder."""
    if not folder.is_dir():
        return None
    sheets = sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and p.suffix.lower() in (".xlsx", ".xls", ".csv")
        and not p.name.startswith((".", "~$"))
    )
    preferred = [p for p in sheets if "text" in p.name.lower()]
    return (preferred or sheets or [None])[0]


def check_text_rows(dataset) -> None:
    """LViT layout: a split folder with a text sheet must have a row for every image in it."""
    if dataset.layout != "lvit":
        return
    from medsight.datasets.folders import LVIT_SPLITS
    from medsight.text import read_text_file, require_rows

    for folder_name, _ in LVIT_SPLITS:
        folder = Path(dataset.root) / folder_name
        sheet = lvit_sheet(folder)
        if sheet is None or not (folder / "img").is_dir():
            continue
        names = [
            p.name for p in sorted((folder / "img").iterdir()) if p.is_file() and not p.name.startswith(".")
        ]
        require_rows(read_text_file(sheet), names, sheet)


def resize(array: np.ndarray, shape: tuple[int, int], label: bool = False) -> np.ndarray:
    """(C, h, w) -> (C, *shape): area-averaged for images (anti-aliased), nearest for labels."""
    if tuple(array.shape[-2:]) == tuple(shape):
        return array
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    if label:
        out = F.interpolate(t, size=shape, mode="nearest-exact")
        return out[0].numpy().round().astype(array.dtype)
    return F.interpolate(t, size=shape, mode="bilinear", antialias=True, align_corners=False)[0].numpy()


def working_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    return tuple(max(1, int(round(n * scale))) for n in shape[-2:])  # type: ignore[return-value]


def working_image(pre, array: np.ndarray, scale: float) -> np.ndarray:
    """An image (C, H, W) as the network sees it: z-scored per channel, resized to the working scale."""
    return resize(pre.normalise(array), working_shape(array.shape, scale))


def load_items(dataset, ids, pre, scale, values, with_labels, progress, what) -> list[Item]:
    from tqdm import tqdm

    from medsight.engine.cache import label_lookup

    lut = label_lookup(values)
    items = []
    for cid in tqdm(ids, desc=f"reading {what}", disable=not progress, leave=False):
        case = dataset.case(cid)
        if with_labels:
            image, label = dataset.load_case(case)
            if label is None:
                raise MedsightError(f"case '{cid}' has no mask", dataset.root)
        else:
            image, label = dataset.read_image(case), None
        if image.ndim != 2:
            raise MedsightError(
                f"text-guided segmentation needs 2D images; this one is {image.ndim}D", image.path
            )
        array = working_image(pre, image.array, scale)
        shape = array.shape[-2:]
        y = None
        if label is not None:
            raw = label.array[0].astype(np.int64)
            if raw.min() < 0 or raw.max() >= len(lut) or not np.isin(raw, values).all():
                raise MedsightError(
                    f"mask values {np.unique(raw).tolist()} outside the classes {values}", case.label
                )
            y = resize(lut[raw][None], shape, label=True)[0]
        if array.shape[0] != pre.in_channels:
            raise MedsightError(
                f"image has {array.shape[0]} channels, others have {pre.in_channels}", case.images[0]
            )
        items.append(Item(cid, array.astype(np.float32), y))
    return items


def split_ids(dataset, cfg) -> dict[str, list[str]]:
    """train, val, labeled and unlabeled ids (val capped at ``max_val_cases``)."""
    from medsight.datasets import split_dataset

    train_ids, val_ids = split_dataset(dataset, cfg.val_fraction, cfg.seed)
    if not train_ids or not val_ids:
        raise MedsightError("need at least one training and one validation image", cfg.data)
    if cfg.max_val_cases:
        val_ids = val_ids[: cfg.max_val_cases]
    has_mask = [i for i in train_ids if dataset.case(i).label is not None]
    if not has_mask:
        raise MedsightError("no training image has a mask", cfg.data)
    labeled = choose_labeled(has_mask, cfg.labeled_fraction, cfg.seed)
    unlabeled = [i for i in train_ids if i not in set(labeled)]
    return {"train_ids": train_ids, "val_ids": val_ids, "labeled_ids": labeled, "unlabeled_ids": unlabeled}


def read_data(cfg, progress: bool) -> dict[str, Any]:
    """Open, split and read the images at the working scale; refuses a crop beyond every image."""
    from medsight.datasets import open_dataset
    from medsight.engine.preprocess import Preprocessing

    dataset = open_dataset(cfg.data, cfg.layout)
    if dataset.dim != 2:
        raise MedsightError("text-guided segmentation needs a dataset of 2D images", cfg.data)
    check_text_rows(dataset)
    ids = split_ids(dataset, cfg)
    values = sorted(dataset.labels) if dataset.labels else None
    if values is None:
        found = {0}
        for cid in ids["labeled_ids"]:
            found |= {int(v) for v in np.unique(dataset.load_case(dataset.case(cid))[1].array)}
        values = sorted(found)
    first = dataset.read_image(dataset.case(ids["labeled_ids"][0]))
    pre = Preprocessing(target_spacing=None, in_channels=first.channels)
    load = lambda key, what, lab: load_items(  # noqa: E731
        dataset, ids[key], pre, cfg.image_scale, values, lab, progress, what
    )
    data = {
        **ids,
        "dataset": dataset,
        "pre": pre,
        "labels": {v: (dataset.labels or {}).get(v, f"label_{v}") for v in values},
        "labeled": load("labeled_ids", "labeled images", True),
        "unlabeled": load("unlabeled_ids", "unlabeled images", False),
        "val": load("val_ids", "validation images", True),
    }
    # Smaller images are padded up to the crop, but a crop beyond the largest one is only padding,
    # and memory grows with its square (a mistyped --crop 4096 asked for tens of GB).
    largest = max(max(item.image.shape[-2:]) for item in data["labeled"] + data["unlabeled"])
    if cfg.crop_size > max(largest, 16):  # 16: the smallest crop allowed
        raise MedsightError(
            f"crop {cfg.crop_size} px is larger than every training image at scale {cfg.image_scale:g} "
            f"(largest side {largest} px); use --crop {max(largest, 16)} or less",
            cfg.data,
        )
    return data


def embed_texts(data: dict[str, Any], cfg, needs_text: bool) -> int:
    """Every image's sentence, embedded once (cached in ``cfg.text_cache``, by default
    ``<out>/text_cache``), only now that images and options are accepted, so a refused run leaves no
    cache folder behind. Returns the images without text."""
    from medsight.text import TextEmbedding, TextEncoder, warn_missing_text

    items = data["labeled"] + data["unlabeled"] + data["val"]
    sentences = {it.case_id: data["dataset"].case(it.case_id).text for it in items}
    missing = [cid for cid, t in sentences.items() if not (t or "").strip()]
    warn_missing_text(len(missing), len(items), str(cfg.data))
    if needs_text and len(missing) < len(items):
        cache = Path(cfg.text_cache) if cfg.text_cache else Path(cfg.out) / "text_cache"
        embedded = TextEncoder(cfg.max_tokens, cache).embed([sentences[it.case_id] for it in items])
    else:
        embedded = [TextEmbedding.empty(cfg.max_tokens) for _ in items]
    for item, text in zip(items, embedded, strict=True):
        item.text = text
    return len(missing)


def text_matches(labeled: list[Item], unlabeled: list[Item]) -> dict[str, tuple[np.ndarray, float]]:
    """Unlabeled case -> (the mask of the labeled image with the most similar sentence, resized to
    it; that similarity), for the images that have text."""
    with_text = [it for it in labeled if it.text.has_text]
    targets = [it for it in unlabeled if it.text.has_text]
    if not with_text or not targets:
        return {}
    index, sims = match_by_text(
        np.stack([it.text.sentence for it in targets]), np.stack([it.text.sentence for it in with_text])
    )
    return {
        it.case_id: (resize(with_text[int(j)].label[None], it.image.shape[-2:], label=True)[0], float(s))
        for it, j, s in zip(targets, index, sims, strict=True)
    }


def epi_update(previous: np.ndarray | None, current: np.ndarray, beta: float) -> np.ndarray:
    """One EPI round: ``beta * previous + (1 - beta) * current``; the first round takes ``current``."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"EPI beta must lie in [0, 1), got {beta}")
    current = np.asarray(current, dtype=np.float32)
    if previous is None:
        return current.copy()
    if previous.shape != current.shape:
        raise ValueError(f"pseudo-label shape {previous.shape} differs from prediction {current.shape}")
    return (beta * previous + (1.0 - beta) * current).astype(np.float32)


# -- batches -----------------------------------------------------------------------------------------
def augmenter(crop: int, keys: list[str]):
    """Random crops (padded up to ``crop``), flips, 90-degree rotations, mild intensity changes."""
    from monai import transforms as mt

    return mt.Compose(
        [
            mt.SpatialPadd(keys, spatial_size=(crop, crop), method="end", mode="constant"),
            mt.RandSpatialCropd(keys, roi_size=(crop, crop), random_size=False),
            mt.RandFlipd(keys, prob=0.5, spatial_axis=0),
            mt.RandFlipd(keys, prob=0.5, spatial_axis=1),
            mt.RandRotate90d(keys, prob=0.75, max_k=3),
            mt.RandScaleIntensityd("image", factors=0.1, prob=0.3),
            mt.RandShiftIntensityd("image", offsets=0.1, prob=0.3),
            mt.RandGaussianNoised("image", std=0.05, prob=0.15),
        ]
    )


def batch_augmenters(crop: int, grounded: bool) -> dict[str, Any]:
    """The augmenters of the labeled (image, mask) and unlabeled (image, pseudo-label, matched mask)
    halves of a batch; a grounded model's positions are cropped and flipped with its image."""
    extra = ["positions"] if grounded else []
    return {
        "aug_labeled": augmenter(crop, ["image", "label", *extra]),
        "aug_unlabeled": augmenter(crop, ["image", "pseudo", "matched", *extra]),
    }


def _augmented(augment, item: Item, grounded: bool, **targets) -> tuple[np.ndarray, dict]:
    """The augmented image (with its equally augmented positions for a grounded model) and targets."""
    from medsight.models.lvit import positions

    extra = {"positions": positions(item.image.shape)} if grounded else {}
    out = augment({"image": item.image, **targets, **extra})
    image = np.asarray(out["image"], np.float32)
    if grounded:
        image = np.concatenate([image, np.asarray(out["positions"], np.float32)])
    return image, out


def _texts(items: list[Item]) -> dict[str, np.ndarray]:
    return {
        "tokens": np.stack([it.text.tokens for it in items]),
        "mask": np.stack([it.text.mask for it in items]),
    }


def labeled_batch(
    data: dict[str, Any], chosen: np.ndarray, seed: int, grounded: bool
) -> dict[str, np.ndarray]:
    """Images ``x``, class maps ``y`` and the sentences' tokens of the labeled images ``chosen``."""
    items = [data["labeled"][int(i)] for i in chosen]
    data["aug_labeled"].set_random_state(seed=seed)
    xs, ys = [], []
    for item in items:
        x, out = _augmented(data["aug_labeled"], item, grounded, label=item.label[None])
        xs.append(x)
        ys.append(np.asarray(out["label"])[0])
    return {"x": np.stack(xs), "y": np.stack(ys).astype(np.int64), **_texts(items)}


def unlabeled_batch(
    data: dict[str, Any], pseudo: dict, chosen, seed: int, n_classes: int, grounded: bool
) -> dict[str, np.ndarray]:
    """Images, pseudo-labels (zero before the first EPI round), text-matched masks and whether
    there is one (``valid``), and the tokens of the unlabeled images ``chosen``."""
    items = [data["unlabeled"][int(i)] for i in chosen]
    data["aug_unlabeled"].set_random_state(seed=seed)
    xs, ps, ms, valid = [], [], [], []
    for item in items:
        p = pseudo[item.case_id]
        if p is None:
            p = np.zeros((n_classes, *item.image.shape[-2:]), np.float32)
        m = data["matches"].get(item.case_id)
        matched = (m[0] if m else np.zeros(item.image.shape[-2:], np.int64))[None]
        x, out = _augmented(data["aug_unlabeled"], item, grounded, pseudo=p, matched=matched)
        xs.append(x)
        ps.append(np.asarray(out["pseudo"], np.float32))
        ms.append(np.asarray(out["matched"])[0].round().astype(np.int64))
        valid.append(m is not None)
    return {"x": np.stack(xs), "pseudo": np.stack(ps), "matched": np.stack(ms), "valid": np.array(valid),
            **_texts(items)}  # fmt: skip
