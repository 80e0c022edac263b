"""`medsight sr train|predict|degrade`: super-resolution with semantic perception (tasks/sr.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from medsight.cli.options import (
    DEVICE,
    LAYOUT,
    LR_WARMUP,
    PRECISION,
    RESUME,
    SEED,
    SPLIT_SEED,
    START_AFRESH,
    TIME_LIMIT,
)

sr_app = typer.Typer(
    help="Super-resolution of thick-slice and low-resolution scans (plain, or with semantic perception).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(sr_app, name="sr")


@sr_app.command("train")
def train(
    data: Path = typer.Option(..., "--data", help="Dataset folder in any supported layout (2D or 3D)."),
    scale: int = typer.Option(4, "--scale", help="Upsampling factor: 2, 3, 4 in-plane; 2..8 thick."),
    mode: str = typer.Option(
        "inplane", "--mode", help="inplane (coarse matrix, slice-wise) or thick (thick slices, 3D only)."
    ),
    method: str = typer.Option("semantic", "--method", help="semantic (caption step first) or plain."),
    out: Path = typer.Option(
        Path("runs/sr"), "-o", "--out", help="Run folder (the caption run goes in caption/)."
    ),
    profile: str = typer.Option(
        None,
        help="Degradation: gaussian (default), box or kspace in-plane; box (default), gaussian, triangular thick.",
    ),
    slice_axis: int = typer.Option(2, min=0, max=2, help="Voxel axis of the slices of 3D volumes."),
    sentences: str = typer.Option(
        "auto",
        help="auto, dataset (the dataset's text) or labels (sentences derived from the expert labels).",
    ),
    shuffle_sentences: bool = typer.Option(
        False, help="Control: permute the sentences between training images before the caption net trains."
    ),
    finetune_encoder: bool = typer.Option(
        False, help="Train the caption encoder with the super-resolution loss (default: frozen)."
    ),
    caption_epochs: int = typer.Option(10, min=1, help="Epochs of the caption step."),
    caption_steps: int = typer.Option(50, min=1, help="Steps per epoch of the caption step."),
    caption_size: int = typer.Option(
        64, min=16, help="The caption net sees each slice resized to this square."
    ),
    crop: int = typer.Option(64, min=4, help="High-resolution training crop (pixels)."),
    features: int = typer.Option(32, min=4, help="Feature channels of the SR network."),
    blocks: int = typer.Option(4, min=1, help="Distillation blocks of the SR network."),
    val_fraction: float = typer.Option(0.2, help="Share of cases held out when the layout has no split."),
    split_seed: int = SPLIT_SEED,
    max_val_cases: int = typer.Option(8, min=1, help="Validate on at most this many cases per epoch."),
    epochs: int = typer.Option(20, min=1),
    steps_per_epoch: int = typer.Option(50, min=1, help="Optimiser steps per epoch."),
    batch_size: int = typer.Option(16, min=1, help="Crops per step."),
    lr: float = typer.Option(2e-3),
    seed: int = SEED,
    patience: int = typer.Option(10, help="Stop after this many epochs without a better validation PSNR."),
    time_limit: float = TIME_LIMIT,
    lr_warmup: float = LR_WARMUP,
    ema_decay: float = typer.Option(
        0.999, help="Validate and keep a moving average of the weights (0: off)."
    ),
    device: str = DEVICE,
    precision: str = PRECISION,
    layout: str = LAYOUT,
    resume: bool = RESUME,
    overwrite: bool = START_AFRESH,
) -> None:
    """Train a super-resolution network on low-/high-resolution pairs made from DATA on the fly."""
    from medsight.tasks.sr import SRConfig
    from medsight.tasks.sr import train as run

    options = dict(locals())
    settings = {k: v for k, v in options.items() if k in SRConfig.__dataclass_fields__}
    settings.update(data=str(data), out=str(out))
    summary = run(SRConfig(**settings))
    if summary["rank"] == 0:
        caption = summary.get("caption_scores")
        extra = (
            f" (caption: token accuracy {caption['token_accuracy']:.3f}, BLEU-4 {caption['bleu4']:.3f})"
            if caption
            else ""
        )
        typer.echo(f"best validation PSNR {summary['best_val_psnr']:.2f} dB{extra}  ->  {summary['best']}")


@sr_app.command("predict")
def predict(
    scan: Path = typer.Argument(
        ..., help="Low-resolution scan: NIfTI, DICOM folder, PNG..., 1 or 3 channels."
    ),
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint written by `medsight sr train`."),
    out: Path = typer.Option(
        ..., "-o", "--out", help="Output file on the fine grid (any format medsight writes)."
    ),
    slice_axis: int = typer.Option(
        None, min=0, max=2, help="Voxel axis of the slices (default: the one the model was trained with)."
    ),
    reference: Path = typer.Option(
        None,
        help="High-resolution reference: also write <out>_compare.png and .html (interpolated | SR | reference).",
    ),
    device: str = DEVICE,
    overwrite: bool = typer.Option(False, help="Replace the output if it exists."),
) -> None:
    """Super-resolve one scan; the output keeps every structure's world position (affine on the fine grid)."""
    from medsight import io
    from medsight.tasks.sr import SRPredictor

    io.check_writable(out, overwrite)
    predictor = SRPredictor(model, device=device, slice_axis=slice_axis)
    low = io.read(scan)
    high = predictor.predict(low)
    io.write(high, out, overwrite=overwrite)
    typer.echo(f"wrote {out} ({list(low.spatial_shape)} -> {list(high.spatial_shape)})")
    if reference is not None:
        from medsight.report.sr import compare_report

        ref = io.read(reference)
        page = compare_report(low, {"sr": high}, ref, predictor, out, overwrite=overwrite)
        typer.echo(f"wrote {page}")


@sr_app.command("degrade")
def degrade(
    scan: Path = typer.Argument(..., help="High-resolution scan: NIfTI, DICOM folder, PNG..."),
    out: Path = typer.Option(..., "-o", "--out", help="Low-resolution output file."),
    scale: int = typer.Option(2, "--scale", help="Downsampling factor: 2, 3, 4 in-plane; 2..8 thick."),
    mode: str = typer.Option("inplane", "--mode", help="inplane (coarse matrix) or thick (thick slices)."),
    profile: str = typer.Option(
        None, help="gaussian (default), box or kspace in-plane; box (default), gaussian, triangular thick."
    ),
    slice_axis: int = typer.Option(2, min=0, max=2, help="Voxel axis of the slices of 3D volumes."),
    high: Path = typer.Option(
        None, help="Also write the scan cropped to a multiple of the scale: the reference to compare with."
    ),
    overwrite: bool = typer.Option(False, help="Replace the outputs if they exist."),
) -> None:
    """Make the low-resolution version of a scan as `sr train` does, to test a model on a known answer."""
    from medsight import io
    from medsight.transforms.degrade import DegradeParams, in_dtype_of, make_pair

    for path in (out, high):
        if path is not None:
            io.check_writable(path, overwrite)
    default = "gaussian" if mode == "inplane" else "box"
    params = DegradeParams(mode, scale, profile or default, slice_axis=slice_axis)
    source = io.read(scan)
    low, cropped = make_pair(source, params)
    low = low.with_array(in_dtype_of(low.array, source.array.dtype))
    io.write(low, out, overwrite=overwrite)
    if high is not None:
        io.write(cropped, high, overwrite=overwrite)
    typer.echo(f"wrote {out} ({list(cropped.spatial_shape)} -> {list(low.spatial_shape)})")
