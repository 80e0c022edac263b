"""The caption network of super-resolution with semantic perception (METHODS.md section 5) as a task
of the training loop, and the low-/high-resolution data both tasks read.

``caption`` (:class:`CaptionTask`): the caption network (:class:`medsight.models.caption.CaptionNet`)
learns to generate each training image's sentence with teacher forcing. Sentences come from the
dataset (a text sheet, an MSD ``texts`` entry: one per case) or, where it has none, from its expert
labels (:func:`medsight.text_from_labels.describe_labels`, one per slice, in the patient's words from
the affine, sizes binned by the training terciles). Validation: teacher-forced token accuracy (the
score) and BLEU-4 of the greedy captions on held-out slices. ``shuffle_sentences`` permutes the
sentences between training images first: the control in which only the extra parameters remain.

Intensities: each scan is mapped to [0, 1] by its own 0.5 and 99.5 percentiles (:func:`normalise`),
so any modality and any scanner scale works without dataset statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsight.engine.loop import LoopConfig, MedsightTask, Shared, fit, world
from medsight.errors import MedsightError
from medsight.scan import Scan
from medsight.transforms import degrade as dg

PERCENTILES = (0.5, 99.5)
SENTENCE_SOURCES = ("auto", "dataset", "labels")
MAX_CAPTION_VAL = 256  # held-out slices scored per caption epoch


@dataclass(kw_only=True)
class CaptionConfig(LoopConfig):
    data: str = ""
    layout: str | None = None
    mode: str = "inplane"
    scale: int = 4
    profile: str | None = None  # None: gaussian (inplane) or box (thick); see transforms/degrade.py
    slice_axis: int = 2
    val_fraction: float = 0.2
    split_seed: int | None = None  # defaults to seed
    sentences: str = "auto"  # auto: the dataset's text when every training case has one, else labels
    shuffle_sentences: bool = False
    caption_size: int = 64  # the caption net sees each slice resized to this square
    batch_size: int | None = 16
    epochs: int = 10
    steps_per_epoch: int = 50


# -- data ---------------------------------------------------------------------------------------------
def normalise(array: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """``array`` mapped to about [0, 1] by its 0.5/99.5 percentiles, and the two values (to invert)."""
    lo, hi = (float(v) for v in np.percentile(array, PERCENTILES))
    if not hi > lo:
        lo, hi = float(array.min()), float(array.max())
    hi = hi if hi > lo else lo + 1.0
    return ((np.asarray(array, np.float32) - lo) / (hi - lo)).astype(np.float32), (lo, hi)


def params_of(cfg: CaptionConfig) -> dg.DegradeParams:
    profile = cfg.profile or ("gaussian" if cfg.mode == "inplane" else "box")
    return dg.DegradeParams(cfg.mode, int(cfg.scale), profile, 1.0, cfg.slice_axis)


def check_options(cfg: CaptionConfig) -> dg.DegradeParams:
    """Options that make no sense, refused before any data is read."""
    params = params_of(cfg)
    scales = dg.INPLANE_SCALES if cfg.mode == "inplane" else dg.THICK_SCALES
    if cfg.mode not in dg.MODES:
        raise MedsightError(f"--mode must be inplane or thick, not {cfg.mode!r}")
    if cfg.scale not in scales:
        raise MedsightError(f"--scale for --mode {cfg.mode} must be one of {list(scales)}, not {cfg.scale}")
    profiles = dg.INPLANE_PROFILES if cfg.mode == "inplane" else dg.SLAB_PROFILES
    if params.profile not in profiles:
        raise MedsightError(f"--profile for --mode {cfg.mode} must be one of {', '.join(profiles)}")
    if cfg.slice_axis not in (0, 1, 2):
        raise MedsightError(f"--slice-axis must be 0, 1 or 2, not {cfg.slice_axis}")
    if cfg.sentences not in SENTENCE_SOURCES:
        raise MedsightError(f"--sentences must be one of {', '.join(SENTENCE_SOURCES)}")
    return params


def read_cases(cfg: CaptionConfig, progress: bool) -> dict[str, Any]:
    """Open and split the dataset; each case: normalised high-resolution scan (cropped to a multiple
    of the scale), its label (or None), its text and its original intensity range."""
    from tqdm import tqdm

    from medsight.datasets import open_dataset, split_dataset

    params = check_options(cfg)
    dataset = open_dataset(cfg.data, cfg.layout)
    if cfg.mode == "thick" and dataset.dim != 3:
        raise MedsightError(
            "--mode thick needs 3D volumes; this dataset is 2D (use --mode inplane)", cfg.data
        )
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    train_ids, val_ids = split_dataset(dataset, cfg.val_fraction, split_seed)
    if not train_ids or not val_ids:
        raise MedsightError("need at least one training and one validation case", cfg.data)
    out: dict[str, Any] = {"train_ids": train_ids, "val_ids": val_ids, "labels": dict(dataset.labels)}
    for part, ids in (("train", train_ids), ("val", val_ids)):
        cases = []
        for cid in tqdm(ids, desc=f"reading {part} cases", disable=not progress, leave=False):
            case = dataset.case(cid)
            image, label = dataset.load_case(case)
            axes = dg.decimated_axes(image.ndim, cfg.mode, cfg.slice_axis)
            if any(image.spatial_shape[a] < 2 * cfg.scale for a in axes):
                raise MedsightError(
                    f"too small for scale {cfg.scale}: {list(image.spatial_shape)}", image.path
                )
            image = dg.crop_to_multiple(image, cfg.scale, axes)
            label = None if label is None else dg.crop_to_multiple(label, cfg.scale, axes)
            x, _ = normalise(image.array)
            cases.append({"id": cid, "hr": image.with_array(x), "label": label, "text": case.text})
        out[part] = cases
    channels = {c["hr"].channels for c in out["train"] + out["val"]}
    if len(channels) != 1 or channels.pop() not in (1, 3):
        raise MedsightError("super-resolution needs every case with the same 1 or 3 channels", cfg.data)
    out["params"] = params
    return out


def _slab(label: Scan, axis: int, index: int) -> Scan:
    """Slice ``index`` along spatial ``axis`` as a one-slice 3D scan with its own affine."""
    take = [slice(None)] * 4
    take[axis + 1] = slice(index, index + 1)
    affine = label.affine.copy()
    affine[:3, 3] += index * affine[:3, axis]
    return Scan(label.array[tuple(take)], affine, {}, label.path)


def slice_sentences(
    cases: list[dict], cfg: CaptionConfig, names: dict[int, str], bins=None
) -> list[list[str]]:
    """One sentence per plane of each case (see the module docstring); ``bins`` from the training set."""
    from medsight.text_from_labels import describe_labels

    out = []
    for case in cases:
        stack, _, _ = dg.plane_axes(case["hr"].ndim, cfg.mode, cfg.slice_axis)
        if stack is None:
            out.append([describe_labels(case["label"], names, bins)])
        else:
            n = case["label"].spatial_shape[stack]
            out.append([describe_labels(_slab(case["label"], stack, i), names, bins) for i in range(n)])
    return out


def size_bins(cases: list[dict], cfg: CaptionConfig, names: dict[int, str]) -> dict:
    from medsight.text_from_labels import label_sizes, tercile_bins

    sizes: dict[str, list[float]] = {}
    for case in cases:
        stack, _, _ = dg.plane_axes(case["hr"].ndim, cfg.mode, cfg.slice_axis)
        planes = (
            [case["label"]]
            if stack is None
            else [_slab(case["label"], stack, i) for i in range(case["label"].spatial_shape[stack])]
        )
        for plane in planes:
            for name, size in label_sizes(plane, names).items():
                sizes.setdefault(name, []).append(size)
    return tercile_bins(sizes)


def choose_source(cfg: CaptionConfig, data: dict) -> str:
    if cfg.sentences != "auto":
        return cfg.sentences
    if all(c["text"] for c in data["train"]):
        return "dataset"
    if all(c["label"] is not None for c in data["train"] + data["val"]):
        return "labels"
    raise MedsightError(
        "no sentences: the dataset has neither a text for every case nor labels; use --method plain", cfg.data
    )


# -- caption task ---------------------------------------------------------------------------------------
def caption_images(case: dict, cfg: CaptionConfig) -> torch.Tensor:
    """The case's planes resized to ``caption_size`` squared: ``(N, C, S, S)``."""
    planes = torch.from_numpy(np.ascontiguousarray(dg.to_planes(case["hr"].array, cfg.mode, cfg.slice_axis)))
    size = (cfg.caption_size, cfg.caption_size)
    return F.interpolate(planes, size=size, mode="bilinear", align_corners=False, antialias=True)


def _n_planes(case: dict, cfg: CaptionConfig) -> int:
    return dg.to_planes(case["hr"].array, cfg.mode, cfg.slice_axis).shape[0]


class CaptionTask(MedsightTask):
    name = "caption"
    resume_ignores = {"data"}

    def prepare(self) -> None:
        from medsight.models.caption import CaptionNet, Vocabulary

        cfg = self.cfg
        data = read_cases(cfg, cfg.progress and world()[0] == 0)
        source = choose_source(cfg, data)
        if source == "dataset":
            missing = [c["id"] for c in data["train"] + data["val"] if not c["text"]]
            if missing:
                raise MedsightError(
                    f"--sentences dataset: cases without text: {', '.join(missing[:5])}", cfg.data
                )
            per_case = {p: [[c["text"]] * _n_planes(c, cfg) for c in data[p]] for p in ("train", "val")}
        else:
            names = {v: n for v, n in data["labels"].items() if v} or {1: "foreground"}
            bins = size_bins(data["train"], cfg, names)
            per_case = {p: slice_sentences(data[p], cfg, names, bins) for p in ("train", "val")}
        images = {p: torch.cat([caption_images(c, cfg) for c in data[p]]) for p in ("train", "val")}
        sentences = {p: [s for case in per_case[p] for s in case] for p in ("train", "val")}
        if cfg.shuffle_sentences:
            order = np.random.default_rng(cfg.seed).permutation(len(sentences["train"]))
            sentences["train"] = [sentences["train"][i] for i in order]
        keep = np.linspace(0, len(sentences["val"]) - 1, min(MAX_CAPTION_VAL, len(sentences["val"]))).astype(
            int
        )
        val = (images["val"][keep], [sentences["val"][i] for i in keep])
        self.vocab = Vocabulary.build(sentences["train"])
        self.source, self.scores = source, {}
        torch.manual_seed(cfg.seed)
        self.model = CaptionNet(len(self.vocab), in_channels=images["train"].shape[1])
        self.data = Shared({"images": images["train"], "sentences": sentences["train"], "val": [val]})
        self.split = {"train_ids": data["train_ids"], "val_ids": data["val_ids"]}

    def make_batch(self, rng: np.random.Generator):
        data = self.data.value
        pick = rng.integers(len(data["sentences"]), size=self.cfg.batch_size or 16)
        images = data["images"][torch.from_numpy(pick)]
        if rng.random() < 0.5:  # intensity jitter only: a mirror would swap left and right in the words
            images = images * float(rng.uniform(0.9, 1.1))
        return images, self.vocab.batch([data["sentences"][i] for i in pick])

    def training_step(self, batch, batch_idx):
        images, tokens = batch
        return self.model.loss(images, tokens)[0]

    def val_dataloader(self):
        return self.cases_loader(self.data.value["val"])

    def validation_step(self, case, batch_idx) -> None:
        from medsight.models.caption import caption_scores

        images, sentences = case
        self.scores = caption_scores(self.model, self.vocab, images.to(self.device), sentences)

    def on_validation_epoch_end(self) -> None:
        metrics = {"val_token_accuracy": self.scores["token_accuracy"], "val_bleu4": self.scores["bleu4"]}
        self.record_epoch(self.scores["token_accuracy"], metrics)

    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "model": {"name": "caption", "kind": "caption2d", "kwargs": self.model.config},
            "labels": {},
            "preprocessing": {"intensity": "percentile", "percentiles": list(PERCENTILES)},
            "vocab": self.vocab.to_dict(),
            "sentences": self.source,
            "shuffled": self.cfg.shuffle_sentences,
            "caption_size": self.cfg.caption_size,
            "scores": dict(self.scores),
            "data": {"root": str(self.cfg.data), **self.split},
        }

    def summary_of(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"sentences": payload.get("sentences"), "scores": payload.get("scores", {})}


def train_caption(cfg: CaptionConfig) -> dict[str, Any]:
    summary = fit(CaptionTask(cfg), cfg)
    from medsight.engine import checkpoint

    best = checkpoint.load(summary["best"])
    summary["scores"] = best.get("scores", {})
    return summary
