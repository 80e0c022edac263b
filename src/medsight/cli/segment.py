"""`medsight train`, `predict`, `export` and `model summary`: the supervised segmentation engine."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from medsight.cli.startup import import_monai

model_app = typer.Typer(help="Inspect the networks: parameters and FLOPs.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("predict")(predict)
    app.command("export")(export)
    app.add_typer(model_app, name="model")
    app.command("demo")(demo)


def train(
    data: Path = typer.Option(
        ..., "--data", help="Dataset folder in any supported layout (see `medsight data inspect`)."
    ),
    method: str = typer.Option(
        "context25d",
        "--method",
        help="unet2d, context25d, unet3d; or fewshot-prototype, fewshot-local-prototype, "
        "fewshot-conditional, fewshot-shared (the three heads on one encoder; self-supervised: labels are "
        "ignored, see `medsight fewshot`).",
    ),
    out: Path = typer.Option(
        Path("runs/train"), "-o", "--out", help="Run folder: checkpoints, metrics.csv, curve."
    ),
    epochs: int = typer.Option(20, min=1),
    steps_per_epoch: int = typer.Option(50, min=1, help="Optimiser steps per epoch."),
    batch_size: int = typer.Option(None, min=1, help="Samples per step (default: planned from the data)."),
    patch_size: str = typer.Option(
        None, help="Patch (3D: X,Y,Z) or slice window (2D/2.5D: H,W), e.g. 64,64 (default: planned)."
    ),
    memory_budget: float = typer.Option(512.0, help="MB of activations per batch the plan aims at."),
    lr: float = typer.Option(2e-3),
    slices: int = typer.Option(5, help="Slices per stack for context25d (odd)."),
    slice_axis: int = typer.Option(
        None,
        min=0,
        max=2,
        help="Voxel axis that 2D/2.5D methods slide along. Default: the coarsest axis, or for "
        "isotropic scans the one along which the labels extend furthest.",
    ),
    val_fraction: float = typer.Option(0.2, help="Share of cases held out when the layout has no split."),
    seed: int = typer.Option(0, help="Seeds the split, the weights and the sampling: same seed, same run."),
    split_seed: int = typer.Option(None, help="Seed of the train/validation split only (default: --seed)."),
    patience: int = typer.Option(10, help="Stop after this many epochs without a better validation Dice."),
    max_val_cases: int = typer.Option(None, help="Validate on at most this many cases per epoch."),
    time_limit: float = typer.Option(
        None, help="Training budget in minutes; stops after the epoch that passes it."
    ),
    augmentation: str = typer.Option(
        "spatial", help="none, intensity, or spatial (rotation and scaling on top of intensity)."
    ),
    class_weights: str = typer.Option(
        "auto", help="auto (log-damped inverse class frequency in the cross-entropy) or none."
    ),
    mirror_axes: str = typer.Option(
        "",
        help="Comma-separated voxel axes along which mirror images are plausible and keep their label "
        "names, e.g. 0 for left-right on a bilateral organ without left/right labels. Training mirrors "
        "along them; `predict --tta` averages over them. Off by default.",
    ),
    ema_decay: float = typer.Option(
        0.999,
        help="Validate and keep a moving average of the weights with this decay (0: the weights as trained).",
    ),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", help="auto (mixed on CUDA, 32 on CPU), 32, 16-mixed, bf16-mixed."),
    num_workers: int = typer.Option(0, min=0, help="DataLoader processes sampling training batches."),
    cache: Path = typer.Option(
        None,
        "--cache",
        help="Folder of preprocessed cases, reused across runs (default: $MEDSIGHT_CACHE or ~/.cache/medsight).",
    ),
    layout: str = typer.Option(None, help="Force a dataset layout instead of detecting it."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Start afresh even if --out holds a run."),
) -> None:
    """Train a segmentation model; under torchrun it trains on every process (DDP)."""
    import_monai()
    if method.startswith("fewshot-"):
        from medsight.tasks.fewshot import FewShotConfig, train_fewshot

        summary = train_fewshot(
            FewShotConfig(
                data=str(data), out=str(out), method=method, layout=layout, seed=seed,
                time_limit_minutes=time_limit, max_steps=epochs * steps_per_epoch, overwrite=overwrite,
            )
        )  # fmt: skip
        typer.echo(
            f"self-supervised {method}: {summary['steps']} steps, {summary['episodes']} episodes  ->  "
            f"{summary['checkpoint']}"
        )
        return
    from medsight.engine.tta import parse_axes
    from medsight.errors import MedsightError
    from medsight.tasks.segmentation import SegmentationConfig
    from medsight.tasks.segmentation import train as run

    try:
        axes = parse_axes(mirror_axes)
    except ValueError as error:
        raise MedsightError(f"--mirror-axes: {error}") from None
    try:
        patch = parse_axes(patch_size) if patch_size else None
    except ValueError as error:
        raise MedsightError(f"--patch-size: {error}") from None
    options = dict(locals())  # every option is a config field of the same name
    keep = {f for f in SegmentationConfig.__dataclass_fields__} - {"layout_options", "model_kwargs"}
    settings = {k: v for k, v in options.items() if k in keep}
    settings.update(data=str(data), out=str(out), mirror_axes=axes, patch_size=patch)
    settings.update(cache=str(cache) if cache else None)
    summary = run(SegmentationConfig(**settings))
    if summary["rank"] == 0:
        typer.echo(f"best validation mean Dice {summary['best_val_mean_dice']:.4f}  ->  {summary['best']}")


def predict(
    inputs: list[Path] = typer.Argument(
        ..., help="Scans (NIfTI, DICOM folders...) or folders of NIfTI scans."
    ),
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint written by `medsight train`."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder for <case>.nii.gz masks."),
    largest_component: bool = typer.Option(
        False, help="Keep only the largest connected component per class."
    ),
    save_probabilities: bool = typer.Option(False, "--probabilities", help="Also write <case>_prob.nii.gz."),
    onnx: Path = typer.Option(None, help="Run this ONNX export through onnxruntime instead of torch."),
    tta: bool = typer.Option(
        False, help="Average over mirror images along the model's training --mirror-axes (2^n passes)."
    ),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", help="auto (mixed on CUDA, 32 on CPU), 32, 16-mixed, bf16-mixed."),
    overwrite: bool = typer.Option(False),
) -> None:
    """Segment scans; each mask is written with its input's affine and the training label values."""
    from tqdm import tqdm

    import_monai()
    from medsight import io
    from medsight.cli.outputs import output_paths
    from medsight.engine.infer import Predictor

    predictor = Predictor(
        model,
        backend="onnx" if onnx else "torch",
        onnx_path=onnx,
        tta=tta,
        device=device,
        precision=precision,
    )
    scans = _expand(inputs)

    def case(path: Path) -> str:
        return path.name.split(".")[0] if path.is_file() else path.name

    targets = output_paths(scans, out, lambda p: f"{case(p)}.nii.gz", overwrite)
    prob_targets = (
        output_paths(scans, out, lambda p: f"{case(p)}_prob.nii.gz", overwrite)
        if save_probabilities
        else [None] * len(scans)
    )
    jobs = list(zip(scans, targets, prob_targets, strict=True))
    for path, target, prob_target in tqdm(jobs, desc="segmenting", disable=len(scans) < 2):
        labels, probs = predictor.predict(io.read(path), largest_component=largest_component)
        io.write(labels, target, overwrite=overwrite)
        if prob_target is not None:
            io.write(probs, prob_target, overwrite=overwrite)
        typer.echo(f"{path} -> {target}")


def _expand(inputs: list[Path]) -> list[Path]:
    """A folder of volume files stands for its files; a folder with DICOM files is one series."""
    from medsight.io import suffix_of

    found = []
    for p in inputs:
        volumes = (
            sorted(f for f in p.iterdir() if suffix_of(f) in (".nii", ".nii.gz", ".nrrd"))
            if p.is_dir()
            else []
        )
        found.extend(volumes or [p])
    return found


def export(
    model: Path = typer.Argument(..., help="Checkpoint to export."),
    onnx: Path = typer.Option(..., "--onnx", help="Where to write the ONNX model."),
    overwrite: bool = typer.Option(False),
) -> None:
    """Export a checkpoint's network to ONNX (dynamic batch and in-plane size)."""
    import_monai()
    from medsight.engine.export import export_onnx

    export_onnx(model, onnx, overwrite=overwrite)
    typer.echo(f"wrote {onnx}")


@model_app.command("summary")
def summary(
    name: str = typer.Argument(..., help="unet2d, context25d or unet3d."),
    volume: str = typer.Option("36,52,36", help="Volume shape X,Y,Z for FLOPs per volume."),
    slice_axis: int = typer.Option(2, min=0, max=2, help="Axis that 2D/2.5D models slide along."),
    in_channels: int = typer.Option(1),
    num_classes: int = typer.Option(3),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Parameters and FLOPs (torch.utils.flop_counter) per slice and per volume."""
    import_monai()
    from medsight.errors import MedsightError
    from medsight.models.registry import build_model, get_spec
    from medsight.models.summary import model_summary, slices_first

    try:
        shape = tuple(int(v) for v in volume.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise MedsightError(f"--volume needs three positive integers like 36,52,36, not {volume!r}")
    kwargs = {"slices": 5} if get_spec(name).input_kind == "2.5d" else {}
    model = build_model(name, in_channels, num_classes, **kwargs)
    facts = model_summary(name, model, slices_first(shape, slice_axis), in_channels)
    facts["volume_shape"] = list(shape)  # as given; slices-first is only how the FLOPs are counted
    typer.echo(
        json.dumps(facts, indent=2) if as_json else "\n".join(f"{k:>22}: {v}" for k, v in facts.items())
    )


def demo(
    out: Path = typer.Option(
        Path("demo-output"), "-o", "--out", help="Folder for everything the demo writes."
    ),
    overwrite: bool = typer.Option(False, help="Replace a previous demo output."),
) -> None:
    """Phantom data -> inspect -> train context25d -> segment -> evaluate -> HTML report."""
    import_monai()
    from medsight.demo import run_demo

    run_demo(out, overwrite=overwrite)
