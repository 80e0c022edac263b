"""Super-resolution with semantic perception (METHODS.md section 5): the ``sr`` task of the training loop
and its predictor.

Low-/high-resolution pairs are made from any dataset medsight reads (:mod:`medsight.transforms.degrade`:
the high-resolution volume cropped to a multiple of the scale, degraded once, cut into 2D planes,
:func:`~medsight.transforms.degrade.to_planes`), random aligned crops, L1 loss, validation by PSNR on
held-out volumes. ``semantic`` first trains (or resumes) the caption task (tasks/caption.py) in
``<out>/caption`` and feeds its encoder to the semantic branch (frozen unless ``finetune_encoder``);
``plain`` has no caption step. The predictor normalises the low-resolution input as training did and
maps the result back to the input's intensity range. The checkpoint records the task, scale, mode,
degradation, network config, the normalisation and the caption vocabulary and encoder config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsight.engine.loop import MedsightTask, Shared, fit, world
from medsight.errors import MedsightError
from medsight.scan import Scan
from medsight.tasks.caption import (
    PERCENTILES,
    CaptionConfig,
    check_options,
    normalise,
    read_cases,
    train_caption,
)
from medsight.transforms import degrade as dg

PREDICT_BATCH = 8


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


def caption_config(cfg: SRConfig) -> CaptionConfig:
    """The caption run inside an SR run: ``<out>/caption``, the SR run's data and shared options."""
    shared = {f.name: getattr(cfg, f.name) for f in fields(CaptionConfig)}
    shared.update(
        out=str(Path(cfg.out) / "caption"), epochs=cfg.caption_epochs, steps_per_epoch=cfg.caption_steps
    )
    shared.update(batch_size=16, patience=max(cfg.patience, cfg.caption_epochs), time_limit=None)
    return CaptionConfig(**shared)


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
    return dg.in_dtype_of(y * (hi - lo) + lo, scan.array.dtype)


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
