"""`medsight train`, `predict`, `export` and `model summary`: the supervised segmentation engine."""

from __future__ import annotations

import json
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
    SPLIT_SEED,
    START_AFRESH,
    TIME_LIMIT,
)
from medsight.cli.startup import import_monai

model_app = typer.Typer(help="Inspect the networks: parameters and FLOPs.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("predict")(predict)
    app.command("export")(export)
    app.add_typer(model_app, name="model")
    app.command("demo")(demo)


# `train` options whose help takes several lines, named so that its signature stays a readable list.
METHOD = typer.Option(
    "context25d",
    "--method",
    help="unet2d, context25d, unet3d (2D images: unet2d); or fewshot-prototype, fewshot-local-prototype, "
    "fewshot-conditional, fewshot-shared (the three heads on one encoder; self-supervised: labels are "
    "ignored, validated on superpixel episodes of held-out images; see `medsight fewshot`).",
)
SPACING = typer.Option(
    None,
    help="Target spacing of the axes the network sees (3D: X,Y,Z; 2D/2.5D: the two in-plane axes), "
    "instead of the training set's median; pictures have 1 per pixel, so 2,2 halves their resolution.",
)
SLICE_AXIS = typer.Option(
    None,
    min=0,
    max=2,
    help="Voxel axis that 2D/2.5D methods slide along. Default: the coarsest axis, or for "
    "isotropic scans the one along which the labels extend furthest.",
)
VAL_FRACTION = typer.Option(
    None,
    help="Share of cases held out for validation when the layout has no split (default: 0.2; few-shot "
    "0.1, whose validation episodes come from these images).",
)
MIRROR_AXES = typer.Option(
    "",
    help="Comma-separated voxel axes along which mirror images are plausible and keep their label "
    "names, e.g. 0 for left-right on a bilateral organ without left/right labels. Training mirrors "
    "along them; `predict --tta` averages over them. On 2D images 0,1 also transposes: all eight "
    "rotations and mirror images (nuclei, cells). Off by default.",
)
CACHE = typer.Option(
    None,
    "--cache",
    help="Folder of preprocessed cases, reused across runs (default: $MEDSIGHT_CACHE or ~/.cache/medsight).",
)
LABELED_CASES = typer.Option(
    None,
    min=1,
    help="Keep only this many labelled training cases, drawn by --seed (validation untouched).",
)


def train(
    data: Path = typer.Option(
        ..., "--data", help="Dataset folder in any supported layout (see `medsight data inspect`)."
    ),
    method: str = METHOD,
    out: Path = typer.Option(
        Path("runs/train"), "-o", "--out", help="Run folder: checkpoints, metrics.csv, curve."
    ),
    epochs: int = typer.Option(20, min=1),
    steps_per_epoch: int = typer.Option(50, min=1, help="Optimiser steps per epoch."),
    batch_size: int = typer.Option(
        None, min=1, help="Samples per step (default: planned from the data; few-shot: 8 episodes)."
    ),
    patch_size: str = typer.Option(
        None, help="Patch (3D: X,Y,Z) or slice window (2D/2.5D: H,W), e.g. 64,64 (default: planned)."
    ),
    memory_budget: float = typer.Option(512.0, help="MB of activations per batch the plan aims at."),
    spacing: str = SPACING,
    lr: float = typer.Option(None, help="Learning rate (AdamW, poly decay; default: 0.002, few-shot 0.001)."),
    lr_warmup: float = LR_WARMUP,
    slices: int = typer.Option(5, help="Slices per stack for context25d (odd)."),
    slice_axis: int = SLICE_AXIS,
    slice_planes: int = typer.Option(
        1,
        help="Slicing planes of unet2d/context25d: 1 (the slice axis) or 3 (train on the three "
        "orthogonal planes, average them at prediction; near-isotropic volumes only).",
    ),
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
    split_seed: int = SPLIT_SEED,
    patience: int = typer.Option(10, help="Stop after this many epochs without a better validation Dice."),
    max_val_cases: int = typer.Option(None, help="Validate on at most this many cases per epoch."),
    time_limit: float = TIME_LIMIT,
    augmentation: str = typer.Option(
        "spatial", help="none, intensity, or spatial (rotation and scaling on top of intensity)."
    ),
    class_weights: str = typer.Option(
        "auto", help="auto (log-damped inverse class frequency in the cross-entropy) or none."
    ),
    mirror_axes: str = MIRROR_AXES,
    ema_decay: float = EMA_DECAY,
    device: str = DEVICE,
    precision: str = PRECISION,
    num_workers: int = NUM_WORKERS,
    cache: Path = CACHE,
    layout: str = LAYOUT,
    init: Path = typer.Option(
        None, help="Start unet2d from a `medsight pretrain` checkpoint (every layer but the last)."
    ),
    labeled_cases: int = LABELED_CASES,
    labeled_ids: str = typer.Option(
        None, help="Keep only these labelled training cases (comma-separated ids)."
    ),
    resume: bool = RESUME,
    overwrite: bool = START_AFRESH,
) -> None:
    """Train a model with the method's task (segmentation, few-shot); under torchrun it trains on
    every process (DDP)."""
    import_monai()
    from medsight.engine.loop import fit
    from medsight.tasks.registry import task_for_method

    options = dict(locals())  # every option is a config field of the same name
    task_class = task_for_method(method)
    config = _config(task_class.config_class, _parsed(options), method)
    summary = fit(task_class(config), config)
    if summary["rank"] == 0:
        typer.echo(f"best {task_class.score_name} {summary['best_val_score']:.4f}  ->  {summary['best']}")


def _parsed(options: dict) -> dict:
    """`train`'s options with the comma-separated ones as lists and the paths as strings, as the
    configs take them; a malformed list is refused naming its option."""
    from medsight.engine.tta import parse_axes
    from medsight.errors import MedsightError

    options = dict(options)
    mirror_axes, patch_size, spacing = options["mirror_axes"], options["patch_size"], options["spacing"]
    try:
        options["mirror_axes"] = parse_axes(mirror_axes)
    except ValueError as error:
        raise MedsightError(f"--mirror-axes: {error}") from None
    try:
        options["patch_size"] = parse_axes(patch_size) if patch_size else None
    except ValueError as error:
        raise MedsightError(f"--patch-size: {error}") from None
    try:
        options["spacing"] = [float(v) for v in spacing.split(",")] if spacing else None
    except ValueError:
        raise MedsightError(f"--spacing needs numbers like 2,2, not {spacing!r}") from None
    for name in ("data", "out", "init", "cache"):
        options[name] = str(options[name]) if options[name] else None
    labeled_ids = options["labeled_ids"]
    options["labeled_ids"] = [i.strip() for i in labeled_ids.split(",") if i.strip()] if labeled_ids else None
    return options


def _config(config_class, options: dict, method: str):
    """The method's config from the command's options: unset ones (None) take the config's default;
    an option the method does not have is refused unless it is left at its default."""
    import dataclasses
    import inspect

    from medsight.errors import MedsightError

    fields = {f.name for f in dataclasses.fields(config_class)} - {"layout_options", "model_kwargs"}
    defaults = {n: p.default.default for n, p in inspect.signature(train).parameters.items()}
    given = {n: v for n, v in options.items() if n in defaults}
    unused = [n for n, v in given.items() if n not in fields and v not in (defaults[n], None, [])]
    if unused:
        names = ", ".join("--" + n.replace("_", "-") for n in unused)
        raise MedsightError(f"{names}: not an option of --method {method}")
    return config_class(**{n: v for n, v in given.items() if n in fields and v is not None})


def predict(
    inputs: list[Path] = typer.Argument(
        ..., help="Scans (NIfTI, DICOM folders, PNG/TIFF pictures...) or folders of them."
    ),
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint written by `medsight train`."),
    out: Path = typer.Option(
        ..., "-o", "--out", help="Output folder for <case>.nii.gz masks (<case>.png for pictures)."
    ),
    largest_component: bool = typer.Option(
        False, help="Keep only the largest connected component per class."
    ),
    save_probabilities: bool = typer.Option(False, "--probabilities", help="Also write <case>_prob.nii.gz."),
    onnx: Path = typer.Option(None, help="Run this ONNX export through onnxruntime instead of torch."),
    tta: bool = typer.Option(
        False, help="Average over mirror images along the model's training --mirror-axes (2^n passes)."
    ),
    device: str = DEVICE,
    precision: str = PRECISION,
    output_format: str = typer.Option(
        "nifti",
        "--format",
        help="nifti: <case>.nii.gz masks (<case>.png for pictures); dicom-seg: <case>.dcm, a DICOM SEG that "
        "references the input series (DICOM folder inputs only), one segment per label named as in the checkpoint.",
    ),
    overwrite: bool = typer.Option(False),
    skip_existing: bool = typer.Option(
        False,
        "--skip-existing",
        help="Leave scans whose mask already exists in OUT (continue an interrupted batch with the same "
        "model).",
    ),
) -> None:
    """Segment scans; each mask is written with its input's affine and the training label values.

    A picture (PNG, TIFF, JPEG, BMP, GIF) gets a PNG mask of its own size.

    OUT is locked while predicting and gets medsight-provenance.json (model, checkpoint hash, version,
    options); a folder holding another checkpoint's masks is refused unless --overwrite."""
    import_monai()
    from medsight.cli.outputs import predict_outputs
    from medsight.engine.infer import Predictor
    from medsight.errors import MedsightError
    from medsight.io import check_folder_writable

    if skip_existing and overwrite:
        raise MedsightError("--skip-existing keeps existing masks and --overwrite replaces them; choose one")
    if output_format not in ("nifti", "dicom-seg"):
        raise MedsightError(f"unknown --format '{output_format}'; use nifti or dicom-seg")
    scans = _expand(inputs)
    if output_format == "dicom-seg" and any(not p.is_dir() for p in scans):
        raise MedsightError(
            "--format dicom-seg needs DICOM series folders as inputs",
            next(p for p in scans if not p.is_dir()),
        )
    check_folder_writable(out)  # before loading anything
    predictor = Predictor(
        model,
        backend="onnx" if onnx else "torch",
        onnx_path=onnx,
        tta=tta,
        device=device,
        precision=precision,
    )
    options = dict(
        largest_component=largest_component, probabilities=save_probabilities, onnx=onnx, tta=tta,
        format=output_format,
    )  # fmt: skip
    with predict_outputs(scans, out, model, overwrite, skip_existing, save_probabilities, options) as jobs:
        _segment(predictor, jobs, largest_component, overwrite)


def _segment(predictor, jobs, largest_component: bool, overwrite: bool) -> None:
    from tqdm import tqdm

    from medsight import io

    for path, target, prob_target in tqdm(jobs, desc="segmenting", disable=len(jobs) < 2):
        labels, probs = predictor.predict(io.read(path), largest_component=largest_component)
        if target.name.endswith(".dcm"):  # --format dicom-seg
            from medsight.io.dicom_seg import write_dicom_seg

            write_dicom_seg(labels, path, predictor.labels, target, overwrite=overwrite)
        else:
            io.write(labels, target, overwrite=overwrite)
        if prob_target is not None:
            io.write(probs, prob_target, overwrite=overwrite)
        typer.echo(f"{path} -> {target}")


def _expand(inputs: list[Path]) -> list[Path]:
    """A folder of volume files or pictures stands for its files; a folder with DICOM files is one
    series."""
    from medsight.io import FORMATS, suffix_of

    files = (".nii", ".nii.gz", ".nrrd", *FORMATS["image"].suffixes)
    found = []
    for p in inputs:
        volumes = (
            sorted(
                f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and suffix_of(f) in files
            )
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
