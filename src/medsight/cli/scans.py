"""`medsight info` and `medsight convert`: one scan at a time."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("info")(info)
    app.command("convert")(convert)


def _series_option(source: Path, series: str | None) -> dict[str, str]:
    """``{"series": ...}`` for a DICOM source; other readers would blame the file for the option."""
    from medsight.errors import MedsightError
    from medsight.io.registry import format_of

    if not series:
        return {}
    kind = format_of(source).name if source.exists() else "dicom"  # a missing source: io.read says so
    if kind != "dicom":
        raise MedsightError(f"--series applies to DICOM only; this is a {kind} file", source)
    return {"series": series}


def info(
    scan: Path = typer.Argument(..., help="A scan file or a DICOM folder."),
    series: str = typer.Option(
        None, help="DICOM SeriesInstanceUID or description, when a folder holds several."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Shape, spacing, orientation and intensity range of a scan."""
    from medsight import io

    facts = io.read(scan, **_series_option(scan, series)).describe()
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        table.add_row(f"[bold]{key}[/]", str(value))
    Console().print(table)


def convert(
    source: Path = typer.Argument(..., help="A scan file or a DICOM folder."),
    target: Path = typer.Argument(
        ..., help="Output file; the format follows the suffix (.nii.gz, .nrrd, .png, .npz...)."
    ),
    series: str = typer.Option(
        None, help="DICOM SeriesInstanceUID or description, when a folder holds several."
    ),
    overwrite: bool = typer.Option(False, help="Replace the target if it exists."),
) -> None:
    """Convert a scan between formats, keeping its geometry (e.g. a DICOM series to NIfTI)."""
    from medsight import io

    io.check_writable(target, overwrite)  # fail before the (possibly slow) read
    scan = io.read(source, **_series_option(source, series))
    io.write(scan, target, overwrite=overwrite)
    typer.echo(
        f"wrote {target}  shape {list(scan.spatial_shape)}  spacing {[round(s, 3) for s in scan.spacing]}"
    )
