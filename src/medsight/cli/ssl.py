"""`medsight pretrain`: self-supervised pretraining from imaging-plane geometry on unlabeled scans."""

from __future__ import annotations

from pathlib import Path

import typer

from medsight.cli.options import (
    DEVICE,
    EMA_DECAY,
    LAYOUT,
    LR_WARMUP,
    NUM_WORKERS,
    PRECISION,
    RESUME,
    SEED,
    START_AFRESH,
    TIME_LIMIT,
)
from medsight.cli.startup import import_monai


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)


def pretrain(
    data: Path = typer.Option(
        ...,
        "--data",
        help="Unlabeled scans: a dataset in any supported layout (labels are ignored), a folder of scans, "
        "or DICOM studies (a folder of series folders, or a folder of such studies: true plane tags).",
    ),
    pretext: str = typer.Option(
        "planes+position",
        "--pretext",
        help="planes (where other views cut each slice), position (each slice's place in its stack), "
        "planes+position (both, weights 1 and 1), or genesis (Models-Genesis restoration).",
    ),
    out: Path = typer.Option(
        Path("runs/ssl"), "-o", "--out", help="Run folder: checkpoints, metrics.csv, curve."
    ),
    epochs: int = typer.Option(20, min=1),
    steps_per_epoch: int = typer.Option(50, min=1, help="Optimiser steps per epoch."),
    batch_size: int = typer.Option(None, min=1, help="Stack slices per step (default: two stacks)."),
    lr: float = typer.Option(2e-3),
    size: int = typer.Option(40, min=8, help="Pixels per side of each sampled plane."),
    spacing: float = typer.Option(1.0, help="Millimetres per pixel of the sampled planes."),
    sigma: float = typer.Option(2.0, help="Width (pixels) of the intersection-line ridges."),
    stack_slices: int = typer.Option(8, min=2, help="Slices per sampled stack."),
    views: int = typer.Option(2, min=1, help="Long-axis views per stack for volumes without scanner views."),
    val_fraction: float = typer.Option(0.2, help="Share of volumes held out to score the pretext."),
    max_val_cases: int = typer.Option(None, help="Score the pretext on at most this many held-out volumes."),
    seed: int = SEED,
    split_seed: int = typer.Option(
        None, help="Seed of the split only (default: --seed; the same split as `medsight train`)."
    ),
    patience: int = typer.Option(10, help="Stop after this many epochs without a lower validation loss."),
    time_limit: float = TIME_LIMIT,
    lr_warmup: float = LR_WARMUP,
    ema_decay: float = EMA_DECAY,
    device: str = DEVICE,
    precision: str = PRECISION,
    num_workers: int = NUM_WORKERS,
    layout: str = LAYOUT,
    resume: bool = RESUME,
    overwrite: bool = START_AFRESH,
) -> None:
    """Pretrain a unet2d on unlabeled scans; `medsight train --method unet2d --init OUT/best.pt` fine-tunes it."""
    import_monai()
    from medsight.tasks.ssl import PretrainConfig
    from medsight.tasks.ssl import pretrain as run

    options = dict(locals())  # every option is a config field of the same name
    keep = set(PretrainConfig.__dataclass_fields__) - {"network"}
    settings = {k: v for k, v in options.items() if k in keep}
    settings.update(data=str(data), out=str(out))
    summary = run(PretrainConfig(**settings))
    if summary["rank"] == 0:
        best = summary["best_epoch"]
        figures = "  ".join(
            f"{name} {best[f'val_{name}']:.4g}"
            for name in ("loss", "angle_error_deg", "offset_px", "position_error")
            if f"val_{name}" in best
        )
        typer.echo(f"{pretext}: validation {figures}  ->  {summary['best']}")
