"""The one training loop of medsight, on PyTorch Lightning.

Every method is a :class:`MedsightTask` (a ``LightningModule``) and trains through :func:`fit`,
which builds the one Trainer set-up they share. Lightning does what it does well: devices and
precision, DDP under torchrun, the time budget (its ``Timer``, checked at epoch ends), early stopping,
the weight average (``WeightAveraging``), best/last ``.ckpt`` files and resuming from them, the
progress bar and Ctrl-C. What stays ours: the run-folder check and the refusal to resume with other
options, per-step seeded random streams (a resumed run samples as an unbroken one), the budget-aware
poly learning rate, and the self-describing ``best.pt``/``last.pt`` (engine/checkpoint.py),
metrics.csv, training_curve.png and summary.json written beside Lightning's state.

See docs/architecture.md for how a method becomes a task.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, TQDMProgressBar

from medsight.errors import MedsightError

LIGHTNING_DIR = "lightning"  # Lightning's own resume state, inside the run folder
PRECISIONS = ("32", "32-true", "64", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


@dataclass(kw_only=True)
class LoopConfig:
    """The options every trainer shares; a task's config subclasses it. On the command line each is
    ``--field-name``."""

    out: str = "runs/train"
    seed: int = 0
    epochs: int = 20
    steps_per_epoch: int = 50
    batch_size: int | None = None  # None: the task's plan chooses it from the data
    lr: float = 2e-3
    # Fraction of the planned steps over which the learning rate rises linearly from near 0 (Goyal
    # et al. 2017), for runs whose first Adam updates (every weight moved by about the full rate)
    # decide too much. Off by default: 5% on the hippocampus halved context25d's seed spread but cost
    # unet2d 0.15 points on average (benchmarks/README.md).
    lr_warmup: float = 0.0
    time_limit: float | None = None  # minutes of training; checked after each epoch
    patience: int = 10  # epochs without a better val_score before stopping
    # > 0: an exponential moving average of the weights, updated after every step, is what validation
    # scores and the checkpoints hold. It raised context25d's median hippocampus Dice by 0.4 points.
    ema_decay: float = 0.999
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto: 16-mixed (bf16-mixed where supported) on CUDA, 32 elsewhere
    num_workers: int = 0  # DataLoader worker processes that sample training batches
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


# Options that do not change what a run computes: free to differ when resuming.
RUN_ONLY = {"out", "resume", "overwrite", "progress", "device", "num_workers"}
# What runs saved before an option existed did, where that is not the option's default today.
RAN_WITHOUT_OPTION = {"ema_decay": 0.0}


# -- devices ---------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``--device`` -> a torch device; asking for hardware that is absent is a one-line error."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise MedsightError("--device mps: no Apple GPU (MPS) is available on this machine")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise MedsightError(f"--device {name}: the CUDA index must be a number, e.g. cuda:0")
        if not torch.cuda.is_available():
            raise MedsightError(
                f"--device {name}: no CUDA device is available (this torch {torch.__version__} "
                f"{'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'}); use --device cpu"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise MedsightError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    raise MedsightError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {name!r}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``--precision`` -> a Lightning precision; auto is mixed precision on CUDA only (CPU autocast
    is slower than float32 for these networks)."""
    precision = (precision or "auto").strip().lower()
    if precision == "auto":
        if device.type != "cuda":
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if precision not in PRECISIONS:
        raise MedsightError(f"--precision must be auto or one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, before any process group exists."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def trainer_devices(device: torch.device) -> dict[str, Any]:
    """Accelerator, devices, nodes and strategy for the Trainer. Under torchrun (WORLD_SIZE > 1)
    DDP with NCCL only when the model really is on CUDA; gloo otherwise."""
    from lightning.pytorch.strategies import DDPStrategy

    accelerator = {"cuda": "cuda", "mps": "mps"}.get(device.type, "cpu")
    _, size = world()
    if size > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        backend = "nccl" if accelerator == "cuda" else "gloo"
        return {
            "accelerator": accelerator,
            "devices": local,
            "num_nodes": max(1, size // local),
            "strategy": DDPStrategy(process_group_backend=backend),
        }
    devices = [device.index] if accelerator == "cuda" and device.index is not None else 1
    return {"accelerator": accelerator, "devices": devices, "strategy": "auto"}


# -- helpers every trainer uses ----------------------------------------------------------------------
def adamw(parameters, lr: float):
    """The optimiser of every medsight trainer: AdamW with weight decay 1e-4, fused (one kernel for
    all tensors: 5-10% of a CPU step for networks made of many small tensors)."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4, fused=True)


def average_decay(decay: float, updates: int) -> float:
    """The decay of the ``updates + 1``-th weight-average update: ``decay``, but at most
    ``(1 + n) / (10 + n)`` so that a short run's average follows its training instead of its
    random initialisation (the warm-up of TensorFlow's ExponentialMovingAverage)."""
    return min(decay, (1 + updates) / (10 + updates))


def check_decay(decay: float) -> None:
    if not 0.0 <= decay < 1.0:
        raise MedsightError(f"the weight-average decay must be in [0, 1), not {decay}")


def average_update(decay: float):
    """``multi_avg_fn`` of torch's AveragedModel: ``w_avg <- d * w_avg + (1 - d) * w`` with ``d`` from
    :func:`average_decay` (the first update copies ``w``)."""

    def update(averaged: list, current: list, updates) -> None:
        if averaged[0].is_floating_point():  # tensors come grouped by dtype; counters are not averaged
            torch._foreach_lerp_(averaged, current, 1.0 - average_decay(decay, int(updates)))

    return update


def weight_average(model, decay: float):
    """An exponential moving average of ``model``'s weights (and buffers), or None for ``decay`` 0,
    for trainers outside the loop; the loop uses Lightning's WeightAveraging with the same rule."""
    from torch.optim.swa_utils import AveragedModel

    check_decay(decay)
    if decay == 0.0:
        return None
    return AveragedModel(model, multi_avg_fn=average_update(decay), use_buffers=True)


def poly_factor(
    step: int, total_steps: int, elapsed: float, budget: float | None, warmup: float = 0.0
) -> float:
    """Poly decay over whichever runs out first, the steps or the time budget (seconds), so a run
    cut short by its budget still ends on a small learning rate; times a linear rise over the first
    ``warmup`` fraction of the steps."""
    progress = step / max(total_steps, 1)
    if budget:
        progress = max(progress, elapsed / budget)
    rise = min(1.0, (step + 1) / (warmup * total_steps)) if warmup > 0 else 1.0
    return rise * (1 - min(progress, 0.999)) ** 0.9


def check_resumable(saved: dict[str, Any], cfg, ignore: set[str], flags: dict[str, str], path: Path) -> None:
    """Refuse to resume with options that shape the run (network, data, schedule, budget, seed)
    changed: the resumed run would be another experiment with a borrowed history. ``saved`` is the
    run's stored config, ``cfg`` the new one (a dataclass); the options are named as on the command
    line (``flags`` maps the fields whose flag is not ``--field-name``). An option newer than the
    run is missing from its stored config: the run had the option's default, or the value in
    ``RAN_WITHOUT_OPTION`` where the default has changed since."""
    ignore = ignore | RUN_ONLY
    defaults = {
        f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(cfg)
    }
    defaults |= RAN_WITHOUT_OPTION
    changed = [
        "--" + flags.get(key, key.replace("_", "-"))
        for key, value in asdict(cfg).items()
        if key not in ignore and saved.get(key, defaults.get(key)) != value
    ]
    if changed:
        raise MedsightError(
            f"was started with other options ({', '.join(changed)}); "
            "resume with the same ones or pass --overwrite",
            path,
        )


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
    training curve and a one-line report.

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
        from tqdm import tqdm

        loss = history[-1]["train_loss"]  # tqdm.write: a line of its own above any progress bar
        tqdm.write(
            f"epoch {len(history)}: loss {loss:.4f}  val score {dice:.4f}{'  *best*' if improved else ''}"
        )


# -- batches -----------------------------------------------------------------------------------------
class _StepIndices(torch.utils.data.Sampler):
    """(epoch, step) for each step of the current epoch, the epoch asked of the trainer's count of
    processed epochs when an epoch's iteration starts. Not ``set_epoch``: on resuming, Lightning
    creates the first epoch's iterator before it calls that (and before ``current_epoch`` is
    restored), which would replay epoch 0's batches."""

    def __init__(self, steps: int, epoch_of):
        self.steps, self.epoch_of = steps, epoch_of

    def __iter__(self):
        epoch = int(self.epoch_of())
        return iter([(epoch, step) for step in range(self.steps)])

    def __len__(self) -> int:
        return self.steps


class _SeededBatches(torch.utils.data.Dataset):
    """Item (epoch, step) is one whole batch, made by ``make_batch(rng)`` with a random stream seeded
    by (seed, rank, epoch, step): the same batches in any worker process and after a resume."""

    def __init__(self, make_batch, seed: int, rank: int):
        self.make_batch, self.seed, self.rank = make_batch, seed, rank

    def __getitem__(self, index):
        epoch, step = index
        return self.make_batch(np.random.default_rng([self.seed, self.rank, epoch, step]))


def _as_is(item):
    return item


class Shared:
    """Holds data a task reads (training arrays, caches) so that copies of the task, such as the
    weight average's, share it instead of duplicating gigabytes."""

    def __init__(self, value: Any):
        self.value = value

    def __deepcopy__(self, memo):
        return self


# -- the task ----------------------------------------------------------------------------------------
class MedsightTask(L.LightningModule):
    """One training method. Subclasses set ``name`` (the registry key, recorded in checkpoints) and
    implement :meth:`prepare`, :meth:`make_batch`, :meth:`training_step`, :meth:`validation_step`,
    :meth:`on_validation_epoch_end` (which calls :meth:`record_epoch`) and
    :meth:`checkpoint_payload`. ``self.model`` is the network that is averaged, validated and saved."""

    name = ""
    flags: dict[str, str] = {}  # config field -> CLI flag, where the flag is not --field-name
    resume_ignores: set[str] = set()  # config fields free to change on resume (besides RUN_ONLY)
    config_class: type[LoopConfig] = LoopConfig  # what `medsight train` fills from its options
    score_name = "validation score"  # what val_score is, for messages

    @classmethod
    def methods(cls) -> list[str]:
        """The ``medsight train --method`` values this task trains."""
        return []

    def __init__(self, cfg: LoopConfig):
        super().__init__()
        check_decay(cfg.ema_decay)
        if not 0.0 <= cfg.lr_warmup < 1.0:
            raise MedsightError(f"--lr-warmup is a fraction of the steps in [0, 1), not {cfg.lr_warmup}")
        self.cfg = cfg
        self.history: list[dict[str, Any]] = []
        self.best_score = -float("inf")
        self.elapsed = 0.0  # training seconds at the start of the epoch, the same on every rank
        self._losses: list[float] = []
        self.resumed: dict[str, Any] | None = None  # the run's last.pt when resuming, before prepare()

    # what a task provides
    def prepare(self) -> None:
        """Read the data and build ``self.model``; runs after the run folder was checked."""
        raise NotImplementedError

    def make_batch(self, rng: np.random.Generator):
        """One training batch drawn with ``rng`` (runs in DataLoader workers)."""
        raise NotImplementedError

    def checkpoint_payload(self) -> dict[str, Any]:
        """What the checkpoint says about the model: ``model`` (name, kind, kwargs), ``labels``,
        ``preprocessing`` and anything the predictor needs; the loop adds weights and training."""
        raise NotImplementedError

    def model_name(self) -> str | None:
        """The network a resumed run must have (checked against ``last.pt``), or None."""
        return None

    def summary_of(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Task-specific entries of the summary, from the checkpoint payload."""
        return {}

    def resume_only(self) -> dict[str, Any] | None:
        """Bulky training state that only a resumed run needs: joins ``last.pt``, not ``best.pt``."""
        return None

    def scored_model(self) -> torch.nn.Module:
        """The network validation scores and the checkpoints hold: the weight average when the run
        keeps one (its copy of ``self.model``), else ``self.model``. Outside validation, where
        Lightning swaps the average in."""
        average = next(
            (c for c in self.trainer.callbacks if isinstance(c, L.pytorch.callbacks.WeightAveraging)), None
        )
        if average is None or average._average_model is None:
            return self.model
        return average._average_model.module.model

    # what the loop provides
    def train_dataloader(self):
        batches = _SeededBatches(self.make_batch, self.cfg.seed, self.global_rank)
        return torch.utils.data.DataLoader(
            batches,
            sampler=_StepIndices(
                self.cfg.steps_per_epoch, lambda: self.trainer.fit_loop.epoch_progress.current.processed
            ),
            batch_size=None,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def cases_loader(self, cases: list) -> torch.utils.data.DataLoader:
        """A validation loader that hands over each case as it is (one case per step)."""
        return torch.utils.data.DataLoader(cases, batch_size=None, collate_fn=_as_is, shuffle=False)

    def configure_optimizers(self):
        optimiser = adamw(self.model.parameters(), self.cfg.lr)
        total = self.cfg.epochs * self.cfg.steps_per_epoch
        budget = 60 * self.cfg.time_limit if self.cfg.time_limit else None
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: poly_factor(step, total, self.elapsed, budget, self.cfg.lr_warmup)
        )
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        # Torch's own stream (dropout) seeded per epoch too, so a resumed run matches an unbroken one.
        torch.manual_seed(
            int(np.random.default_rng([self.cfg.seed, self.global_rank, self.current_epoch]).integers(2**31))
        )
        self._losses = []

    def on_before_backward(self, loss: torch.Tensor) -> None:
        from medsight.losses import require_finite_loss

        # before the step: a NaN loss would turn every weight NaN and the next checkpoint useless
        require_finite_loss(loss, self.current_epoch, self.global_step)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._losses.append(float(loss.detach()))

    def record_epoch(self, score: float, metrics: dict[str, float]) -> None:
        """Call at the end of validation: logs ``val_score`` (higher is better; early stopping and
        the best checkpoint follow it) and appends the epoch to the history."""
        self.log("val_score", float(score), prog_bar=True, sync_dist=True)
        if self.trainer.sanity_checking:
            return
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else self.cfg.lr
        self.history.append(
            {
                "epoch": self.current_epoch + 1,
                "train_loss": float(np.mean(self._losses)) if self._losses else float("nan"),
                **metrics,
                "lr": lr,
                "seconds": round(self.elapsed_now(), 1),
            }
        )
        self.last_score, self.improved = float(score), score > self.best_score
        self.best_score = max(self.best_score, float(score))

    def elapsed_now(self) -> float:
        timer = next((c for c in self.trainer.callbacks if isinstance(c, L.pytorch.callbacks.Timer)), None)
        return float(timer.time_elapsed("train")) if timer else 0.0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medsight"] = {"history": self.history, "best_score": self.best_score}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("medsight", {})
        self.history = list(state.get("history", []))
        self.best_score = state.get("best_score", -float("inf"))


# -- callbacks ---------------------------------------------------------------------------------------
class _Bar(TQDMProgressBar):
    """Lightning's bar, with epochs counted from 1 as in metrics.csv and the epoch lines."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")


class _Clock(Callback):
    """Shares the training time at each epoch start (rank 0's) for the budget-aware learning rate."""

    def on_train_epoch_start(self, trainer, task) -> None:
        task.elapsed = float(trainer.strategy.broadcast(task.elapsed_now(), src=0))


class _RunFiles(Checkpoint):
    """Writes our self-describing best.pt/last.pt, metrics.csv and the curve after each epoch.
    A ``Checkpoint`` so that Lightning runs it after its ModelCheckpoint (both save at the end of
    the training epoch): a resumable .ckpt exists for every last.pt."""

    def __init__(self, out: Path, cfg: LoopConfig):
        self.out, self.cfg = out, cfg
        self.stop_reason = ""

    def payload(self, trainer, task) -> dict[str, Any]:
        average = next(
            (c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.WeightAveraging)), None
        )
        training = {
            "epoch": task.current_epoch,
            "history": task.history,
            "best": task.best_score,
            "config": asdict(self.cfg),
        }
        scored = task.model
        if average is not None and average._average_model is not None:
            scored = average._average_model.module.model
            training["weights"] = task.model.state_dict()  # the trained weights, besides their average
            training["average_updates"] = int(average._average_model.n_averaged)
        return {
            "task": task.name,
            **task.checkpoint_payload(),
            "state_dict": scored.state_dict(),
            "training": training,
        }

    def on_train_epoch_end(self, trainer, task) -> None:
        if not task.history or task.history[-1]["epoch"] != task.current_epoch + 1:
            return  # no validation this epoch
        if trainer.is_global_zero:
            payload = self.payload(trainer, task)
            save_epoch(
                self.out, payload, task.history, task.last_score, task.improved, self.cfg.progress,
                task.resume_only(),
            )  # fmt: skip

    def on_train_end(self, trainer, task) -> None:
        stopper = next(
            (c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.EarlyStopping)), None
        )
        if stopper is not None and stopper.wait_count >= stopper.patience:
            self.stop_reason = f"no better validation score for {self.cfg.patience} epochs"
        elif self.cfg.time_limit and task.elapsed_now() >= 60 * self.cfg.time_limit:
            self.stop_reason = f"the {self.cfg.time_limit:g}-minute budget is used"
        else:
            self.stop_reason = f"all {self.cfg.epochs} epochs are done"
        if trainer.is_global_zero and (self.out / "last.pt").exists():
            from medsight.engine import checkpoint

            payload = checkpoint.load(self.out / "last.pt")
            payload["training"]["stopped"] = self.stop_reason
            checkpoint.save(
                self.out / "last.pt",
                {k: v for k, v in payload.items() if k not in ("format", "medsight_version")},
            )
        if (
            self.cfg.progress
            and trainer.is_global_zero
            and self.stop_reason
            and "epochs are done" not in self.stop_reason
        ):
            print(f"stopped after epoch {len(task.history)}: {self.stop_reason}")


# -- fit ---------------------------------------------------------------------------------------------
def open_run(task: MedsightTask, cfg: LoopConfig) -> tuple[Path, dict[str, Any] | None]:
    """Check the run folder (before any data is read): refuse to clobber a run, and refuse to resume
    with other options. Returns the folder and, when resuming, the run's ``last.pt`` payload."""
    from medsight.engine import checkpoint
    from medsight.io import check_run_folder

    out = check_run_folder(cfg.out)
    last = out / "last.pt"
    rank, _ = world()
    if last.exists() and not (cfg.resume or cfg.overwrite):
        raise MedsightError("holds a training run already; pass --resume to continue it or --overwrite", out)
    if not (cfg.resume and last.exists() and not cfg.overwrite):
        if cfg.resume and rank == 0:
            print(f"no run to resume in {out}; starting a new one")
        return out, None
    payload = checkpoint.load(last, method=task.model_name())
    check_resumable(payload["training"]["config"], cfg, task.resume_ignores, task.flags, last)
    if not payload["training"].get("stopped") and not (out / LIGHTNING_DIR / "last.ckpt").exists():
        raise MedsightError("has no resumable state (written by an older medsight); pass --overwrite", out)
    return out, payload


def build_trainer(cfg: LoopConfig, out: Path, device: torch.device) -> L.Trainer:
    from datetime import timedelta

    from lightning.pytorch.callbacks import (
        EarlyStopping,
        ModelCheckpoint,
        Timer,
        WeightAveraging,
    )

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner about absent TPUs
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*exists and is not empty.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    budget = timedelta(minutes=cfg.time_limit) if cfg.time_limit else None
    callbacks: list[Callback] = [
        Timer(budget, interval="epoch", verbose=False),  # after the epoch that passes the budget
        _Clock(),
        EarlyStopping("val_score", mode="max", patience=cfg.patience, check_finite=False, verbose=False),
        ModelCheckpoint(
            out / LIGHTNING_DIR,
            filename="best",
            monitor="val_score",
            mode="max",
            save_last=True,
            save_top_k=1,
        ),
        _RunFiles(out, cfg),
    ]
    if cfg.ema_decay > 0:
        callbacks.append(WeightAveraging(use_buffers=True, multi_avg_fn=average_update(cfg.ema_decay)))
    if cfg.progress:
        callbacks.append(_Bar(leave=False))
    return L.Trainer(
        **trainer_devices(device),
        precision=resolve_precision(cfg.precision, device),
        max_epochs=cfg.epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # each rank draws its own seeded batches
        default_root_dir=str(out),
        deterministic=False,
    )


def fit(task: MedsightTask, cfg: LoopConfig) -> dict[str, Any]:
    """Train ``task`` with the shared Trainer; returns the summary (also written to summary.json).
    A Ctrl-C ends in KeyboardInterrupt (the CLI prints how to resume and exits 130)."""
    from medsight.io import write_text

    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)  # a bad option is refused before any data is read
    out, saved = open_run(task, cfg)
    rank, _ = world()
    if saved is not None and saved["training"].get("stopped"):
        if rank == 0:
            print(f"nothing to resume in {out}: {saved['training']['stopped']}")
        training = saved["training"]
        return _summary(task, out, saved, training["history"], training["best"], 0.0, rank)
    task.resumed = saved
    task.prepare()
    task.resumed = None  # the weight average deep-copies the task: no second copy of the payload
    if rank == 0:  # made only now, so a run refused over its data or options leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
        if saved is None:  # a new run: Lightning would version its files beside a previous run's
            shutil.rmtree(out / LIGHTNING_DIR, ignore_errors=True)
    trainer = build_trainer(cfg, out, device)
    if saved is not None and rank == 0:
        print(
            f"resuming after epoch {len(saved['training']['history'])} (best score so far {saved['training']['best']:.4f})"
        )
    from monai.data import get_track_meta, set_track_meta

    # A task may turn MONAI's process-wide metadata tracking off for speed (LViT's crops); whatever
    # runs next in this process (a prediction, another run) must get its MetaTensors back.
    track_meta = get_track_meta()
    try:
        trainer.fit(task, ckpt_path=str(out / LIGHTNING_DIR / "last.ckpt") if saved is not None else None)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after a graceful shutdown
            raise KeyboardInterrupt from None
        raise
    finally:
        set_track_meta(track_meta)
    if trainer.interrupted:
        raise KeyboardInterrupt
    payload = {"task": task.name, **task.checkpoint_payload()}
    summary = _summary(
        task, out, payload, task.history, task.best_score, task.elapsed_now(), trainer.global_rank
    )
    if trainer.is_global_zero:
        write_text(out / "summary.json", json.dumps(summary, indent=2), overwrite=True)
    return summary


def _summary(task, out: Path, payload: dict, history: list, best: float, seconds: float, rank: int) -> dict:
    return {
        "task": task.name,
        "best_val_score": best,
        "epochs_run": len(history),
        "train_seconds": round(seconds, 1),
        "best": str(out / "best.pt"),
        "last": str(out / "last.pt"),
        "rank": rank,  # under DDP every rank returns; only rank 0 writes files
        **task.summary_of(payload),
    }
