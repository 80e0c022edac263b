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

Training is :class:`TextSegTask` on the one loop (engine/loop.py): options, devices, resume, the
time budget, early stopping and the weight average are the loop's. The network and its losses are
in models/lvit.py, the data in tasks/lvit_data.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.engine.loop import LoopConfig, MedsightTask, Shared, fit, world
from medsight.errors import MedsightError
from medsight.models.lvit import forward, is_grounded, lv_loss, predict_probabilities, pseudo_label_loss
from medsight.scan import Scan, fill_non_finite
from medsight.tasks.lvit_data import (
    batch_augmenters,
    choose_labeled,
    epi_update,
    labeled_batch,
    match_by_text,
    resize,
    unlabeled_batch,
    working_image,
)

METHODS = ("lvit", "unet2d")
TEXT_METHODS = ("lvit",)

__all__ = [
    "TextSegConfig",
    "TextSegPredictor",
    "TextSegTask",
    "choose_labeled",
    "epi_update",
    "lv_loss",
    "match_by_text",
    "pseudo_label_loss",
    "train_textseg",
]


@dataclass(kw_only=True)
class TextSegConfig(LoopConfig):
    data: str
    out: str = "runs/textseg"
    epochs: int = 40
    steps_per_epoch: int = 25
    batch_size: int | None = 4
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
    max_tokens: int = 24
    text_cache: str | None = None  # default: <out>/text_cache
    layout: str | None = None
    val_fraction: float = 0.2
    max_val_cases: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


# Config fields whose `medsight textseg train` option has another name (for error messages).
CLI_FLAGS = {
    "crop_size": "crop",
    "image_scale": "scale",
    "with_text": "method",
    "use_epi": "epi",
    "use_lv_loss": "lv-loss",
}


# -- the task ---------------------------------------------------------------------------------------
class TextSegTask(MedsightTask):
    """LViT (or a 2D U-Net) on the loop. Labeled batches are drawn in DataLoader workers; the
    unlabeled half of a batch is augmented in the training step from indices and a seed drawn with
    the batch, because its pseudo-labels change between epochs (made by the weight average, a mean
    teacher, at epoch starts) and workers see the task as it was when they started."""

    name = "textseg"
    flags = CLI_FLAGS
    resume_ignores = {"data", "text_cache"}

    def __init__(self, cfg: TextSegConfig):
        from medsight.models.lvit import LVIT_SIZES

        super().__init__(cfg)
        if cfg.method not in METHODS:
            raise MedsightError(
                f"unknown text-guided method '{cfg.method}'; choose one of {', '.join(METHODS)}"
            )
        if cfg.crop_size < 16 or cfg.image_scale <= 0:
            raise MedsightError(
                f"crop_size must be >= 16 and image_scale > 0, got {cfg.crop_size}, {cfg.image_scale}"
            )
        if cfg.size not in LVIT_SIZES:
            raise MedsightError(f"lvit size must be one of {', '.join(LVIT_SIZES)}, not {cfg.size!r}")
        if not 0.0 <= cfg.epi_beta < 1.0:
            raise MedsightError(f"EPI beta must lie in [0, 1), got {cfg.epi_beta}")
        self.text_model = cfg.method in TEXT_METHODS and cfg.with_text
        self.batch = cfg.batch_size or 4
        self.roi = 2 * cfg.crop_size  # inference window
        self.epi = Shared({"pseudo": {}, "rounds": 0, "semi_started_at": None})

    def model_name(self) -> str:
        return self.cfg.method

    def prepare(self) -> None:
        from monai.data import set_track_meta

        from medsight.losses import WeightedCEDiceLoss
        from medsight.models.registry import build_model
        from medsight.tasks.lvit_data import embed_texts, read_data, text_matches

        cfg = self.cfg
        data = read_data(cfg, cfg.progress and world()[0] == 0)
        keys = ("train_ids", "val_ids", "labeled_ids")
        if self.resumed is not None and [self.resumed["data"][k] for k in keys] != [data[k] for k in keys]:
            raise MedsightError(
                "holds a run on other images; resume it on the same data or pass --overwrite", cfg.out
            )
        # The semi-supervised half needs unlabeled images and at least one of its two terms.
        self.semi = bool(data["unlabeled"]) and (cfg.use_epi or cfg.use_lv_loss)
        needs_text = self.text_model or (cfg.use_lv_loss and bool(data["unlabeled"]))
        data["missing"] = embed_texts(data, cfg, needs_text)
        data["matches"] = (
            text_matches(data["labeled"], data["unlabeled"]) if self.semi and cfg.use_lv_loss else {}
        )
        set_track_meta(False)  # faster crops; fit() switches it back when training ends
        torch.manual_seed(cfg.seed)
        lvit_kwargs = {"size": cfg.size, "with_text": cfg.with_text, "grounded": cfg.grounded}
        self.model_kwargs = (lvit_kwargs if cfg.method == "lvit" else {}) | dict(cfg.model_kwargs)
        self.n_classes = len(data["labels"])
        self.model = build_model(cfg.method, data["pre"].in_channels, self.n_classes, **self.model_kwargs)
        self.loss_fn = WeightedCEDiceLoss(self.n_classes)
        self.grounded = is_grounded(self.model)
        data.update(batch_augmenters(cfg.crop_size, self.grounded))
        self.data = Shared(data)
        self.epi.value["pseudo"] = {it.case_id: None for it in data["unlabeled"]}

    # -- batches
    def make_batch(self, rng: np.random.Generator):
        data = self.data.value
        chosen = rng.integers(len(data["labeled"]), size=self.batch)
        batch = labeled_batch(data, chosen, int(rng.integers(2**31)), self.grounded)
        return {
            **{k: torch.from_numpy(v) for k, v in batch.items()},
            # the unlabeled half: augmented in training_step with the pseudo-labels of the epoch
            "unlabeled": torch.from_numpy(rng.integers(max(len(data["unlabeled"]), 1), size=self.batch)),
            "seed": int(rng.integers(2**31)),
        }

    def _unlabeled(self, indices, seed: int) -> dict[str, torch.Tensor]:
        batch = unlabeled_batch(
            self.data.value, self.epi.value["pseudo"], indices, seed, self.n_classes, self.grounded
        )
        return {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}

    def training_step(self, batch, batch_idx):
        cfg = self.cfg
        x, tokens, mask = batch["x"], batch["tokens"], batch["mask"]
        semi_on = self.epi.value["semi_started_at"] is not None
        if semi_on:
            u = self._unlabeled(batch["unlabeled"], int(batch["seed"]))
            both = forward(
                self.model,
                torch.cat([x, u["x"]]),
                torch.cat([tokens, u["tokens"]]),
                torch.cat([mask, u["mask"]]),
            )
            logits, u_logits = both[: len(x)], both[len(x) :]
        else:
            logits = forward(self.model, x, tokens, mask)
        loss = self.loss_fn(logits, batch["y"])
        self._parts["supervised_loss"].append(float(loss.detach()))
        if semi_on and cfg.use_epi:
            epi = pseudo_label_loss(u_logits, u["pseudo"], cfg.pseudo_threshold)
            loss = loss + cfg.epi_weight * epi
            self._parts["epi_loss"].append(float(epi.detach()))
        if semi_on and cfg.use_lv_loss and bool(u["valid"].any()):
            lv = lv_loss(torch.softmax(u_logits, 1), u["matched"], cfg.lv_grid, u["valid"])
            loss = loss + cfg.lv_weight * lv
            self._parts["lv_loss"].append(float(lv.detach()))
        return loss

    # -- EPI, at the start of each epoch
    def _progress(self, epoch: int) -> float:
        """Share of the run done: of the steps, or of the time budget when that runs out first."""
        done = epoch / max(self.cfg.epochs, 1)
        if self.cfg.time_limit:
            done = max(done, self.elapsed / (60 * self.cfg.time_limit))
        return min(done, 0.999)

    def on_train_epoch_start(self) -> None:
        from tqdm import tqdm

        super().on_train_epoch_start()
        cfg, state, epoch = self.cfg, self.epi.value, self.current_epoch
        self._parts: dict[str, list[float]] = {"supervised_loss": [], "epi_loss": [], "lv_loss": []}
        if self.semi and state["semi_started_at"] is None and self._progress(epoch) >= cfg.warmup_fraction:
            state["semi_started_at"] = epoch
        start = state["semi_started_at"]
        if start is None or not cfg.use_epi or (epoch - start) % max(1, cfg.pseudo_every):
            return
        teacher = self.scored_model()  # the weight average: a mean teacher
        show = cfg.progress and self.global_rank == 0
        for item in tqdm(self.data.value["unlabeled"], desc="pseudo-labels", disable=not show, leave=False):
            current = predict_probabilities(teacher, item.image, item.text, self.roi)
            state["pseudo"][item.case_id] = epi_update(state["pseudo"][item.case_id], current, cfg.epi_beta)
        state["rounds"] += 1

    def resume_only(self) -> dict[str, Any]:
        return {"pseudo_labels": dict(self.epi.value["pseudo"])}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = self.epi.value  # tensors: Lightning reads its checkpoints with weights_only
        pseudo = {k: None if v is None else torch.from_numpy(v) for k, v in state["pseudo"].items()}
        checkpoint["textseg"] = {**state, "pseudo": pseudo}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint["textseg"]
        pseudo = {k: None if v is None else v.numpy() for k, v in saved["pseudo"].items()}
        self.epi.value.update({**saved, "pseudo": pseudo})

    # -- validation: mean foreground Dice of whole images at the working scale
    def val_dataloader(self):
        return self.cases_loader(list(range(len(self.data.value["val"]))))

    def on_validation_epoch_start(self) -> None:
        self._scores: list[float] = []

    def validation_step(self, index, batch_idx) -> None:
        from medsight.tasks.segmentation import dice_per_class

        item = self.data.value["val"][int(index)]
        probs = predict_probabilities(self.model, item.image, item.text, self.roi)
        self._scores.append(float(np.mean(dice_per_class(probs.argmax(0), item.label, self.n_classes))))

    def on_validation_epoch_end(self) -> None:
        dice = float(np.mean(self._scores))
        parts = {k: float(np.mean(v)) for k, v in getattr(self, "_parts", {}).items() if v}
        self.record_epoch(dice, {**parts, "val_mean_dice": dice})

    # -- what the checkpoint and the summary say
    def checkpoint_payload(self) -> dict[str, Any]:
        from medsight.text import TEXT_MODEL

        cfg, data, state = self.cfg, self.data.value, self.epi.value
        ids = ("train_ids", "val_ids", "labeled_ids", "unlabeled_ids")
        return {
            "model": {"name": cfg.method, "kind": "2d", "in_channels": data["pre"].in_channels,
                      "num_classes": self.n_classes, "kwargs": self.model_kwargs},
            "labels": {int(k): v for k, v in data["labels"].items()},
            "label_mapping": {int(k): int(v) for k, v in data["dataset"].label_mapping.items()},
            "preprocessing": {**data["pre"].to_dict(), "image_scale": cfg.image_scale},
            "patch": [cfg.crop_size, cfg.crop_size],
            "inference_window": [self.roi, self.roi],
            "text": {"model": TEXT_MODEL, "max_tokens": cfg.max_tokens, "used_by_model": self.text_model},
            "data": {"root": str(cfg.data), **{k: data[k] for k in ids},
                     "labeled_fraction": cfg.labeled_fraction, "seed": cfg.seed},
            "semi": {"use_epi": self.semi and cfg.use_epi,
                     "use_lv_loss": self.semi and cfg.use_lv_loss and bool(data["matches"]),
                     "pseudo_label_rounds": state["rounds"],
                     "text_matches": {cid: float(m[1]) for cid, m in data["matches"].items()},
                     "images_without_text": data["missing"]},
        }  # fmt: skip

    def summary_of(self, payload: dict[str, Any]) -> dict[str, Any]:
        model, data = payload["model"], payload["data"]
        return {
            "method": model["name"],
            "size": model["kwargs"].get("size"),
            "with_text": bool(payload["text"]["used_by_model"]),
            "labeled_fraction": data["labeled_fraction"],
            **{k: data[k] for k in ("labeled_ids", "unlabeled_ids", "val_ids")},
            **payload.get("semi", {}),
        }


def train_textseg(cfg: TextSegConfig) -> dict[str, Any]:
    """Train one configuration; returns the summary (best validation mean Dice, ids, seconds,
    pseudo-label rounds, checkpoints), also written to ``<out>/summary.json``."""
    summary = fit(TextSegTask(cfg), cfg)
    summary["best_val_mean_dice"] = summary["best_val_score"]
    return summary


# -- inference --------------------------------------------------------------------------------------
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
        from medsight.models.registry import build_model_from_config
        from medsight.tasks.registry import task_of
        from medsight.text import TextEncoder

        payload = checkpoint.load(ckpt_path)
        if task_of(payload) != "textseg":
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
        self.model = build_model_from_config(self.model_info)
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
        image = working_image(self.pre, fill_non_finite(scan).array, self.image_scale)
        probs = predict_probabilities(self.model, image, embedding, self.window, tta=self.tta)
        probs = resize(probs, tuple(scan.spatial_shape))
        classes = probs.argmax(0)
        table = self.stored_value_table() if stored_values else np.array(sorted(self.labels))
        mask = table[classes]
        dtype = np.uint8 if mask.max() <= 255 and mask.min() >= 0 else np.int16
        return scan.with_array(mask[None].astype(dtype))
