"""Text-guided semi-supervised 2D segmentation (LViT, docs/methods.md section 2): training and inference.

A run trains on the dataset's ``train`` split and keeps the checkpoint with the best validation Dice
on its ``val`` split (a seeded split when the layout has none). ``labeled_fraction`` keeps the masks
of a seeded subset of the training images; the others are *unlabeled* and, when switched on, feed:

- **EPI** (Exponential Pseudo-label Iteration): after a labeled-only warm-up, every ``pseudo_every``
  epochs the model predicts each unlabeled image whole and its pseudo-label becomes
  ``P_t = beta * P_(t-1) + (1 - beta) * p_t`` (``P_1 = p_1``), class probabilities at every pixel.
  The unlabeled crops are then trained towards the most likely class of ``P_t`` (cross-entropy plus
  Dice) on the pixels where ``P_t`` is confident (``pseudo_threshold``).
  ``use_epi=False`` drops the pseudo-label term altogether (``epi_beta=0`` keeps plain pseudo-labels).
  The paper's ``beta = 0.99`` is per epoch over hundreds of epochs; a CPU run makes a handful of
  rounds, so the default is 0.9.
- **LV loss** (language-vision): each unlabeled image is matched with the labeled image whose
  sentence embedding is most cosine-similar, and that image's mask, resized to the unlabeled image
  and cropped and flipped with it, is a weak target. The masks of two different images only agree
  on *where* structures are dense (what the text says), so they are compared as coarse density maps:
  ``L_LV = 1 - cos(pool(p_fg), pool(m_fg))`` over a ``lv_grid x lv_grid`` average-pooled grid.

Images are z-scored per channel (``Preprocessing.normalise``), optionally rescaled by
``image_scale`` (the network sees ``image_scale`` times the original size; predictions are resized
back), trained on random crops with flips, 90-degree rotations and mild intensity changes (MONAI),
and predicted whole with MONAI's sliding window.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsight.engine.tta import average_over_views, dihedral_views
from medsight.errors import MedsightError
from medsight.scan import Scan, fill_non_finite

METHODS = ("lvit", "unet2d")
TEXT_METHODS = ("lvit",)

__all__ = [
    "TextSegConfig",
    "TextSegPredictor",
    "choose_labeled",
    "epi_update",
    "lv_loss",
    "match_by_text",
    "train_textseg",
]


@dataclass
class TextSegConfig:
    data: str
    out: str
    method: str = "lvit"  # "lvit" or "unet2d"
    size: str = "small"  # lvit: "small" or "large"
    with_text: bool = True  # lvit: False is the no-text ablation
    grounded: bool = False  # lvit: tie the first ViT stage's tokens to absolute image positions
    labeled_fraction: float = 1.0
    use_epi: bool = True
    use_lv_loss: bool = True
    epi_beta: float = 0.9
    pseudo_every: int = 2  # epochs between pseudo-label rounds
    warmup_fraction: float = 0.5  # share of the run (epochs or time budget) on labeled images alone
    epi_weight: float = 0.5
    pseudo_threshold: float = 0.9  # pseudo-label pixels below this probability are not trained on
    lv_weight: float = 0.1
    lv_grid: int = 4
    crop_size: int = 128
    image_scale: float = 1.0
    batch_size: int = 4
    epochs: int = 40
    iters_per_epoch: int = 25
    lr: float = 2e-3
    seed: int = 0
    time_limit_minutes: float | None = None
    max_tokens: int = 24
    text_cache: str | None = None  # default: <out>/text_cache
    layout: str | None = None
    val_fraction: float = 0.2
    max_val_cases: int | None = None
    overwrite: bool = False
    resume: bool = False  # continue the run in ``out`` from its last.pt, with the same options
    progress: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # > 0: validation, EPI pseudo-labels and the checkpoints use an exponential moving average of the
    # weights (engine.train.weight_average), as in the segmentation engine; 0: the weights as trained.
    ema_decay: float = 0.999


# Config fields whose `medsight textseg train` option has another name (for error messages).
CLI_FLAGS = {
    "crop_size": "crop",
    "image_scale": "scale",
    "with_text": "method",
    "use_epi": "epi",
    "use_lv_loss": "lv-loss",
    "time_limit_minutes": "minutes",
}


# -- the semi-supervised pieces -----------------------------------------------------------------
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


def lv_loss(probabilities, matched, grid: int = 4, valid=None):
    """``1 - cos(pool(p_fg), pool(onehot(matched)_fg))`` averaged over the valid images.

    ``probabilities (B, K, H, W)`` (softmax), ``matched (B, H, W)`` class indices of the text-matched
    labeled mask, ``valid (B,)`` bool (images without a match contribute nothing). Foreground
    classes are average-pooled onto a ``grid x grid`` map, so the loss asks for the same *layout* of
    density, not the same pixels.
    """
    import torch.nn.functional as F

    k = probabilities.shape[1]
    reference = F.one_hot(matched.long().clamp(0, k - 1), k).permute(0, 3, 1, 2).to(probabilities.dtype)
    pred = F.adaptive_avg_pool2d(probabilities[:, 1:], grid).flatten(1)
    ref = F.adaptive_avg_pool2d(reference[:, 1:], grid).flatten(1)
    per_image = 1.0 - F.cosine_similarity(pred, ref, dim=1, eps=1e-6)
    if valid is None:
        return per_image.mean()
    valid = valid.to(per_image.dtype)
    return (per_image * valid).sum() / valid.sum().clamp_min(1.0) if valid.any() else per_image.sum() * 0.0


def pseudo_label_loss(logits, target, threshold: float = 0.7):
    """Cross-entropy plus foreground Dice towards the pseudo-labels' most likely class, on the pixels
    whose pseudo-label probability reaches ``threshold`` (``target (B, K, H, W)``; padded pixels,
    all-zero, never qualify). Training on confident hard labels rather than on the blurred average
    keeps an early, unsure teacher from pulling every pixel towards 0.5."""
    import torch
    import torch.nn.functional as F

    confidence, hard = target.max(dim=1)
    keep = (confidence >= threshold).to(logits.dtype)
    kept = keep.sum()
    if kept == 0:
        return logits.sum() * 0.0
    ce = (F.cross_entropy(logits, hard, reduction="none") * keep).sum() / kept
    probs = torch.softmax(logits, dim=1)[:, 1:] * keep[:, None]
    onehot = F.one_hot(hard, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(logits.dtype) * keep[:, None]
    dice = 1.0 - (2 * (probs * onehot).sum() + 1e-5) / (probs.sum() + onehot.sum() + 1e-5)
    return ce + dice


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


# -- data ---------------------------------------------------------------------------------------
@dataclass
class Item:
    case_id: str
    image: np.ndarray  # (C, h, w) float32, normalised, at the working scale
    label: np.ndarray | None  # (h, w) int64 class indices, or None (unlabeled)
    text: Any  # TextEmbedding


def _lvit_sheet(folder: Path) -> Path | None:
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
        sheet = _lvit_sheet(folder)
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


def _label_lookup(values: list[int]) -> np.ndarray:
    lut = np.zeros(max(values) + 1, np.int64)
    lut[values] = np.arange(len(values))
    return lut


def _load_items(dataset, ids, pre, scale, lut, values, with_labels, progress, what):
    from tqdm import tqdm

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
        shape = working_shape(image.spatial_shape, scale)
        array = resize(pre.normalise(image.array), shape)
        y = None
        if label is not None:
            raw = label.array[0].astype(np.int64)
            if raw.min() < 0 or raw.max() >= len(lut) or not np.isin(raw, values).all():
                raise MedsightError(
                    f"mask values {np.unique(raw).tolist()} outside the classes {values}", case.label
                )
            y = resize(lut[raw][None], shape, label=True)[0]
        items.append(Item(cid, array.astype(np.float32), y, None))  # text joins once the run is accepted
    return items


# -- model plumbing -------------------------------------------------------------------------------
def uses_text(model) -> bool:
    from medsight.models.lvit import LViT

    return isinstance(model, LViT) and model.with_text


def is_grounded(model) -> bool:
    from medsight.models.lvit import LViT

    return isinstance(model, LViT) and model.grounded


def positions(shape: tuple[int, ...]) -> np.ndarray:
    """(2, h, w): every pixel's row and column in the whole image, scaled to [-1, 1]. Spatial
    augmentation moves these channels with the image, so a crop keeps knowing where it came from."""
    rows, cols = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape[-2:])
    return np.stack(np.meshgrid(rows, cols, indexing="ij"))


def forward(model, x, tokens=None, mask=None):
    """Logits for a batch; text goes only to a text-taking network."""
    if uses_text(model) and tokens is not None:
        return model(x, tokens, mask)
    return model(x)


def predict_probabilities(
    model, image: np.ndarray, text=None, roi: int = 256, batch: int = 4, tta: bool = False
) -> np.ndarray:
    """(C, h, w) -> (K, h, w) class probabilities by MONAI's Gaussian-weighted sliding window.

    ``tta`` averages the probabilities over the eight rotations and mirror images of the input
    (each mapped back), the same dihedral group the training crops are drawn from, so every view is
    one the network has learned; it costs eight passes.
    """
    import torch
    from monai.inferers import sliding_window_inference

    tokens = mask = None
    if text is not None and text.has_text:
        tokens = torch.from_numpy(text.tokens)[None]
        mask = torch.from_numpy(text.mask)[None]

    def predictor(window):
        n = window.shape[0]
        if tokens is None:
            return forward(model, window)
        return forward(model, window, tokens.expand(n, -1, -1), mask.expand(n, -1))

    if is_grounded(model):
        image = np.concatenate([image, positions(image.shape)])

    def one_view(view: np.ndarray) -> np.ndarray:
        logits = sliding_window_inference(
            torch.from_numpy(view.astype(np.float32))[None],
            (roi, roi),
            batch,
            predictor,
            overlap=0.25,
            mode="gaussian",
        )
        return torch.softmax(torch.as_tensor(logits), dim=1)[0].numpy()

    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # MONAI 1.5 indexes with a list internally, which torch 2.x deprecates: nothing to act on here
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
        return average_over_views(one_view, image, dihedral_views() if tta else dihedral_views()[:1])


def build_network(config: dict[str, Any]):
    """Rebuild a network from ``{"name", "in_channels", "num_classes", "kwargs"}``: ``lvit`` here,
    anything else through :mod:`medsight.models.registry` (whose tests pin its entries)."""
    from medsight.models.lvit import lvit
    from medsight.models.registry import build_model_from_config

    if config.get("name") == "lvit":
        try:
            return lvit(
                int(config["in_channels"]), int(config["num_classes"]), **dict(config.get("kwargs") or {})
            )
        except (TypeError, ValueError) as exc:
            raise MedsightError(f"bad lvit arguments {config.get('kwargs')}: {exc}") from exc
    return build_model_from_config(config)


def _build(cfg: TextSegConfig, in_channels: int, num_classes: int):
    if cfg.method == "lvit":
        kwargs = {"size": cfg.size, "with_text": cfg.with_text, "grounded": cfg.grounded, **cfg.model_kwargs}
    else:
        kwargs = dict(cfg.model_kwargs)
    config = {
        "name": cfg.method,
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "kwargs": kwargs,
    }
    return build_network(config), config


def _augmenter(crop: int, keys: list[str]):
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


def _dice(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> float:
    scores = []
    for c in range(1, n_classes):
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        scores.append(1.0 if denom == 0 else 2.0 * (p & r).sum() / denom)
    return float(np.mean(scores))


# -- training -------------------------------------------------------------------------------------
def train_textseg(cfg: TextSegConfig) -> dict[str, Any]:
    """Train one configuration; returns a summary (best validation Dice, ids, seconds, checkpoints)."""
    import torch
    from monai.data import set_track_meta
    from tqdm import tqdm

    from medsight.datasets import open_dataset, split_dataset
    from medsight.engine.preprocess import Preprocessing
    from medsight.engine.train import adamw, check_decay, save_epoch, weight_average
    from medsight.io import check_run_folder
    from medsight.losses import WeightedCEDiceLoss, require_finite_loss
    from medsight.text import TEXT_MODEL, TextEmbedding, TextEncoder, warn_missing_text

    if cfg.method not in METHODS:
        raise MedsightError(f"unknown text-guided method '{cfg.method}'; choose one of {', '.join(METHODS)}")
    if cfg.crop_size < 16 or cfg.image_scale <= 0:
        raise MedsightError(
            f"crop_size must be >= 16 and image_scale > 0, got {cfg.crop_size}, {cfg.image_scale}"
        )
    check_decay(cfg.ema_decay)
    out = check_run_folder(cfg.out)
    best_path, last_path = out / "best.pt", out / "last.pt"
    resumed = None
    if last_path.exists() and not cfg.overwrite:
        if not cfg.resume:
            raise MedsightError(
                "holds a training run already; pass --resume to continue it or --overwrite", out
            )
        resumed = _resumable(last_path, cfg)
    elif cfg.resume and not cfg.overwrite:
        print(f"no run to resume in {out}; starting a new one")
    start = time.perf_counter()
    dataset = open_dataset(cfg.data, cfg.layout)
    if dataset.dim != 2:
        raise MedsightError("text-guided segmentation needs a dataset of 2D images", cfg.data)
    check_text_rows(dataset)
    train_ids, val_ids = split_dataset(dataset, cfg.val_fraction, cfg.seed)
    if not train_ids or not val_ids:
        raise MedsightError("need at least one training and one validation image", cfg.data)
    if cfg.max_val_cases:
        val_ids = val_ids[: cfg.max_val_cases]
    has_mask = [i for i in train_ids if dataset.case(i).label is not None]
    if not has_mask:
        raise MedsightError("no training image has a mask", cfg.data)
    labeled_ids = choose_labeled(has_mask, cfg.labeled_fraction, cfg.seed)
    unlabeled_ids = [i for i in train_ids if i not in set(labeled_ids)]
    saved_ids = [resumed["data"][k] for k in ("train_ids", "val_ids", "labeled_ids")] if resumed else None
    if saved_ids is not None and saved_ids != [train_ids, val_ids, labeled_ids]:
        raise MedsightError(
            "holds a run on other images; resume it on the same data or pass --overwrite", out
        )

    values = sorted(dataset.labels) if dataset.labels else None
    if values is None:
        found = {0}
        for cid in labeled_ids:
            found |= {int(v) for v in np.unique(dataset.load_case(dataset.case(cid))[1].array)}
        values = sorted(found)
    labels = {v: (dataset.labels or {}).get(v, f"label_{v}") for v in values}
    n_classes = len(values)
    lut = _label_lookup(values)
    first = dataset.read_image(dataset.case(labeled_ids[0]))
    pre = Preprocessing(target_spacing=None, in_channels=first.channels)
    load = lambda ids, what, lab: _load_items(  # noqa: E731
        dataset, ids, pre, cfg.image_scale, lut, values, lab, cfg.progress, what
    )
    labeled = load(labeled_ids, "labeled images", True)
    unlabeled = load(unlabeled_ids, "unlabeled images", False)
    val = load(val_ids, "validation images", True)
    for item in labeled + unlabeled + val:
        if item.image.shape[0] != pre.in_channels:
            raise MedsightError(
                f"image has {item.image.shape[0]} channels, others have {pre.in_channels}",
                dataset.case(item.case_id).images[0],
            )
    # Smaller images are padded up to the crop, but a crop beyond the largest one is only padding,
    # and memory grows with its square (a mistyped --crop 4096 asked for tens of GB).
    largest = max(max(item.image.shape[-2:]) for item in labeled + unlabeled)
    if cfg.crop_size > max(largest, 16):  # 16: the smallest crop allowed
        raise MedsightError(
            f"crop {cfg.crop_size} px is larger than every training image at scale {cfg.image_scale:g} "
            f"(largest side {largest} px); use --crop {max(largest, 16)} or less",
            cfg.data,
        )

    # Text: every image's sentence, embedded once (cached on disk), only now that images and options
    # are accepted, so a refused run leaves no cache folder behind.
    all_ids = train_ids + val_ids
    sentences = {cid: dataset.case(cid).text for cid in all_ids}
    missing = [cid for cid, t in sentences.items() if not (t or "").strip()]
    warn_missing_text(len(missing), len(all_ids), str(cfg.data))
    needs_text = (cfg.method in TEXT_METHODS and cfg.with_text) or (cfg.use_lv_loss and unlabeled_ids)
    cache = Path(cfg.text_cache) if cfg.text_cache else out / "text_cache"
    if needs_text and len(missing) < len(all_ids):
        encoder = TextEncoder(cfg.max_tokens, cache)
        texts = dict(zip(all_ids, encoder.embed([sentences[c] for c in all_ids]), strict=True))
    else:
        texts = {cid: TextEmbedding.empty(cfg.max_tokens) for cid in all_ids}

    for item in labeled + unlabeled + val:
        item.text = texts[item.case_id]

    # The semi-supervised half needs unlabeled images and at least one of its two terms.
    semi = bool(unlabeled) and (cfg.use_epi or cfg.use_lv_loss)
    matches: dict[str, tuple[np.ndarray, float]] = {}
    if semi and cfg.use_lv_loss:
        with_text = [it for it in labeled if it.text.has_text]
        if with_text:
            targets = [it for it in unlabeled if it.text.has_text]
            if targets:
                index, sims = match_by_text(
                    np.stack([it.text.sentence for it in targets]),
                    np.stack([it.text.sentence for it in with_text]),
                )
                for it, j, s in zip(targets, index, sims, strict=True):
                    ref = with_text[int(j)].label
                    matches[it.case_id] = (resize(ref[None], it.image.shape[-2:], label=True)[0], float(s))

    torch.manual_seed(cfg.seed)
    set_track_meta(False)
    model, model_info = _build(cfg, pre.in_channels, n_classes)
    optimiser = adamw(model.parameters(), cfg.lr)
    average = weight_average(model, cfg.ema_decay)
    scored = average.module if average is not None else model  # validates, pseudo-labels, is saved
    budget = 60 * cfg.time_limit_minutes if cfg.time_limit_minutes else None
    total_iters = cfg.epochs * cfg.iters_per_epoch
    sup_loss = WeightedCEDiceLoss(n_classes)
    crop = cfg.crop_size
    roi = 2 * crop
    grounded = is_grounded(model)
    spatial_extra = ["positions"] if grounded else []
    aug_labeled = _augmenter(crop, ["image", "label", *spatial_extra])
    aug_unlabeled = _augmenter(crop, ["image", "pseudo", "matched", *spatial_extra])
    pseudo: dict[str, np.ndarray | None] = {it.case_id: None for it in unlabeled}
    beta = cfg.epi_beta
    history: list[dict[str, Any]] = []
    best, best_epoch, rounds, first_epoch = -1.0, 0, 0, 0
    semi_started_at: int | None = None
    if resumed is not None:
        saved = resumed["training"]
        model.load_state_dict(saved.get("weights", resumed["state_dict"]))
        if average is not None:
            scored.load_state_dict(resumed["state_dict"])
            average.n_averaged.fill_(saved["average_updates"])
        optimiser.load_state_dict(saved["optimiser"])
        start -= saved["elapsed"]  # the time budget covers the whole run, not each leg
        history, best, best_epoch = saved["history"], saved["best"], saved["best_epoch"]
        rounds, semi_started_at, first_epoch = (
            saved["pseudo_label_rounds"],
            saved["semi_started_at"],
            saved["epoch"],
        )
        pseudo.update(saved["pseudo_labels"])
        if cfg.progress:
            print(f"resuming {cfg.method} after epoch {first_epoch} (best Dice so far {best:.4f})")

    def progress_of(iteration: int) -> float:
        done = iteration / total_iters
        if budget:
            done = max(done, (time.perf_counter() - start) / budget)
        return min(done, 0.999)

    def text_batch(items):
        tokens = torch.from_numpy(np.stack([it.text.tokens for it in items]))
        mask = torch.from_numpy(np.stack([it.text.mask for it in items]))
        return tokens, mask

    def with_positions(item) -> dict[str, np.ndarray]:
        return {"positions": positions(item.image.shape)} if grounded else {}

    def network_input(augmented) -> np.ndarray:
        """The augmented image, with its (equally augmented) positions appended for a grounded model."""
        image = np.asarray(augmented["image"], np.float32)
        return np.concatenate([image, np.asarray(augmented["positions"], np.float32)]) if grounded else image

    def labeled_batch():
        chosen = [labeled[i] for i in rng.integers(len(labeled), size=cfg.batch_size)]
        xs, ys = [], []
        for it in chosen:
            d = aug_labeled({"image": it.image, "label": it.label[None], **with_positions(it)})
            xs.append(network_input(d))
            ys.append(np.asarray(d["label"])[0])
        return chosen, torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))

    def unlabeled_batch():
        chosen = [unlabeled[i] for i in rng.integers(len(unlabeled), size=cfg.batch_size)]
        xs, ps, ms, valid = [], [], [], []
        for it in chosen:
            p = pseudo[it.case_id]
            if p is None:
                p = np.zeros((n_classes, *it.image.shape[-2:]), np.float32)
            m = matches.get(it.case_id)
            d = aug_unlabeled(
                {
                    "image": it.image,
                    "pseudo": p,
                    "matched": (m[0] if m else np.zeros(it.image.shape[-2:], np.int64))[None],
                    **with_positions(it),
                }
            )
            xs.append(network_input(d))
            ps.append(np.asarray(d["pseudo"], np.float32))
            ms.append(np.asarray(d["matched"])[0].round().astype(np.int64))
            valid.append(m is not None)
        return (
            chosen,
            torch.from_numpy(np.stack(xs)),
            torch.from_numpy(np.stack(ps)),
            torch.from_numpy(np.stack(ms)),
            torch.tensor(valid),
        )

    def refresh_pseudo_labels() -> None:
        for it in tqdm(unlabeled, desc="pseudo-labels", disable=not cfg.progress, leave=False):
            current = predict_probabilities(scored, it.image, it.text, roi)
            pseudo[it.case_id] = epi_update(pseudo[it.case_id], current, beta)

    def validate() -> float:
        scores = []
        for it in val:
            probs = predict_probabilities(scored, it.image, it.text, roi)
            scores.append(_dice(probs.argmax(0), it.label, n_classes))
        return float(np.mean(scores))

    payload_base = {
        "method": "textseg",
        "model": {**model_info, "kind": "2d"},
        "labels": {int(k): v for k, v in labels.items()},
        "label_mapping": {int(k): int(v) for k, v in dataset.label_mapping.items()},
        "preprocessing": {**pre.to_dict(), "image_scale": cfg.image_scale},
        "patch": [crop, crop],
        "inference_window": [roi, roi],
        "text": {
            "model": TEXT_MODEL,
            "max_tokens": cfg.max_tokens,
            "used_by_model": cfg.method in TEXT_METHODS and cfg.with_text,
        },
        "data": {
            "root": str(cfg.data),
            "train_ids": train_ids,
            "val_ids": val_ids,
            "labeled_ids": labeled_ids,
            "unlabeled_ids": unlabeled_ids,
            "labeled_fraction": cfg.labeled_fraction,
            "seed": cfg.seed,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    for epoch in range(first_epoch, cfg.epochs):
        if epoch > 0 and budget and time.perf_counter() - start > budget:
            break  # after the epoch that used the budget (a resumed run that had used it trains nothing)
        # Per-epoch random streams, so that a resumed run samples and augments as an unbroken one.
        rng = np.random.default_rng([cfg.seed, epoch])
        aug_labeled.set_random_state(seed=int(rng.integers(2**31)))
        aug_unlabeled.set_random_state(seed=int(rng.integers(2**31)))
        if (
            semi
            and semi_started_at is None
            and progress_of(epoch * cfg.iters_per_epoch) >= cfg.warmup_fraction
        ):
            semi_started_at = epoch
        semi_on = semi_started_at is not None
        if semi_on and cfg.use_epi and (epoch - semi_started_at) % max(1, cfg.pseudo_every) == 0:
            refresh_pseudo_labels()
            rounds += 1
        model.train()
        totals: dict[str, list[float]] = {"loss": [], "sup": [], "epi": [], "lv": []}
        bar = tqdm(
            range(cfg.iters_per_epoch), desc=f"epoch {epoch + 1}", disable=not cfg.progress, leave=False
        )
        for step in bar:
            lr = cfg.lr * (1 - progress_of(epoch * cfg.iters_per_epoch + step)) ** 0.9
            for group in optimiser.param_groups:
                group["lr"] = lr
            items, x, y = labeled_batch()
            tokens, mask = text_batch(items)
            if semi_on:
                u_items, ux, up, um, valid = unlabeled_batch()
                u_tokens, u_mask = text_batch(u_items)
                logits = forward(
                    model, torch.cat([x, ux]), torch.cat([tokens, u_tokens]), torch.cat([mask, u_mask])
                )
                logits, u_logits = logits[: len(x)], logits[len(x) :]
            else:
                logits = forward(model, x, tokens, mask)
            loss = sup_loss(logits, y)
            totals["sup"].append(float(loss.detach()))
            if semi_on:
                if cfg.use_epi:
                    epi = pseudo_label_loss(u_logits, up, cfg.pseudo_threshold)
                    loss = loss + cfg.epi_weight * epi
                    totals["epi"].append(float(epi.detach()))
                if cfg.use_lv_loss and bool(valid.any()):
                    lv = lv_loss(torch.softmax(u_logits, 1), um, cfg.lv_grid, valid)
                    loss = loss + cfg.lv_weight * lv
                    totals["lv"].append(float(lv.detach()))
            optimiser.zero_grad(set_to_none=True)
            require_finite_loss(loss, epoch, step)
            loss.backward()
            optimiser.step()
            if average is not None:
                average.update_parameters(model)
            totals["loss"].append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(totals['loss'][-10:]):.3f}")

        dice = validate()
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(totals["loss"])),
            "supervised_loss": float(np.mean(totals["sup"])),
            **({"epi_loss": float(np.mean(totals["epi"]))} if totals["epi"] else {}),
            **({"lv_loss": float(np.mean(totals["lv"]))} if totals["lv"] else {}),
            "val_dice": dice,
            "lr": lr,
            "seconds": round(time.perf_counter() - start, 1),
        }
        history.append(record)
        improved = dice > best
        if improved:
            best, best_epoch = dice, epoch + 1
        training = {
            "epoch": epoch + 1,
            "history": history,
            "best": best,
            "best_epoch": best_epoch,
            "config": asdict(cfg),
            "optimiser": optimiser.state_dict(),
            "elapsed": time.perf_counter() - start,
            "pseudo_label_rounds": rounds,
            "semi_started_at": semi_started_at,
        }
        if average is not None:  # resuming needs the trained weights as well as their average
            training["weights"] = model.state_dict()
            training["average_updates"] = int(average.n_averaged)
        payload = {**payload_base, "state_dict": scored.state_dict(), "training": training}
        save_epoch(out, payload, history, dice, improved, cfg.progress, {"pseudo_labels": pseudo})

    summary = {
        "method": cfg.method,
        "size": cfg.size if cfg.method == "lvit" else None,
        "with_text": bool(cfg.method in TEXT_METHODS and cfg.with_text),
        "labeled_fraction": cfg.labeled_fraction,
        "use_epi": bool(semi and cfg.use_epi),
        "use_lv_loss": bool(semi and cfg.use_lv_loss and bool(matches)),
        "best_val_dice": best,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "pseudo_label_rounds": rounds,
        "train_seconds": round(time.perf_counter() - start, 1),
        "labeled_ids": labeled_ids,
        "unlabeled_ids": unlabeled_ids,
        "val_ids": val_ids,
        "text_matches": {cid: float(m[1]) for cid, m in matches.items()},
        "images_without_text": len(missing),
        "best": str(best_path),
        "last": str(last_path),
    }
    from medsight.io import write_text

    write_text(out / "summary.json", json.dumps(summary, indent=2), overwrite=True)
    return summary


def _resumable(last_path: Path, cfg: TextSegConfig) -> dict[str, Any]:
    """The run's ``last.pt``, once it is known to be a text-guided run started with ``cfg``'s options.

    Any option that shapes the run (network, labeled subset, schedule, budget, seed) must be the
    same, or the resumed run would be a different experiment with a borrowed history.
    """
    from medsight.engine import checkpoint
    from medsight.engine.train import check_resumable

    state = checkpoint.load(last_path)
    saved = state.get("training", {})
    if state.get("method") != "textseg":
        raise MedsightError("is not a text-guided run; pass --overwrite to start afresh", last_path)
    if "optimiser" not in saved:
        raise MedsightError(
            "was written by a medsight version that could not resume text-guided runs; pass --overwrite",
            last_path,
        )
    check_resumable(saved["config"], cfg, {"data", "text_cache"}, CLI_FLAGS, last_path)
    return state


# -- inference ------------------------------------------------------------------------------------
class TextSegPredictor:
    """A trained text-guided segmenter rebuilt from its checkpoint alone.

    ``predict(image, text)`` returns the label map as a one-channel uint8 Scan at the image's own
    size and geometry: class values (``0, 1, ...``), or with ``stored_values=True`` the values the
    dataset stored (e.g. 0/255 for LViT masks). ``tta`` (an attribute, switchable between calls)
    averages over the eight rotations and mirror images.
    """

    def __init__(self, ckpt_path: str | Path, text_cache: str | Path | None = None, tta: bool = False):
        from medsight.engine import checkpoint
        from medsight.engine.preprocess import Preprocessing
        from medsight.text import TextEncoder

        payload = checkpoint.load(ckpt_path)
        if payload.get("method") != "textseg":
            raise MedsightError(
                "not a text-guided segmentation checkpoint (medsight textseg train)", ckpt_path
            )
        self.path = Path(ckpt_path)
        self.model_info = payload["model"]
        self.labels = {int(k): v for k, v in payload["labels"].items()}
        self.label_mapping = {int(k): int(v) for k, v in payload.get("label_mapping", {}).items()}
        prep = dict(payload["preprocessing"])
        self.image_scale = float(prep.pop("image_scale", 1.0))
        self.pre = Preprocessing.from_dict(prep)
        self.window = int(payload["inference_window"][0])
        self.text_info = payload["text"]
        self.data = payload.get("data", {})
        self.model = build_network(self.model_info)
        self.tta = bool(tta)
        checkpoint.load_weights(self.model, payload, self.path)
        self.model.eval()
        self.encoder = TextEncoder(int(self.text_info["max_tokens"]), text_cache) if self.uses_text else None

    @property
    def uses_text(self) -> bool:
        return bool(self.text_info.get("used_by_model"))

    def stored_value_table(self) -> np.ndarray:
        """Class index -> value to write: the dataset's raw value (255 for 0/255 masks) when known."""
        values = sorted(self.labels)
        inverse = {target: source for source, target in self.label_mapping.items()}
        return np.array([inverse.get(v, v) for v in values], dtype=np.int64)

    def predict(self, scan: Scan, text: str | None = None, stored_values: bool = False) -> Scan:
        from medsight.text import TextEmbedding

        if scan.ndim != 2:
            raise MedsightError(f"the model segments 2D images; this one is {scan.ndim}D", scan.path)
        if scan.channels != self.pre.in_channels:
            raise MedsightError(
                f"image has {scan.channels} channel(s) but the model was trained on {self.pre.in_channels}",
                scan.path,
            )
        embedding = self.encoder.embed_one(text) if self.encoder is not None else TextEmbedding.empty()
        shape = tuple(scan.spatial_shape)
        image = resize(
            self.pre.normalise(fill_non_finite(scan).array), working_shape(shape, self.image_scale)
        )
        probs = predict_probabilities(self.model, image, embedding, self.window, tta=self.tta)
        probs = resize(probs, shape)
        classes = probs.argmax(0)
        table = self.stored_value_table() if stored_values else np.array(sorted(self.labels))
        mask = table[classes]
        dtype = np.uint8 if mask.max() <= 255 and mask.min() >= 0 else np.int16
        return scan.with_array(mask[None].astype(dtype))
