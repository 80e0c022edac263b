"""Supervised segmentation (unet2d, context25d, unet3d) as a task of the training loop.

Open the dataset (any supported layout), split it by seed, fit the preprocessing and write each case
once into the on-disk case cache (engine/cache.py; ``--cache``), plan batch and patch sizes from the
cached shapes, train on foreground-oversampled slices or patches read from the memory-mapped cases
(in DataLoader workers with ``--num-workers``), validate each epoch by mean Dice over the foreground
classes, one cached case in memory at a time. Memory does not grow with the number of cases. 2D datasets (pictures: PNG, TIFF,
JPEG...; 1 or 3 channels) train the 2D network on one-slice volumes (``preprocess.as_volume``). Everything else (devices, resume, best/last, early stop,
weight average, DDP) is the loop's: :mod:`medsight.engine.loop`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medsight.engine.loop import LoopConfig, MedsightTask, Shared, fit, world
from medsight.errors import MedsightError


@dataclass(kw_only=True)
class SegmentationConfig(LoopConfig):
    method: str = "context25d"
    data: str = ""
    layout: str | None = None
    layout_options: dict[str, Any] = field(default_factory=dict)
    val_fraction: float = 0.2
    split_seed: int | None = None  # defaults to seed; fix it to compare training seeds on one split
    slices: int = 5
    slice_axis: int | None = None  # for 2D/2.5D methods; None chooses (preprocess.choose_slice_axis)
    # Slicing planes of a slice-wise method: 1 (the slice axis) or 3 (the three orthogonal planes,
    # trained on and averaged: near-isotropic volumes only).
    slice_planes: int = 1
    patch_size: list[int] | None = None  # None: planned from the data (engine/plan.py)
    memory_budget: float = 512.0  # MB of activations per batch the plan aims at
    spacing: list[float] | None = None  # target spacing of the axes the network sees; None: the median
    augmentation: str = "spatial"  # "none", "intensity" or "spatial" (rotation and scaling too)
    class_weights: str = "auto"  # "auto": log-damped inverse frequency; "none": plain cross-entropy
    # Spatial axes along which mirror images are anatomically plausible and keep their label names.
    mirror_axes: list[int] = field(default_factory=list)
    max_val_cases: int | None = None
    init: str | None = None  # a `medsight pretrain` checkpoint: every layer but the last (unet2d)
    labeled_cases: int | None = None  # keep this many labelled training cases, drawn by seed
    labeled_ids: list[str] | None = None  # or exactly these training cases
    cache: str | None = None  # folder of preprocessed cases; None: $MEDSIGHT_CACHE or ~/.cache/medsight
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def dice_per_class(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> list[float]:
    """Foreground classes only; a class absent from both counts as 1 (nothing to find, nothing found)."""
    out = []
    for c in range(1, n_classes):
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        out.append(1.0 if denom == 0 else 2.0 * (p & r).sum() / denom)
    return out


def class_weights(labels: list[np.ndarray], n_classes: int) -> list[float]:
    """:func:`weights_from_counts` of the voxels of each class in ``labels``."""
    return weights_from_counts(np.bincount(np.concatenate([y.ravel() for y in labels]), minlength=n_classes))


def weights_from_counts(counts) -> list[float]:
    """Log-damped inverse frequency, ``1 + ln(f_background / f_c)``: small lesions weigh more, but
    not by the raw frequency ratio (hundreds for a small lesion), which makes the network paint
    foreground everywhere early in training."""
    counts = np.maximum(np.asarray(counts, dtype=float), 1.0)
    return [1.0] + [float(1.0 + np.log(max(counts[0] / c, 1.0))) for c in counts[1:]]


def labeled_subset(
    train_ids: list[str], val_ids: list[str], n: int | None, ids: list[str] | None, seed: int, root
) -> list[str]:
    """The training cases whose labels a few-label run keeps: ``n`` drawn by ``seed``, or ``ids``
    (which must be training cases: a validation case would leak into training)."""
    if n is not None and ids:
        raise MedsightError("give --labeled-cases or --labeled-ids, not both")
    if ids:
        leaked = [i for i in ids if i in val_ids]
        unknown = [i for i in ids if i not in train_ids and i not in val_ids]
        if leaked or unknown:
            what = "validation case(s)" if leaked else "unknown case(s)"
            raise MedsightError(f"--labeled-ids names {what}: {', '.join(leaked or unknown)}", root)
        return [i for i in train_ids if i in set(ids)]
    if n is None:
        return train_ids
    if not 1 <= n <= len(train_ids):
        raise MedsightError(
            f"--labeled-cases must be between 1 and {len(train_ids)} (the training cases), not {n}"
        )
    # a stream of its own: the split's permutation (same seed) must not decide which cases are kept
    chosen = set(np.random.default_rng([seed, 26]).choice(len(train_ids), n, replace=False).tolist())
    return [cid for k, cid in enumerate(train_ids) if k in chosen]


def check_method_fits(method: str, kind: str, dim: int, data) -> None:
    """2D pictures have no neighbouring slices (context25d) and no depth (unet3d)."""
    if dim == 2 and kind != "2d":
        raise MedsightError(
            f"--method {method} needs 3D volumes; this dataset holds 2D images: use --method unet2d", data
        )


def prepare_data(cfg: SegmentationConfig, kind: str, progress: bool = True) -> dict[str, Any]:
    """Open and split the dataset, fit the preprocessing and cache every case on disk, one case at a
    time (engine/cache.py: reused across runs, rebuilt when the files or the preprocessing change);
    ``train``/``val`` are lists of :class:`~medsight.engine.cache.CachedCase`, memory-mapped; a 2D
    dataset's cases are one-slice volumes."""
    from medsight.datasets import open_dataset, split_dataset
    from medsight.engine.cache import CaseCache, fit_preprocessing

    dataset = open_dataset(cfg.data, cfg.layout, **cfg.layout_options)
    check_method_fits(cfg.method, kind, dataset.dim, cfg.data)
    slice_axis = cfg.slice_axis
    if dataset.dim == 2:
        if slice_axis not in (None, 2):
            raise MedsightError(f"--slice-axis {slice_axis} means nothing for 2D images; leave it out")
        slice_axis = 2  # the one-slice axis as_volume adds
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    train_ids, val_ids = split_dataset(dataset, cfg.val_fraction, split_seed)
    if not train_ids or not val_ids:
        raise MedsightError("need at least one training and one validation case", cfg.data)
    train_ids = labeled_subset(train_ids, val_ids, cfg.labeled_cases, cfg.labeled_ids, cfg.seed, cfg.data)
    if cfg.max_val_cases:
        val_ids = val_ids[: cfg.max_val_cases]
    try:
        pre, values = fit_preprocessing(
            dataset, train_ids, kind != "3d", slice_axis, cfg.cache, progress, spacing=cfg.spacing
        )
    except ValueError as error:
        raise MedsightError(f"--spacing: {error}") from None
    cache = CaseCache(cfg.cache, pre, values, progress)
    return {
        "train_ids": train_ids,
        "val_ids": val_ids,
        "labels": {v: dataset.labels.get(v, f"label_{v}") for v in values},
        "label_mapping": {int(k): int(v) for k, v in dataset.label_mapping.items()},
        "pre": pre,
        "train": cache.build(dataset, train_ids),
        "val": cache.build(dataset, val_ids),
    }


def slice_axes(planes: int, pre, cases, root) -> list[int]:
    """The slice axes a slice-wise network is trained and predicts along: the planned one, then with
    three planes the other two, which need 3D volumes of near-cubic voxels (preprocess.unlike_spacing)."""
    from medsight.engine.preprocess import unlike_spacing

    if planes == 1:
        return [pre.slice_axis]
    if pre.dim == 2:
        raise MedsightError("--slice-planes 3 needs 3D volumes; this dataset holds 2D images", root)
    spacing = np.median([np.linalg.norm(c.affine[:3, :3], axis=0) for c in cases], axis=0)
    if mm := unlike_spacing(spacing):
        raise MedsightError(
            f"--slice-planes 3 needs near-isotropic voxels; these are {mm}: use --slice-planes 1", root
        )
    return [pre.slice_axis] + [a for a in range(3) if a != pre.slice_axis]


class SegmentationTask(MedsightTask):
    name = "segmentation"
    resume_ignores = {"data", "cache"}
    config_class = SegmentationConfig
    score_name = "validation mean Dice"

    @classmethod
    def methods(cls) -> list[str]:
        from medsight.models.registry import MODELS

        return list(MODELS)

    def __init__(self, cfg: SegmentationConfig):
        from medsight.engine.augment import LEVELS
        from medsight.models.registry import MODELS

        super().__init__(cfg)
        if cfg.method not in MODELS:
            raise MedsightError(f"unknown method '{cfg.method}'; choose one of {', '.join(MODELS)}")
        self.kind = MODELS[cfg.method].input_kind
        axes = cfg.mirror_axes
        if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise MedsightError(f"mirror axes must be distinct spatial axes 0, 1 or 2, not {axes}")
        if cfg.class_weights not in ("auto", "none"):
            raise MedsightError(f"class_weights must be 'auto' or 'none', not {cfg.class_weights!r}")
        if cfg.augmentation not in LEVELS:
            raise MedsightError(f"augmentation must be one of {', '.join(LEVELS)}, not {cfg.augmentation!r}")
        if self.kind == "2.5d" and (cfg.slices < 1 or cfg.slices % 2 == 0):
            raise MedsightError(
                f"slices must be odd (the centre slice is the one segmented), not {cfg.slices}"
            )
        if cfg.slice_planes not in (1, 3) or (cfg.slice_planes == 3 and self.kind == "3d"):
            raise MedsightError(
                f"--slice-planes must be 1 or 3 (3: slice-wise methods only), not {cfg.slice_planes} "
                f"for {cfg.method}"
            )
        self.slices = cfg.slices if self.kind == "2.5d" else 1
        self.init = None
        if cfg.init:  # refused before any data is read
            from medsight.tasks.ssl import check_init

            check_init(cfg.init, cfg.method)

    def model_name(self) -> str:
        return self.cfg.method

    def prepare(self) -> None:
        from medsight.engine import plan
        from medsight.engine.augment import Augmenter
        from medsight.engine.cache import class_counts, patch_sampler
        from medsight.losses import WeightedCEDiceLoss
        from medsight.models.registry import build_model

        cfg, rank = self.cfg, world()[0]
        data = prepare_data(cfg, self.kind, progress=cfg.progress and rank == 0)
        pre, self.labels = data["pre"], data["labels"]
        n_classes = len(self.labels)
        self.slice_axes = slice_axes(cfg.slice_planes, pre, data["train"], cfg.data)
        shapes = [c.meta["shape"] for c in data["train"]]
        plans = [
            plan.plan(plan.fingerprint(shapes, pre.in_channels, axis), self.kind, cfg.memory_budget,
                      cfg.batch_size, cfg.patch_size)
            for axis in self.slice_axes
        ]  # fmt: skip
        # One batch size for every plane (the smallest), each plane its own window.
        smallest = min(plans, key=lambda p: p["batch_size"])
        self.plan = {**plans[0], **{k: smallest[k] for k in ("batch_size", "planned_batch_size")}}
        if len(plans) > 1:
            self.plan["plane_patches"] = [p["patch"] for p in plans]
        if rank == 0 and cfg.progress:
            print(plan.describe(self.plan, cfg.method))
        self.model_kwargs = {"in_channels": pre.in_channels, "num_classes": n_classes, **cfg.model_kwargs}
        if self.kind == "2.5d":
            self.model_kwargs["slices"] = self.slices
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.method, **self.model_kwargs)
        if cfg.init:
            from medsight.tasks.ssl import init_from_pretrained

            self.init = init_from_pretrained(self.model, cfg.init, cfg.method)
        counts = class_counts(data["train"], n_classes)
        weights = weights_from_counts(counts) if cfg.class_weights == "auto" else None
        self.loss_fn = WeightedCEDiceLoss(n_classes, class_weights=weights)
        samplers = []  # (sampler, augmenter) per plane
        for axis, planned in zip(self.slice_axes, plans, strict=True):
            patch = tuple(planned["patch"])
            sampler = patch_sampler(
                data["train"],
                self.kind,
                patch,
                self.slices,
                mirror_axes=cfg.mirror_axes,
                slice_axis=axis,
                transpose=pre.dim == 2,
            )
            samplers.append((sampler, Augmenter(self.kind, cfg.augmentation, patch)))
        self.data = Shared({**data, "samplers": samplers})
        self.pre = pre

    def make_batch(self, rng: np.random.Generator):
        samplers = self.data.value["samplers"]
        # a batch is cut in one plane, drawn uniformly (a single plane draws nothing)
        sampler, augmenter = samplers[int(rng.integers(len(samplers))) if len(samplers) > 1 else 0]
        sampler.rng = rng
        x, y = augmenter(*sampler.batch(self.plan["batch_size"]), rng)
        return torch.from_numpy(x), torch.from_numpy(y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self.model(x), y)

    def val_dataloader(self):
        return self.cases_loader(self.data.value["val"])

    def on_validation_epoch_start(self) -> None:
        self._scores: list[list[float]] = []

    def _forward(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def validation_step(self, case, batch_idx) -> None:
        from medsight.engine.infer import probabilities

        x, y = case.load()  # one cached case in memory at a time
        patch = self.plan["patch"]
        pred = np.argmax(
            probabilities(self._forward, x, self.kind, self.slices, patch, self.slice_axes), axis=0
        )
        self._scores.append(dice_per_class(pred, y, len(self.labels)))

    def on_validation_epoch_end(self) -> None:
        per_class = np.mean(self._scores, axis=0)
        names = list(self.labels.values())[1:]
        metrics = {"val_mean_dice": float(per_class.mean())}
        metrics |= {f"val_dice_{n}": float(d) for n, d in zip(names, per_class, strict=True)}
        self.record_epoch(metrics["val_mean_dice"], metrics)

    def checkpoint_payload(self) -> dict[str, Any]:
        data = self.data.value
        return {
            "model": {
                "name": self.cfg.method,
                "kind": self.kind,
                "slices": self.slices,
                "kwargs": self.model_kwargs,
            },
            "labels": {int(k): v for k, v in self.labels.items()},
            "label_mapping": data["label_mapping"],
            "preprocessing": self.pre.to_dict(),
            "patch": list(self.plan["patch"]),
            "plan": self.plan,
            "mirror_axes": sorted(self.cfg.mirror_axes),
            "slice_axes": list(self.slice_axes),
            "data": {
                "root": str(self.cfg.data),
                "train_ids": data["train_ids"],
                "val_ids": data["val_ids"],
                "seed": self.cfg.seed,
            },
            **({"init": self.init} if self.init else {}),
        }

    def summary_of(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"method": payload["model"]["name"], "val_ids": payload["data"]["val_ids"]}


def train(cfg: SegmentationConfig, return_model: bool = False):
    """Train; return a summary (best Dice, epochs, seconds, validation ids, checkpoint paths), and
    with ``return_model`` also the network as it ended (what each DDP process holds)."""
    task = SegmentationTask(cfg)
    summary = fit(task, cfg)
    summary["best_val_mean_dice"] = summary["best_val_score"]
    return (summary, task.model) if return_model else summary


def predictor(path, **options):
    from medsight.engine.infer import Predictor

    return Predictor(path, **options)
