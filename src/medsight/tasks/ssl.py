"""Self-supervised pretraining from imaging-plane geometry (METHODS.md section 4) as a loop task.

Unlabeled scans teach a ``unet2d`` where other imaging planes cut each slice of a stack (``planes``:
Gaussian ridges, one channel per view), where each slice lies in its stack (``position``), both
(``planes+position``, weights 1 and 1), or, as the generic alternative at the same budget, how to
undo Models-Genesis corruptions (``genesis``). Volumes without scanner views get anatomy-oriented
views sampled from the foreground's axes (transforms/planes.py); DICOM studies with several series
use their true tags. ``medsight train --init best.pt`` then starts a segmentation ``unet2d`` from
every layer but the last (:func:`init_from_pretrained`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.engine.loop import LoopConfig, MedsightTask, Shared, fit, world
from medsight.errors import MedsightError

PRETEXTS = ("planes", "position", "planes+position", "genesis")
NETWORK = "pretext-unet2d"
# The paper's weighting of the two geometric terms; restoration stands alone.
LOSS_WEIGHTS = {"heatmap": 1.0, "position": 1.0, "restoration": 1.0}


@dataclass(kw_only=True)
class PretrainConfig(LoopConfig):
    out: str = "runs/ssl"
    data: str = ""
    layout: str | None = None
    pretext: str = "planes+position"
    val_fraction: float = 0.2
    split_seed: int | None = None  # default: seed; the same split as `medsight train` with that seed
    max_val_cases: int | None = None
    size: int = 40  # pixels per side of every sampled plane
    spacing: float = 1.0  # mm per pixel of the sampled planes
    sigma: float = 2.0  # pixels: width of the intersection-line ridges
    stack_slices: int = 8
    views: int = 2  # long-axis views sampled per stack (volumes without scanner views)
    batch_size: int | None = None  # stack slices per step; None: two stacks
    network: dict[str, Any] = field(default_factory=dict)  # PretextUNet options besides the heads


def _scan_folder(root: Path) -> list[Path]:
    from medsight.datasets.folders import _scan_files

    return _scan_files(root)


def _normalise(array: np.ndarray) -> np.ndarray:
    """The segmentation engine's MRI normalisation (per-channel clipped z-score), so pretrained
    filters see the intensities fine-tuning will give them. CT gets it too: its window needs labels."""
    from medsight.engine.preprocess import Preprocessing

    return Preprocessing(None).normalise(array)


def read_volumes(cfg: PretrainConfig, progress: bool) -> dict[str, Any]:
    """Images (labels ignored) of a dataset in any layout or of a folder of scans, split by seed:
    ``{"train": [...], "val": [...], "train_ids", "val_ids"}``, each volume normalised."""
    from tqdm import tqdm

    from medsight import io
    from medsight.datasets import open_dataset, split_dataset, train_val_split

    root = Path(cfg.data)
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    try:
        dataset = open_dataset(root, cfg.layout)
    except MedsightError:
        files = _scan_folder(root) if cfg.layout is None else []
        if not files:  # neither a dataset nor a folder of scans: the layout detector's message
            raise
        dataset = None
    if dataset is None:
        by_id = {f.name.split(".")[0]: f for f in files}
        train_ids, val_ids = train_val_split(by_id, cfg.val_fraction, split_seed)

        def load(cid):
            return io.read(by_id[cid])
    else:
        if dataset.dim != 3:
            raise MedsightError("pretraining on imaging planes needs 3D volumes; this dataset is 2D", root)
        train_ids, val_ids = split_dataset(dataset, cfg.val_fraction, split_seed)

        def load(cid):
            return dataset.load_case(dataset.case(cid))[0]

    if not train_ids or not val_ids:
        raise MedsightError("need at least one training and one validation volume", root)
    if cfg.max_val_cases:
        val_ids = val_ids[: cfg.max_val_cases]
    out: dict[str, Any] = {"train_ids": train_ids, "val_ids": val_ids}
    for part, ids in (("train", train_ids), ("val", val_ids)):
        scans = []
        for cid in tqdm(ids, desc=f"reading {part} volumes", disable=not progress, leave=False):
            scan = load(cid)
            if scan.ndim != 3:
                raise MedsightError("is not a 3D volume", scan.path)
            scans.append(scan.with_array(_normalise(scan.array)))
        out[part] = scans
    return out


def read_studies(cfg: PretrainConfig) -> dict[str, Any]:
    """DICOM studies (one folder of series, or a folder of such folders): each gives one stack with
    the other series as its views, targets from the tags; resampled on ``size`` px at ``spacing``."""
    from medsight.datasets.dicom_study import _is_label, _is_series, _study_folders, _subfolders
    from medsight.datasets.splits import train_val_split
    from medsight.transforms.planes import views_from_dicom_study

    studies = {}
    for study in _study_folders(Path(cfg.data)):
        series = [s for s in _subfolders(study) if _is_series(s) and not _is_label(s.name)]
        views = views_from_dicom_study(series, cfg.sigma, cfg.spacing, (cfg.size, cfg.size))
        images = views.stack_images.transpose(1, 0, 2, 3)  # (C, slices, rows, cols): one z-score per stack
        views.stack_images = _normalise(images).transpose(1, 0, 2, 3)
        studies[study.name] = views
    n_views = min(len(v.long_planes) for v in studies.values())
    for views in studies.values():  # a network has one channel per view: the first n of each study
        views.heatmaps, views.long_planes = views.heatmaps[:, :n_views], views.long_planes[:n_views]
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    train_ids, val_ids = train_val_split(studies, cfg.val_fraction, split_seed)
    if not val_ids:  # a single study: its own stack is all there is to check the pretext on
        val_ids = train_ids
    return {
        "train_ids": train_ids,
        "val_ids": val_ids,
        "train": [studies[i] for i in train_ids],
        "val": [studies[i] for i in val_ids],
        "n_views": n_views,
    }


def _genesis_input(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Models-Genesis corruption of z-scored slices ``(B, C, H, W)``: corrupted on their [0, 1]
    min-max scale (where the corruptions are defined) and mapped back, so the network sees
    intensities on the scale fine-tuning gives it."""
    from medsight.transforms.genesis import genesis_corrupt

    out = np.empty_like(images)
    for i, image in enumerate(images):
        low, high = float(image.min()), float(image.max())
        span = max(high - low, 1e-6)
        out[i] = genesis_corrupt((image - low) / span, rng) * span + low
    return out


class PretrainTask(MedsightTask):
    name = "pretrain"
    resume_ignores = {"data"}

    def __init__(self, cfg: PretrainConfig):
        super().__init__(cfg)
        if cfg.pretext not in PRETEXTS:
            raise MedsightError(f"--pretext must be one of {', '.join(PRETEXTS)}, not {cfg.pretext!r}")
        if cfg.stack_slices < 2 or cfg.views < 1 or cfg.size < 8 or cfg.sigma <= 0 or cfg.spacing <= 0:
            raise MedsightError(
                "need --stack-slices >= 2, --views >= 1, --size >= 8 and positive --sigma and --spacing"
            )
        self.heads = {
            "heatmap": "planes" in cfg.pretext,
            "position": "position" in cfg.pretext,
            "restoration": cfg.pretext == "genesis",
        }

    def model_name(self) -> str:
        return NETWORK

    # -- data --------------------------------------------------------------------------------
    def prepare(self) -> None:
        from medsight.datasets.dicom_study import is_dicom_study
        from medsight.models.ssl import PretextUNet
        from medsight.transforms.planes import anatomical_frame

        cfg, rank = self.cfg, world()[0]
        self.dicom = cfg.layout in (None, "dicom-study") and is_dicom_study(Path(cfg.data))
        if self.dicom:
            data = read_studies(cfg)
            n_views, frames = data["n_views"], None
        else:
            data = read_volumes(cfg, progress=cfg.progress and rank == 0)
            n_views = cfg.views
            # the frame (Otsu mask, PCA) costs more than a sample: once per volume
            frames = [anatomical_frame(s, cross_axes="world") for s in data["train"] + data["val"]]
        first = data["train"][0]
        self.in_channels = int(first.stack_images.shape[1] if self.dicom else first.channels)
        self.model_kwargs = {
            "in_channels": self.in_channels,
            "n_views": n_views if self.heads["heatmap"] else 0,
            "position": self.heads["position"],
            "restoration": self.heads["restoration"],
            **cfg.network,
        }
        torch.manual_seed(cfg.seed)
        self.model = PretextUNet(**self.model_kwargs)
        self.data = Shared({**data, "frames": frames})
        self.data.value["val_samples"] = [
            self._sample(i, np.random.default_rng([cfg.seed, 1, i]), part="val")
            for i in range(len(data["val"]))
        ]

    def _views(self, index: int, rng: np.random.Generator, part: str):
        from medsight.transforms.planes import sample_views

        data, cfg = self.data.value, self.cfg
        if self.dicom:
            return data[part][index]
        frame = data["frames"][index + (len(data["train"]) if part == "val" else 0)]
        return sample_views(
            data[part][index], rng, cfg.stack_slices, cfg.views, (cfg.size, cfg.size), cfg.spacing,
            sigma_px=cfg.sigma, frame=frame,
        )  # fmt: skip

    def _sample(self, index: int, rng: np.random.Generator, part: str) -> dict[str, Any]:
        views = self._views(index, rng, part)
        keep = np.arange(len(views.positions))
        if self.dicom and len(keep) > self.cfg.stack_slices:  # a real stack: a random subset of its slices
            keep = np.sort(rng.choice(keep, self.cfg.stack_slices, replace=False))
        images = np.ascontiguousarray(views.stack_images[keep], dtype=np.float32)
        sample = {
            "input": _genesis_input(images, rng) if self.heads["restoration"] else images,
            "heatmap": views.heatmaps[keep],
            "position": views.positions[keep].astype(np.float32),
            "restoration": images,
        }
        return {**sample, "views": views, "keep": keep}

    def make_batch(self, rng: np.random.Generator):
        cfg, data = self.cfg, self.data.value
        wanted = cfg.batch_size or 2 * cfg.stack_slices
        parts = []
        while sum(len(p["input"]) for p in parts) < wanted:
            parts.append(self._sample(int(rng.integers(len(data["train"]))), rng, "train"))
        batch = {k: np.concatenate([p[k] for p in parts])[:wanted] for k in self._target_keys("input")}
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def _target_keys(self, *extra: str) -> list[str]:
        return [*extra, *(k for k, on in self.heads.items() if on)]

    # -- training and validation ---------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        from medsight.models.ssl import pretext_loss

        loss, _ = pretext_loss(self.model(batch["input"]), batch, LOSS_WEIGHTS)
        return loss

    def val_dataloader(self):
        return self.cases_loader(list(range(len(self.data.value["val_samples"]))))

    def on_validation_epoch_start(self) -> None:
        self._val: list[dict[str, float]] = []

    def validation_step(self, index, batch_idx) -> None:
        from medsight.models.ssl import pretext_loss
        from medsight.transforms.planes import Views, pretext_errors

        sample = self.data.value["val_samples"][int(index)]
        targets = {k: torch.from_numpy(sample[k]).to(self.device) for k in self._target_keys()}
        with torch.no_grad():
            out = self.model(torch.from_numpy(sample["input"]).to(self.device))
            loss, terms = pretext_loss(out, targets, LOSS_WEIGHTS)
        row = {"loss": float(loss), **terms}
        if self.heads["heatmap"] or self.heads["position"]:
            views, keep = sample["views"], sample["keep"]
            kept = Views(
                views.stack_images[keep], views.long_images, [views.stack_planes[k] for k in keep],
                views.long_planes, views.heatmaps[keep], views.positions[keep], views.names,
            )  # fmt: skip
            row |= pretext_errors(
                out["heatmap"].float().cpu().numpy() if "heatmap" in out else None,
                out["position"].float().cpu().numpy() if "position" in out else None,
                kept,
            )
        self._val.append(row)

    def on_validation_epoch_end(self) -> None:
        keys = dict.fromkeys(k for row in self._val for k in row)
        means = {k: float(np.nanmean([row.get(k, np.nan) for row in self._val])) for k in keys}
        metrics = {f"val_{k}": v for k, v in means.items()}
        self.record_epoch(-means["loss"], metrics)

    def checkpoint_payload(self) -> dict[str, Any]:
        from medsight.models.ssl import PretextUNet, last_layer_prefix

        cfg, data = self.cfg, self.data.value
        unet = PretextUNet(**self.model_kwargs).unet  # names only: which layers transfer
        last = last_layer_prefix(unet)
        layers = [k for k in unet.state_dict() if not k.startswith(last)]
        return {
            "model": {"name": NETWORK, "kind": "2d", "kwargs": self.model_kwargs},
            "pretext": cfg.pretext,
            "loss_weights": {k: LOSS_WEIGHTS[k] for k in self._target_keys()},
            "labels": {},
            "preprocessing": {"normalisation": "zscore", "in_channels": self.in_channels},
            "views": {
                "source": "dicom-tags" if self.dicom else "anatomical-frame",
                "size": cfg.size,
                "spacing": cfg.spacing,
                "sigma_px": cfg.sigma,
                "stack_slices": cfg.stack_slices,
                "n_views": self.model_kwargs["n_views"],
            },  # fmt: skip
            "transferable": {
                "into": "unet2d",
                "state_prefix": "unet.",  # state_dict keys of the U-Net inside the pretext network
                "excluded": last,
                "layers": len(layers),
            },
            "data": {"root": str(cfg.data), "train_ids": data["train_ids"], "val_ids": data["val_ids"]},
        }

    def summary_of(self, payload: dict[str, Any]) -> dict[str, Any]:
        history = payload.get("training", {}).get("history") or self.history
        best = min(history, key=lambda row: row["val_loss"]) if history else {}
        return {
            "pretext": payload["pretext"],
            "best_epoch": {k: v for k, v in best.items() if k.startswith("val_") or k == "epoch"},
        }


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain; the summary adds the pretext and the validation figures of the best epoch."""
    return fit(PretrainTask(cfg), cfg)


def predictor(path, **options):
    raise MedsightError(
        "is a self-supervised pretraining checkpoint: it cannot segment; fine-tune it with "
        "`medsight train --method unet2d --init` on labelled cases",
        path,
    )


# -- transfer --------------------------------------------------------------------------------------
def check_init(path: str | Path, method: str) -> dict[str, Any]:
    """The payload of a pretraining checkpoint that ``method`` can start from; one-line refusals."""
    from medsight.engine import checkpoint
    from medsight.tasks.registry import task_of

    path = Path(path)
    if method != "unet2d":
        raise MedsightError(f"--init: pretrained weights transfer into unet2d only, not {method}", path)
    payload = checkpoint.load(path)
    if task_of(payload) != "pretrain":
        raise MedsightError(
            f"--init needs a checkpoint of `medsight pretrain`; this one is of task '{task_of(payload)}'",
            path,
        )
    return payload


def init_from_pretrained(model: torch.nn.Module, path: str | Path, method: str) -> dict[str, Any]:
    """Load every layer but the last of a pretraining checkpoint into a fresh segmentation network;
    returns what to record: path, sha256, pretext and the loaded layers. Nothing is loaded on refusal."""
    from medsight.engine import checkpoint
    from medsight.models.ssl import PretextUNet, load_transferable

    path = Path(path)
    payload = check_init(path, method)
    pretext_net = PretextUNet(**payload["model"]["kwargs"])
    pretext_net.load_state_dict(payload["state_dict"])
    try:
        loaded, skipped = load_transferable(model, pretext_net.transferable_state_dict())
    except MedsightError as error:
        raise MedsightError(f"--init: {error.message}", path) from None
    return {
        "path": str(path.resolve()),
        "sha256": checkpoint.sha256_of(path),
        "pretext": payload.get("pretext"),
        "loaded_layers": len(loaded),
        "loaded": loaded,
        "not_loaded": skipped,
    }
