"""The training loop shared by every supervised method.

One call: open the dataset (any supported layout), split it by seed, fit and apply preprocessing,
train with foreground-oversampled slices or patches, validate each epoch, keep ``best.pt`` and
``last.pt``, stop early, and resume from ``last.pt`` after an interruption. Under torchrun
(WORLD_SIZE > 1) it trains with DistributedDataParallel; rank 0 validates and writes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from medsight.errors import MedsightError


@dataclass
class TrainConfig:
    method: str
    data: str
    out: str
    layout: str | None = None
    layout_options: dict[str, Any] = field(default_factory=dict)
    val_fraction: float = 0.2
    seed: int = 0
    split_seed: int | None = None  # defaults to seed; fix it to compare training seeds on one split
    epochs: int = 20
    iters_per_epoch: int = 50
    batch_size: int = 16
    lr: float = 2e-3
    slices: int = 5
    slice_axis: int | None = None  # for 2D/2.5D methods; None chooses (preprocess.choose_slice_axis)
    patience: int = 10  # epochs without a better validation Dice before stopping
    augmentation: str = "spatial"  # "none", "intensity" or "spatial" (rotation and scaling too)
    class_weights: str = "auto"  # "auto": log-damped inverse frequency; "none": plain cross-entropy
    # Spatial axes of the scan array along which mirror images are anatomically plausible and keep
    # their label names (left-right for a bilateral organ without left/right labels). Off by default:
    # only the user knows whether a label set is lateralised.
    mirror_axes: list[int] = field(default_factory=list)
    # > 0: an exponential moving average of the weights (Polyak averaging), updated after every
    # step, is what validation scores and the checkpoints hold; 0 keeps the weights as trained. On
    # by default: on the hippocampus benchmark it raised context25d's median Dice by 0.4 points and
    # narrowed its spread over seeds, and left unet2d and unet3d where they were (README).
    ema_decay: float = 0.999
    max_val_cases: int | None = None
    time_limit_minutes: float | None = None  # a wall-clock budget: stop after the epoch that passes it
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


# What runs saved before an option existed did, where that is not the option's default today.
RAN_WITHOUT_OPTION = {"ema_decay": 0.0}


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _label_lookup(values: list[int]) -> np.ndarray:
    """Stored label value -> class index (0..K-1), so non-contiguous label sets train too."""
    lut = np.zeros(max(values) + 1, np.int64)
    lut[values] = np.arange(len(values))
    return lut


def prepare_data(cfg: TrainConfig, slice_wise: bool, rank: int = 0):
    """Open, split, read and preprocess; returns everything the loop and the checkpoint need."""
    from tqdm import tqdm

    from medsight.datasets import open_dataset, split_dataset
    from medsight.engine.preprocess import Preprocessing

    dataset = open_dataset(cfg.data, cfg.layout, **cfg.layout_options)
    if dataset.dim != 3:
        raise MedsightError("segmentation training needs 3D volumes; this dataset is 2D", cfg.data)
    split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    train_ids, val_ids = split_dataset(dataset, cfg.val_fraction, split_seed)
    if not train_ids or not val_ids:
        raise MedsightError("need at least one training and one validation case", cfg.data)
    if cfg.max_val_cases:
        val_ids = val_ids[: cfg.max_val_cases]

    def load(ids, what):
        pairs = []
        for cid in tqdm(ids, desc=f"reading {what}", disable=not cfg.progress or rank != 0, leave=False):
            image, label = dataset.load_case(dataset.case(cid))
            if label is None:
                raise MedsightError(f"case '{cid}' has no label", cfg.data)
            pairs.append((image, label))
        return pairs

    train_pairs, val_pairs = load(train_ids, "training cases"), load(val_ids, "validation cases")
    values = (
        sorted(dataset.labels)
        if dataset.labels
        else sorted({0} | {int(v) for _, lab in train_pairs for v in np.unique(lab.array)})
    )
    labels = {v: dataset.labels.get(v, f"label_{v}") for v in values}
    lut = _label_lookup(values)
    pre = Preprocessing.fit(
        [i for i, _ in train_pairs],
        [lab for _, lab in train_pairs],
        dataset.modality,
        slice_wise,
        cfg.slice_axis,
    )

    def apply(pairs):
        out = []
        for image, label in pairs:
            work = pre.image(image)
            lab = pre.resample(label, label=True).array[0]
            if lab.max() >= len(lut) or (lut[lab] == 0).sum() != (lab == 0).sum():
                raise MedsightError(
                    f"label values {np.unique(lab).tolist()} outside the classes {values}", image.path
                )
            out.append((work.array.astype(np.float32), lut[lab]))
        return out

    return {
        "dataset": dataset,
        "train_ids": train_ids,
        "val_ids": val_ids,
        "labels": labels,
        "pre": pre,
        "train": apply(train_pairs),
        "val": apply(val_pairs),
    }


def dice_per_class(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> list[float]:
    """Foreground classes only; a class absent from both counts as 1 (nothing to find, nothing found)."""
    out = []
    for c in range(1, n_classes):
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        out.append(1.0 if denom == 0 else 2.0 * (p & r).sum() / denom)
    return out


def class_weights(labels: list[np.ndarray], n_classes: int) -> list[float]:
    """Log-damped inverse frequency, ``1 + ln(f_background / f_c)``: small lesions weigh more, but
    not by the raw frequency ratio (hundreds for a small lesion), which makes the network paint
    foreground everywhere early in training."""
    counts = np.bincount(np.concatenate([y.ravel() for y in labels]), minlength=n_classes).astype(float)
    counts = np.maximum(counts, 1.0)
    return [1.0] + [float(1.0 + np.log(max(counts[0] / c, 1.0))) for c in counts[1:]]


def patch_size(kind: str, shapes: list[tuple[int, ...]], slice_axis: int) -> tuple[int, ...]:
    from medsight.engine.sampling import round_up

    biggest = np.max(np.array(shapes), axis=0)
    if kind == "3d":
        return tuple(min(round_up(int(n)), 96) for n in biggest)
    in_plane = [int(n) for a, n in enumerate(biggest) if a != slice_axis]
    return tuple(min(round_up(n), 256) for n in in_plane)


def adamw(parameters, lr: float):
    """The optimiser of every medsight trainer: AdamW with weight decay 1e-4, fused.

    The fused kernel updates all tensors in one call instead of a Python loop over them; for
    networks made of many small tensors (the 2.5D network, LViT) that is 5-10% of a CPU
    training step.
    """
    import torch

    return torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4, fused=True)


def average_decay(decay: float, updates: int) -> float:
    """The decay of the ``updates + 1``-th weight-average update: ``decay``, but at most
    ``(1 + n) / (10 + n)`` so that a short run's average follows its training instead of its
    random initialisation (the warm-up of TensorFlow's ExponentialMovingAverage)."""
    return min(decay, (1 + updates) / (10 + updates))


def check_decay(decay: float) -> None:
    if not 0.0 <= decay < 1.0:
        raise MedsightError(f"the weight-average decay must be in [0, 1), not {decay}")


def weight_average(model, decay: float):
    """An exponential moving average of ``model``'s weights (and buffers), or None for ``decay`` 0:
    each :meth:`update_parameters` call sets ``w_avg <- d * w_avg + (1 - d) * w`` with ``d`` from
    :func:`average_decay` (the first call copies ``w``)."""
    import torch
    from torch.optim.swa_utils import AveragedModel

    check_decay(decay)
    if decay == 0.0:
        return None

    def update(averaged: list, current: list, updates) -> None:
        if averaged[0].is_floating_point():  # tensors come grouped by dtype; counters are not averaged
            torch._foreach_lerp_(averaged, current, 1.0 - average_decay(decay, int(updates)))

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def check_resumable(saved: dict[str, Any], cfg, ignore: set[str], flags: dict[str, str], path: Path) -> None:
    """Refuse to resume with options that shape the run (network, data, schedule, budget, seed)
    changed: the resumed run would be another experiment with a borrowed history. ``saved`` is the
    run's stored config, ``cfg`` the new one (a dataclass); the options are named as on the command
    line (``flags`` maps the fields whose flag is not ``--field-name``). An option newer than the
    run is missing from its stored config: the run had the option's default, or the value in
    ``RAN_WITHOUT_OPTION`` where the default has changed since."""
    ignore = ignore | {"out", "resume", "overwrite", "progress"}
    defaults = {
        f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(cfg)
    }
    defaults |= RAN_WITHOUT_OPTION
    changed = [
        "--" + flags.get(key, key.replace("_", "-"))
        for key, value in asdict(cfg).items()
        if key not in ignore and saved.get(key, defaults[key]) != value
    ]
    if changed:
        raise MedsightError(
            f"was started with other options ({', '.join(changed)}); "
            "resume with the same ones or pass --overwrite",
            path,
        )


def train(cfg: TrainConfig, return_model: bool = False):
    """Train; return a summary (best Dice, epochs, seconds, validation ids, checkpoint paths), and
    with ``return_model`` also the network as it ended (what each DDP process holds)."""
    import torch
    from tqdm import tqdm

    from medsight.engine import checkpoint
    from medsight.engine.augment import LEVELS, Augmenter
    from medsight.engine.infer import probabilities
    from medsight.engine.sampling import PatchSampler, to_working
    from medsight.io import check_run_folder
    from medsight.losses import WeightedCEDiceLoss, require_finite_loss
    from medsight.models.registry import MODELS, build_model

    if cfg.method not in MODELS:
        raise MedsightError(f"unknown method '{cfg.method}'; choose one of {', '.join(MODELS)}")
    kind = MODELS[cfg.method].input_kind
    if any(a not in (0, 1, 2) for a in cfg.mirror_axes) or len(set(cfg.mirror_axes)) != len(cfg.mirror_axes):
        raise MedsightError(f"mirror axes must be distinct spatial axes 0, 1 or 2, not {cfg.mirror_axes}")
    # Options are checked before any file is read or folder made.
    check_decay(cfg.ema_decay)
    if cfg.class_weights not in ("auto", "none"):
        raise MedsightError(f"class_weights must be 'auto' or 'none', not {cfg.class_weights!r}")
    if cfg.augmentation not in LEVELS:
        raise MedsightError(f"augmentation must be one of {', '.join(LEVELS)}, not {cfg.augmentation!r}")
    if kind == "2.5d" and (cfg.slices < 1 or cfg.slices % 2 == 0):
        raise MedsightError(f"slices must be odd (the centre slice is the one segmented), not {cfg.slices}")
    rank, world = _distributed()
    out = check_run_folder(cfg.out)
    last_path, best_path = out / "last.pt", out / "best.pt"
    resuming = cfg.resume and last_path.exists() and not cfg.overwrite
    if rank == 0:
        if last_path.exists() and not (cfg.resume or cfg.overwrite):
            raise MedsightError(
                "holds a training run already; pass --resume to continue it or --overwrite", out
            )
        if cfg.resume and not last_path.exists():
            print(f"no run to resume in {out}; starting a new one")
        if resuming:
            saved = checkpoint.load(last_path, method=cfg.method)["training"]["config"]
            check_resumable(saved, cfg, {"data"}, {"time_limit_minutes": "time-limit"}, last_path)

    start = time.perf_counter()
    data = prepare_data(cfg, slice_wise=kind != "3d", rank=rank)
    pre, labels = data["pre"], data["labels"]
    n_classes = len(labels)
    slices = cfg.slices if kind == "2.5d" else 1
    model_kwargs = {"in_channels": pre.in_channels, "num_classes": n_classes, **cfg.model_kwargs}
    if kind == "2.5d":
        model_kwargs["slices"] = slices
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.method, **model_kwargs)
    optimiser = adamw(model.parameters(), cfg.lr)
    average = weight_average(model, cfg.ema_decay)
    scored = average.module if average is not None else model  # validated, saved, predicted with
    total_iters = cfg.epochs * cfg.iters_per_epoch
    budget = 60 * cfg.time_limit_minutes if cfg.time_limit_minutes else None

    def poly_lr(iteration: int, elapsed: float) -> float:
        """Poly decay over whichever runs out first, the epochs or the time budget, so a run cut
        short by its budget still ends on a small learning rate."""
        progress = iteration / total_iters
        if budget:
            progress = max(progress, elapsed / budget)
        return cfg.lr * (1 - min(progress, 0.999)) ** 0.9

    weights = class_weights([y for _, y in data["train"]], n_classes) if cfg.class_weights == "auto" else None
    loss_fn = WeightedCEDiceLoss(n_classes, class_weights=weights)

    history: list[dict[str, Any]] = []
    best, first_epoch, stale = -1.0, 0, 0
    if resuming:
        state = checkpoint.load(last_path, method=cfg.method)
        model.load_state_dict(state["training"].get("weights", state["state_dict"]))
        if average is not None:
            scored.load_state_dict(state["state_dict"])
            average.n_averaged.fill_(state["training"].get("average_updates", 0))
        optimiser.load_state_dict(state["training"]["optimiser"])
        start -= state["training"]["elapsed"]  # the time budget covers the whole run, not each leg
        history, best = state["training"]["history"], state["training"]["best"]
        first_epoch, stale = state["training"]["epoch"] + 1, state["training"]["stale"]
        if rank == 0:
            print(f"resuming {cfg.method} after epoch {first_epoch} (best Dice so far {best:.4f})")

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)

    train_work = data["train"]
    if kind != "3d":  # slice-wise samplers want the slice axis last
        train_work = [
            (to_working(x, pre.slice_axis), to_working(y[None], pre.slice_axis)[0]) for x, y in train_work
        ]
    patch = patch_size(kind, [y.shape for _, y in data["train"]], pre.slice_axis)
    augmenter = Augmenter(kind, cfg.augmentation, patch)
    payload_base = {
        "model": {"name": cfg.method, "kind": kind, "slices": slices, "kwargs": model_kwargs},
        "labels": {int(k): v for k, v in labels.items()},
        "preprocessing": pre.to_dict(),
        "patch": list(patch),
        "mirror_axes": sorted(cfg.mirror_axes),
        "data": {
            "root": str(cfg.data),
            "train_ids": data["train_ids"],
            "val_ids": data["val_ids"],
            "seed": cfg.seed,
        },
    }

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scored(torch.from_numpy(x)).numpy()

    if rank == 0:  # made only now, so a run refused over its data or options leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
    stop_reason = ""
    if resuming and (stale >= cfg.patience or (budget and time.perf_counter() - start > budget)):
        first_epoch = cfg.epochs  # the run had already stopped: nothing to continue
        stop_reason = "it had already stopped"
    for epoch in range(first_epoch, cfg.epochs):
        rng = np.random.default_rng(
            [cfg.seed, rank, epoch]
        )  # per-epoch streams: a resumed run samples as an unbroken one
        sampler = PatchSampler(
            [x for x, _ in train_work],
            [y for _, y in train_work],
            kind,
            patch,
            slices,
            rng,
            mirror_axes=cfg.mirror_axes,
            slice_axis=pre.slice_axis,
        )
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        if world > 1:  # every process must step with the same learning rate
            torch.distributed.broadcast(elapsed, src=0)
        model.train()
        losses = []
        bar = tqdm(
            range(cfg.iters_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress or rank != 0,
            leave=False,
        )
        for step in bar:
            lr = poly_lr(epoch * cfg.iters_per_epoch + step, elapsed.item())
            for group in optimiser.param_groups:
                group["lr"] = lr
            x, y = augmenter(*sampler.batch(cfg.batch_size), rng)
            loss = require_finite_loss(loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y)), epoch, step)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if average is not None:
                average.update_parameters(model)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")

        stop = torch.zeros(1)
        if rank == 0:
            scored.eval()
            scores = []
            for x, y in data["val"]:
                pred = np.argmax(probabilities(forward, x, kind, slices, patch, pre.slice_axis), axis=0)
                scores.append(dice_per_class(pred, y, n_classes))
            per_class = np.mean(scores, axis=0)
            mean_dice = float(per_class.mean())
            record = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "val_mean_dice": mean_dice,
                **{
                    f"val_dice_{labels[v]}": float(d)
                    for v, d in zip(list(labels)[1:], per_class, strict=True)
                },
                "lr": lr,
                "seconds": round(time.perf_counter() - start, 1),
            }
            history.append(record)
            improved = mean_dice > best
            best, stale = (mean_dice, 0) if improved else (best, stale + 1)
            training_state = {
                "epoch": epoch,
                "optimiser": optimiser.state_dict(),
                "elapsed": time.perf_counter() - start,
                "history": history,
                "best": best,
                "stale": stale,
                "config": asdict(cfg),
            }
            if average is not None:  # resuming needs the trained weights as well as their average
                training_state["weights"] = model.state_dict()
                training_state["average_updates"] = int(average.n_averaged)
            payload = {**payload_base, "state_dict": scored.state_dict(), "training": training_state}
            save_epoch(out, payload, history, mean_dice, improved, cfg.progress)
            if stale >= cfg.patience:
                stop_reason = f"no better validation Dice for {cfg.patience} epochs"
            elif budget and time.perf_counter() - start > budget:
                stop_reason = f"the {cfg.time_limit_minutes:g}-minute budget is used"
            stop[0] = float(bool(stop_reason))
        if world > 1:
            torch.distributed.broadcast(stop, src=0)
        if stop.item():
            if rank == 0 and cfg.progress:
                print(f"stopped after epoch {epoch + 1}: {stop_reason}")
            break
    if rank == 0 and first_epoch == cfg.epochs and stop_reason:
        print(f"nothing to resume in {out}: {stop_reason}")

    summary = {
        "method": cfg.method,
        "best_val_mean_dice": best,
        "epochs_run": len(history),
        "train_seconds": round(time.perf_counter() - start, 1),
        "val_ids": data["val_ids"],
        "best": str(best_path),
        "last": str(last_path),
        "rank": rank,  # only rank 0 validates: the others know no Dice
    }
    if rank == 0:
        from medsight.io import write_text

        write_text(out / "summary.json", json.dumps(summary, indent=2), overwrite=True)
    return (summary, model) if return_model else summary


def save_epoch(
    out: Path,
    payload: dict,
    history: list[dict[str, Any]],
    dice: float,
    improved: bool,
    progress: bool,
    resume_only: dict[str, Any] | None = None,
) -> None:
    """End of a validated epoch: ``last.pt`` (and ``best.pt`` when it improved), metrics.csv, the
    training curve and a one-line report. Shared by every training loop that validates by Dice.

    ``resume_only`` joins the training state of ``last.pt`` alone: bulky state that only a resumed
    run needs (pseudo-labels) stays out of ``best.pt``, the file users keep and ship."""
    import pandas as pd

    from medsight.engine import checkpoint
    from medsight.io import write_text
    from medsight.report.curves import plot_curves

    if improved:
        checkpoint.save(out / "best.pt", payload)
    if resume_only:
        payload = {**payload, "training": {**payload["training"], **resume_only}}
    checkpoint.save(out / "last.pt", payload)
    write_text(out / "metrics.csv", pd.DataFrame(history).to_csv(index=False), overwrite=True)
    plot_curves(history, out / "training_curve.png", overwrite=True)
    if progress:
        loss = history[-1]["train_loss"]
        print(
            f"epoch {len(history)}: loss {loss:.4f}  val Dice {dice:.4f}{'  *best*' if improved else ''}",
            flush=True,
        )
