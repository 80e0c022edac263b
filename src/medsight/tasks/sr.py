"""Super-resolution with semantic perception (METHODS.md section 5) as two tasks of the training loop.

- ``caption`` (:class:`CaptionTask`): the caption network (:class:`medsight.models.caption.CaptionNet`)
  learns to generate each training image's sentence with teacher forcing. Sentences come from the
  dataset (a text sheet, an MSD ``texts`` entry: one per case) or, where it has none, from its expert
  labels (:func:`medsight.text_from_labels.describe_labels`, one per slice, in the patient's words from
  the affine, sizes binned by the training terciles). Validation: teacher-forced token accuracy (the
  score) and BLEU-4 of the greedy captions on held-out slices. ``shuffle_sentences`` permutes the
  sentences between training images first: the control in which only the extra parameters remain.
- ``sr`` (:class:`SRTask`): low-/high-resolution pairs made from any dataset medsight reads
  (:mod:`medsight.transforms.degrade`: the high-resolution volume cropped to a multiple of the scale,
  degraded once, cut into 2D planes, :func:`~medsight.transforms.degrade.to_planes`), random aligned
  crops, L1 loss, validation by PSNR on held-out volumes. ``semantic`` first trains (or resumes) the
  caption task in ``<out>/caption`` and feeds its encoder to the semantic branch (frozen unless
  ``finetune_encoder``); ``plain`` has no caption step.

Intensities: each scan is mapped to [0, 1] by its own 0.5 and 99.5 percentiles before the network and
back after it (the predictor does the same with the low-resolution input), so any modality and any
scanner scale works without dataset statistics. The checkpoint records the task, scale, mode,
degradation, network config, this normalisation and the caption vocabulary and encoder config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
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
PREDICT_BATCH = 8


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


@dataclass(kw_only=True)
class SRConfig(CaptionConfig):
    out: str = "runs/sr"
    method: str = "semantic"  # semantic | plain
    crop: int = 64  # high-resolution training crop (rounded down to a multiple of the scale)
    finetune_encoder: bool = False
    caption_epochs: int = 10
    caption_steps: int = 50
    features: int = 32
    blocks: int = 4
    max_val_cases: int | None = 8
    epochs: int = 20
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


def caption_config(cfg: SRConfig) -> CaptionConfig:
    """The caption run inside an SR run: ``<out>/caption``, the SR run's data and shared options."""
    shared = {f.name: getattr(cfg, f.name) for f in fields(CaptionConfig)}
    shared.update(
        out=str(Path(cfg.out) / "caption"), epochs=cfg.caption_epochs, steps_per_epoch=cfg.caption_steps
    )
    shared.update(batch_size=16, patience=max(cfg.patience, cfg.caption_epochs), time_limit=None)
    return CaptionConfig(**shared)


def train_caption(cfg: CaptionConfig) -> dict[str, Any]:
    summary = fit(CaptionTask(cfg), cfg)
    from medsight.engine import checkpoint

    best = checkpoint.load(summary["best"])
    summary["scores"] = best.get("scores", {})
    return summary


# -- super-resolution task --------------------------------------------------------------------------------
def sr_planes(case: dict, params: dg.DegradeParams) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) planes ``(N, C, h, w)`` / ``(N, C, H, W)`` of a normalised case."""
    low = dg.degrade(case["hr"], params)
    mode, axis = params.mode, params.slice_axis
    to = dg.to_planes
    return np.ascontiguousarray(to(low.array, mode, axis)), np.ascontiguousarray(
        to(case["hr"].array, mode, axis)
    )


def build_network(config: dict, caption: dict | None, finetune: bool):
    """The :class:`SemanticSR` of a config (``build_sr_network`` kwargs) and caption encoder config."""
    from medsight.models.caption import CaptionEncoder
    from medsight.models.sr import SemanticSR, build_sr_network

    sr = build_sr_network(**config)
    encoder = None
    if config["method"] == "semantic":
        kw = caption["config"]
        encoder = CaptionEncoder(kw["in_channels"], kw["width"], kw["feature_channels"])
    return SemanticSR(sr, encoder, freeze_encoder=not finetune)


class SRTask(MedsightTask):
    name = "sr"
    resume_ignores = {"data"}

    def __init__(self, cfg: SRConfig):
        super().__init__(cfg)
        if cfg.method not in ("plain", "semantic"):
            raise MedsightError(f"--method must be semantic or plain, not {cfg.method!r}")
        check_options(cfg)

    def model_name(self) -> str:
        return f"sr-{self.cfg.method}"

    def prepare(self) -> None:
        from medsight.engine import checkpoint

        cfg = self.cfg
        caption = None
        if cfg.method == "semantic":
            summary = train_caption(caption_config(cfg))
            payload = checkpoint.load(summary["best"])
            caption = {
                "config": payload["model"]["kwargs"],
                "vocab": payload["vocab"],
                "sentences": payload["sentences"],
                "shuffled": payload["shuffled"],
                "scores": payload["scores"],
            }
        data = read_cases(cfg, cfg.progress and world()[0] == 0)
        params = data["params"]
        train = [sr_planes(c, params) for c in data["train"]]
        val = [sr_planes(c, params) for c in data["val"][: cfg.max_val_cases or None]]
        channels = train[0][1].shape[1]
        step = (cfg.scale, cfg.scale) if cfg.mode == "inplane" else (cfg.scale, 1)
        smallest = np.min([hr.shape[2:] for _, hr in train], axis=0)
        self.crop = [int(min(cfg.crop, n) // s * s) for n, s in zip(smallest, step, strict=True)]
        self.step = step
        self.net_config = {
            "in_channels": channels, "scale": cfg.scale, "mode": cfg.mode, "method": cfg.method,
            "features": cfg.features, "blocks": cfg.blocks,
        }  # fmt: skip
        if caption is not None:
            self.net_config["semantic_channels"] = caption["config"]["feature_channels"]
        torch.manual_seed(cfg.seed)
        self.model = build_network(self.net_config, caption, cfg.finetune_encoder)
        if caption is not None:  # the trained caption encoder, not a fresh one
            state = payload["state_dict"]
            self.model.encoder.load_state_dict(
                {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
            )
        self.caption, self.params = caption, params
        self.split = {"train_ids": data["train_ids"], "val_ids": data["val_ids"]}
        weights = np.array([lr.shape[0] for lr, _ in train], float)
        self.data = Shared({"train": train, "val": val, "weights": weights / weights.sum()})

    def make_batch(self, rng: np.random.Generator):
        data, (ch, cw), (sh, sw) = self.data.value, self.crop, self.step
        lows, highs = [], []
        for _ in range(self.cfg.batch_size or 16):
            low, high = data["train"][int(rng.choice(len(data["train"]), p=data["weights"]))]
            n = int(rng.integers(low.shape[0]))
            i = int(rng.integers(high.shape[2] // sh - ch // sh + 1))
            j = int(rng.integers(high.shape[3] // sw - cw // sw + 1))
            lo = low[n, :, i : i + ch // sh, j : j + cw // sw]
            hi = high[n, :, i * sh : i * sh + ch, j * sw : j * sw + cw]
            for axis in (1, 2):  # the profiles are symmetric: mirrored pairs are pairs
                if rng.random() < 0.5:
                    lo, hi = np.flip(lo, axis), np.flip(hi, axis)
            lows.append(lo)
            highs.append(hi)
        return torch.from_numpy(np.stack(lows).copy()), torch.from_numpy(np.stack(highs).copy())

    def training_step(self, batch, batch_idx):
        low, high = batch
        return F.l1_loss(self.model(low), high)

    def val_dataloader(self):
        return self.cases_loader(self.data.value["val"])

    def on_validation_epoch_start(self) -> None:
        self._psnr: list[float] = []

    def validation_step(self, case, batch_idx) -> None:
        low, high = case
        pred = run_planes(self.model, low, self.device)
        rng = float(high.max() - high.min()) or 1.0
        mse = float(np.mean((pred - high) ** 2))
        self._psnr.append(10 * np.log10(rng**2 / max(mse, 1e-12)))

    def on_validation_epoch_end(self) -> None:
        score = float(np.mean(self._psnr))
        self.record_epoch(score, {"val_psnr": score})

    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "model": {"name": f"sr-{self.cfg.method}", "kind": "sr2d", "kwargs": self.net_config},
            "labels": {},
            "preprocessing": {"intensity": "percentile", "percentiles": list(PERCENTILES)},
            "sr": {
                "mode": self.cfg.mode, "scale": self.cfg.scale, "slice_axis": self.cfg.slice_axis,
                "degradation": asdict(self.params), "crop": self.crop,
                "finetune_encoder": self.cfg.finetune_encoder,
            },
            "caption": self.caption,
            "data": {"root": str(self.cfg.data), **self.split},
        }  # fmt: skip

    def summary_of(self, payload: dict[str, Any]) -> dict[str, Any]:
        caption = payload.get("caption") or {}
        return {"method": payload["model"]["name"], "caption_scores": caption.get("scores")}


def train(cfg: SRConfig) -> dict[str, Any]:
    """Train (after the caption step for ``semantic``); the summary has ``best_val_psnr``."""
    summary = fit(SRTask(cfg), cfg)
    summary["best_val_psnr"] = summary["best_val_score"]
    return summary


# -- prediction ---------------------------------------------------------------------------------------------
def run_planes(model, low: np.ndarray, device=None, batch: int = PREDICT_BATCH) -> np.ndarray:
    """The network over ``(N, C, h, w)`` planes, a few at a time."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, low.shape[0], batch):
            x = torch.from_numpy(np.ascontiguousarray(low[start : start + batch])).to(device)
            out.append(model(x).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def interpolate_planes(low: np.ndarray, scale: int, mode: str, method: str) -> np.ndarray:
    """The interpolation baseline on planes (the same geometry as the network's global residual)."""
    factor = (scale, scale) if mode == "inplane" else (scale, 1)
    x = torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32))
    return F.interpolate(x, scale_factor=factor, mode=method, align_corners=False).numpy()


def _check_scan(scan: Scan, mode: str, channels: int, path) -> None:
    if mode == "thick" and scan.ndim != 3:
        raise MedsightError("is a 2D image; a thick-slice (--mode thick) model needs a 3D volume", path)
    if scan.channels != channels:
        raise MedsightError(f"has {scan.channels} channel(s); the model takes {channels}", path)


def _restore(y: np.ndarray, scan: Scan, lo: float, hi: float) -> np.ndarray:
    y = y * (hi - lo) + lo
    if np.issubdtype(scan.array.dtype, np.integer):  # a PNG stays a PNG of the same depth
        info = np.iinfo(scan.array.dtype)
        return np.clip(np.rint(y), info.min, info.max).astype(scan.array.dtype)
    return y.astype(np.float32)


def upsample_scan(scan: Scan, scale: int, mode: str, slice_axis: int, planes_fn) -> Scan:
    """``planes_fn`` (normalised LR planes -> HR planes) applied to a scan, on the fine grid."""
    axes = dg.decimated_axes(scan.ndim, mode, slice_axis)
    x, (lo, hi) = normalise(scan.array)
    y = dg.from_planes(planes_fn(dg.to_planes(x, mode, slice_axis)), scan.ndim, mode, slice_axis)
    affine = dg.upsample_geometry(scan.affine, scale, axes)
    return Scan(_restore(y, scan, lo, hi), affine, dict(scan.meta), scan.path)


def interpolate_scan(scan: Scan, scale: int, mode: str, slice_axis: int = 2, method: str = "bicubic") -> Scan:
    return upsample_scan(scan, scale, mode, slice_axis, lambda p: interpolate_planes(p, scale, mode, method))


class SRPredictor:
    """Reads an ``sr`` checkpoint; :meth:`predict` gives a scan on the fine grid with its affine."""

    def __init__(self, path: str | Path, device: str = "cpu", slice_axis: int | None = None):
        from medsight.engine import checkpoint
        from medsight.engine.loop import resolve_device
        from medsight.tasks.registry import get_task, task_of

        payload = checkpoint.load(path)
        task = task_of(payload)
        if task != "sr":
            other = get_task(task, path)
            raise MedsightError(
                f"is {other.what} (use `{other.command}`), not a super-resolution model", path
            )
        self.path, self.payload = Path(path), payload
        sr = payload["sr"]
        self.mode, self.scale = sr["mode"], int(sr["scale"])
        self.slice_axis = sr["slice_axis"] if slice_axis is None else slice_axis
        self.device = resolve_device(device)
        self.model = build_network(payload["model"]["kwargs"], payload.get("caption"), False)
        checkpoint.load_weights(self.model, payload, path)
        self.model.to(self.device).eval()
        self.channels = payload["model"]["kwargs"]["in_channels"]

    def predict(self, scan: Scan) -> Scan:
        _check_scan(scan, self.mode, self.channels, scan.path)
        return upsample_scan(
            scan, self.scale, self.mode, self.slice_axis, lambda p: run_planes(self.model, p, self.device)
        )


def predictor(path, **options) -> SRPredictor:
    return SRPredictor(path, **options)
