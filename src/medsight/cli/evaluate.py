"""`medsight evaluate` (metrics tables and report) and `medsight overlay` (one picture)."""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from medsight.cli.startup import import_monai


class Kind(enum.StrEnum):
    seg = "seg"
    image = "image"


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("overlay")(overlay)


def default_out_dir(pred: Path) -> Path:
    """``<pred>_evaluation`` beside the predictions folder (not inside it: a subfolder would be read as a scan)."""
    pred = pred.resolve()
    return pred.parent / f"{pred.name}_evaluation"


def evaluate(
    pred: Path = typer.Option(
        ..., "--pred", help="Folder of predictions (label maps, or images with --kind image)."
    ),
    ref: Path = typer.Option(
        ..., "--ref", help="Folder of references; files pair with predictions by case id."
    ),
    images: Path = typer.Option(
        None,
        "--images",
        help="Folder of the input images, for the report's overlays (case id or <case>_0000).",
    ),
    out: Path = typer.Option(
        None, "-o", "--out", help="Output folder. Default: <PRED>_evaluation, next to the predictions folder."
    ),
    tolerance: float = typer.Option(1.0, "--tolerance", help="Normalised surface Dice tolerance, in mm."),
    kind: Kind = typer.Option(Kind.seg, "--kind", help="seg: Dice, IoU, HD95, ASSD, NSD; image: PSNR, SSIM."),
    mask: Path = typer.Option(
        None,
        "--mask",
        help="With --kind image: folder of foreground masks (paired by case id) for PSNR/SSIM inside them too.",
    ),
    report: bool = typer.Option(True, "--report/--no-report", help="Also write report.html with overlays."),
    overwrite: bool = typer.Option(False, help="Replace existing output files."),
) -> None:
    """Compare predictions with references case by case and write the metrics.

    Writes metrics.csv, summary.json, summary.md and report.html into OUT (default: PRED_evaluation).

    Files pair by case id: the file name without its format suffix (any format medsight reads).

    Every reference needs a prediction; extra predictions are ignored with a warning.

    Distances are in mm, from the reference's spacing. Both masks empty: Dice 1, HD95 0.

    One mask empty: Dice 0, HD95 and ASSD undefined (NaN, left out of the means and counted).
    """
    import warnings

    from rich.console import Console

    from medsight.evaluate import evaluate_folders
    from medsight.io import check_writable

    import_monai()
    out = out if out is not None else default_out_dir(pred)
    names = ["metrics.csv", "summary.json", "summary.md"] + (["report.html"] if report else [])
    for name in names:  # fail before the (possibly long) evaluation
        check_writable(out / name, overwrite)
    err = Console(stderr=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = evaluate_folders(
            pred, ref, tolerance_mm=tolerance, kind=kind.value, progress=True, mask_dir=mask
        )
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            err.print(f"[yellow]warning:[/] {warning.message}", highlight=False)
    paths = list(result.write(out, overwrite=overwrite).values())
    if report:
        from medsight.report.html import write_report

        paths.append(write_report(result, out, images_dir=images, overwrite=overwrite))
    _print_summary(result)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))


def _print_summary(result) -> None:
    import math

    from rich.console import Console
    from rich.table import Table

    title = f"{result.cases['case'].nunique()} cases"
    if result.kind == "seg":
        title += f", distances in mm, NSD at {result.tolerance_mm} mm"
    table = Table(title=title)
    for column in ("label", "metric", "mean", "std", "median", "n", "NaN"):
        table.add_column(column, justify="left" if column in ("label", "metric") else "right")
    for row in result.summary.to_dict("records"):

        def fmt(x):
            return f"{x:.4f}" if math.isfinite(x) else "n/a"

        table.add_row(
            str(row["label"]), row["metric"], fmt(row["mean"]), fmt(row["std"]), fmt(row["median"]),
            str(row["n"]), str(row["n_nan"] + row["n_inf"]),
        )  # fmt: skip
    Console().print(table)


def overlay(
    image: Path = typer.Argument(..., help="The image (any format medsight reads, or a DICOM folder)."),
    label: Path = typer.Option(None, "--label", help="Reference label map, drawn in green."),
    pred: Path = typer.Option(None, "--pred", help="Predicted label map, drawn in red."),
    out: Path = typer.Option(..., "-o", "--out", help="Output PNG."),
    slice_index: int = typer.Option(
        None, "--slice", help="Axial slice (volumes; voxel index along the scan's own axial axis)."
    ),
    title: str = typer.Option(None, help="Title above the picture."),
    overwrite: bool = typer.Option(False, help="Replace the PNG if it exists."),
) -> None:
    """Draw the image with the reference (green) and prediction (red) contours: one panel for a 2D
    image, axial/coronal/sagittal views through the label's centre for a volume."""
    from medsight import io
    from medsight.report.overlay import check_png_name, overlay_png
    from medsight.scan import align_to

    io.check_writable(check_png_name(out), overwrite)
    scan = io.read(image)
    # a label in another orientation (LAS on an LPS-read CT) or crop is drawn where it lies
    label_scan = align_to(io.read(label), scan, "label") if label else None
    pred_scan = align_to(io.read(pred), scan, "prediction") if pred else None
    overlay_png(scan, out, label_scan, pred_scan, slice_index=slice_index, title=title, overwrite=overwrite)
    typer.echo(f"wrote {out}")
