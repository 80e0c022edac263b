"""`medsight textseg train|predict`: text-guided semi-supervised 2D segmentation (LViT)."""

from __future__ import annotations

from pathlib import Path

import typer

from medsight.cli.options import DEVICE, LR_WARMUP, NUM_WORKERS, PRECISION, START_AFRESH, TIME_LIMIT

textseg_app = typer.Typer(
    help="Text-guided, semi-supervised 2D segmentation (LViT): images, masks for some, a sentence each.",
    no_args_is_help=True,
)

METHOD_CHOICES = ("lvit", "lvit-notext", "unet2d")
PICTURES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def register(app: typer.Typer) -> None:
    app.add_typer(textseg_app, name="textseg")


@textseg_app.command("train")
def train(
    data: Path = typer.Option(
        ...,
        "--data",
        help="LViT folders (Train_Folder/Val_Folder with a text sheet), "
        "a CSV manifest with a text column, or any 2D layout.",
    ),
    method: str = typer.Option("lvit", "--method", help="lvit, lvit-notext (text removed) or unet2d."),
    labeled_fraction: float = typer.Option(
        1.0,
        "--labeled-fraction",
        help="Share of training images that keep their masks (chosen by --seed); the rest are unlabeled.",
    ),
    epi: bool = typer.Option(
        None,
        "--epi/--no-epi",
        help="Exponential pseudo-label iteration on unlabeled images (default: on for lvit, off for unet2d).",
        show_default=False,
    ),
    lv_loss: bool = typer.Option(
        None,
        "--lv-loss/--no-lv-loss",
        help="Language-vision loss: the text-matched "
        "labeled mask as a weak target (default: on for lvit, off for unet2d).",
        show_default=False,
    ),
    size: str = typer.Option("small", "--size", help="lvit size: small or large."),
    grounded: bool = typer.Option(
        False,
        "--grounded",
        help="lvit: give the tokens that meet the words their absolute position in the whole image, "
        "so sentences about where things are can be tied to crops and windows.",
    ),
    crop: int = typer.Option(128, "--crop", min=16, help="Training crop size (pixels at the working scale)."),
    scale: float = typer.Option(1.0, "--scale", help="Working scale: 0.5 trains and predicts at half size."),
    text_cache: Path = typer.Option(
        None, "--text-cache", help="Folder to cache sentence embeddings in (default: <out>/text_cache)."
    ),
    epochs: int = typer.Option(40, min=1),
    steps_per_epoch: int = typer.Option(25, min=1, help="Optimiser steps per epoch."),
    batch_size: int = typer.Option(4, min=1),
    lr: float = typer.Option(2e-3),
    lr_warmup: float = LR_WARMUP,
    time_limit: float = TIME_LIMIT,
    patience: int = typer.Option(10, help="Stop after this many epochs without a better validation Dice."),
    seed: int = typer.Option(0, help="Seeds the split, the labeled subset, the weights and the sampling."),
    ema_decay: float = typer.Option(
        0.999,
        "--ema-decay",
        help="Validate, pseudo-label and save a moving average of the weights with this decay (0: off).",
    ),
    device: str = DEVICE,
    precision: str = PRECISION,
    num_workers: int = NUM_WORKERS,
    out: Path = typer.Option(
        Path("runs/textseg"), "-o", "--out", help="Run folder: checkpoints, metrics, curve."
    ),
    overwrite: bool = START_AFRESH,
    resume: bool = typer.Option(
        False, help="Continue the run in --out from its last epoch (same options as when it started)."
    ),
    progress: bool = typer.Option(True, help="Progress bars and a line per epoch."),
) -> None:
    """Train on the train split, keep the checkpoint with the best Dice on the validation split."""
    from medsight.tasks.lvit import train_textseg

    summary = train_textseg(_config(dict(locals())))
    if summary["rank"] == 0:
        typer.echo(
            f"best validation Dice {summary['best_val_mean_dice']:.4f} ({len(summary['labeled_ids'])} labeled, "
            f"{len(summary['unlabeled_ids'])} unlabeled images)  ->  {summary['best']}"
        )


# `textseg train` options named as TextSegConfig's fields (the others are mapped in _config)
SAME_NAMES = {"epochs", "steps_per_epoch", "batch_size", "lr", "lr_warmup", "time_limit", "patience", "seed",
              "ema_decay", "device", "precision", "num_workers", "overwrite", "resume", "progress", "size",
              "grounded", "labeled_fraction"}  # fmt: skip


def _config(options: dict):
    """`textseg train`'s options -> TextSegConfig: --method lvit-notext is lvit without text, and
    --epi/--lv-loss default to on except for unet2d."""
    from medsight.errors import MedsightError
    from medsight.tasks.lvit import TextSegConfig

    method = options["method"]
    if method not in METHOD_CHOICES:
        raise MedsightError(f"unknown method '{method}'; choose one of {', '.join(METHOD_CHOICES)}")
    semi = method != "unet2d"
    epi, lv_loss, cache = options["epi"], options["lv_loss"], options["text_cache"]
    return TextSegConfig(
        **{k: options[k] for k in SAME_NAMES}, data=str(options["data"]), out=str(options["out"]),
        method="unet2d" if method == "unet2d" else "lvit", with_text=method == "lvit",
        use_epi=semi if epi is None else epi, use_lv_loss=semi if lv_loss is None else lv_loss,
        crop_size=options["crop"], image_scale=options["scale"], text_cache=None if cache is None else str(cache),
    )  # fmt: skip


def _expand(inputs: list[Path]) -> list[Path]:
    found = []
    for path in inputs:
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in PICTURES and p.is_file()))
        else:
            found.append(path)
    return found


@textseg_app.command("predict")
def predict(
    images: list[Path] = typer.Argument(..., help="Pictures to segment, or folders of pictures."),
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint written by `medsight textseg train`."),
    text: str = typer.Option(None, "--text", help="One sentence describing the image(s)."),
    text_sheet: Path = typer.Option(
        None, "--text-sheet", help="Sheet (.xlsx or .csv, columns Image, Description) with a row per image."
    ),
    values: str = typer.Option(
        "stored",
        "--values",
        help="stored: the training masks' own values (0/255 for LViT); labels: 0, 1, ...",
    ),
    text_cache: Path = typer.Option(None, "--text-cache", help="Folder to cache text embeddings in."),
    tta: bool = typer.Option(
        False, "--tta", help="Average over the eight rotations and mirror images (eight passes)."
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder: <image-name>.png masks at full size."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing masks."),
) -> None:
    """Segment pictures, each with its sentence; masks keep each picture's original size."""
    from tqdm import tqdm

    from medsight import io
    from medsight.cli.outputs import output_paths
    from medsight.errors import MedsightError
    from medsight.tasks.lvit import TextSegPredictor
    from medsight.text import lookup, read_text_file, require_rows, warn_missing_text

    if text is not None and text_sheet is not None:
        raise MedsightError("give --text or --text-sheet, not both", text_sheet)
    if values not in ("stored", "labels"):
        raise MedsightError(f"--values must be 'stored' or 'labels', not {values!r}")
    paths = _expand(images)
    if not paths:
        raise MedsightError("no pictures found", images[0])
    for path in paths:
        if not path.exists():
            raise MedsightError("no such file", path)
    sentences: dict[Path, str | None] = dict.fromkeys(paths, text)
    if text_sheet is not None:
        table = read_text_file(text_sheet)
        require_rows(table, [p.name for p in paths], text_sheet)
        sentences = {p: lookup(table, p.name)[1] for p in paths}
    io.check_folder_writable(out)  # before loading the model
    predictor = TextSegPredictor(model, text_cache=text_cache, tta=tta)
    if predictor.uses_text:
        warn_missing_text(sum(1 for s in sentences.values() if not s), len(paths), "the input")
    names = output_paths(paths, out, lambda p: f"{io.case_name(p)}.png", overwrite)
    targets = dict(zip(paths, names, strict=True))
    for path in tqdm(paths, desc="segmenting", disable=len(paths) < 2):
        mask = predictor.predict(io.read(path), sentences[path], stored_values=values == "stored")
        io.write(mask, targets[path], overwrite=overwrite)
        typer.echo(f"{path} -> {targets[path]}")
