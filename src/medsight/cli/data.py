"""`medsight data ...`: look at a dataset in its own layout (nothing is converted or copied)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

data_app = typer.Typer(
    help="Datasets: detect their layout, list cases, check integrity.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("inspect")
def inspect(
    path: Path = typer.Argument(..., help="Dataset folder (or a CSV manifest)."),
    layout: str = typer.Option(
        None, help="Layout name (msd, nnunet, lvit, case-folders, csv); detected if omitted."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the fingerprint as JSON."),
    image_names: str = typer.Option(
        None, help="Case folders: channel file names without suffix, comma-separated (e.g. flair,t1c)."
    ),
    label_name: str = typer.Option(None, help="Case folders: label file name without suffix (e.g. seg)."),
    series: str = typer.Option(
        None,
        help="DICOM studies: the channels by SeriesDescription, comma-separated, '|' between names of one "
        "channel (e.g. FLAIR,T1|T1pre,T1c|T1post|dT1,T2).",
    ),
    max_cases: int = typer.Option(
        None, min=1, help="Read only the first N cases (counts still cover all cases)."
    ),
    progress: bool = typer.Option(True, help="Show a progress bar on stderr."),
) -> None:
    """Layout, cases per split, channels, shapes, spacings, label values, intensities and integrity problems.

    Exits 0 even when problems are found (they are listed with a final count)."""
    from medsight.datasets import fingerprint, open_dataset

    options: dict[str, Any] = {}
    if image_names:
        options["image_names"] = [n.strip() for n in image_names.split(",") if n.strip()]
    if label_name:
        options["label_name"] = label_name
    if series:
        options["series"] = series
    dataset = open_dataset(path, layout=layout, **options)
    facts = fingerprint(dataset, max_cases=max_cases, progress=progress and not as_json)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    _print_summary(facts)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _print_summary(facts: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    overview = Table(show_header=False, box=None, title=f"[bold]{facts['root']}[/]", title_justify="left")
    splits = ", ".join(f"{k} {v}" for k, v in facts["cases_per_split"].items())
    inspected = (
        "" if facts["cases_inspected"] == facts["cases"] else f" ({facts['cases_inspected']} inspected)"
    )
    rows = [
        ("layout", f"{facts['layout']} ({facts['dim']}D)"),
        ("cases", f"{facts['cases']}{inspected}: {splits}"),
        ("channels", ", ".join(facts["channels"]) or "-"),
        ("modality", facts["modality"] or "-"),
        ("texts", f"{facts['texts']['with_text']} of {facts['cases']} cases"),
    ]
    shapes = facts["shapes"]
    if "unique" in shapes:
        rows.append(("shapes", "; ".join(f"{s['shape']} x{s['cases']}" for s in shapes["unique"])))
    elif shapes:
        rows.append(("shapes", f"min {shapes['min']}  median {shapes['median']}  max {shapes['max']}"))
    if facts["spacings"]:
        sp = facts["spacings"]
        rows.append(("spacing mm", f"min {sp['min']}  median {sp['median']}  max {sp['max']}"))
    declared = facts["declared_labels"]
    rows.append(
        ("declared labels", ", ".join(f"{k}={v}" for k, v in declared.items()) or "none (discovered below)")
    )
    if facts["label_mapping"]:
        rows.append(("label mapping", ", ".join(f"{k}->{v}" for k, v in facts["label_mapping"].items())))
    for key, value in rows:
        overview.add_row(f"[bold]{key}[/]", str(value))
    console.print(overview)

    if facts["label_values"]:
        labels = Table(title="label values found (raw)", title_justify="left")
        for column in ("value", "voxels", "fraction", "cases"):
            labels.add_column(column, justify="right")
        total = max(facts["label_voxels"], 1)
        for row in facts["label_values"]:
            labels.add_row(
                str(row["value"]), str(row["voxels"]), f"{row['voxels'] / total:.4%}", str(row["cases"])
            )
        console.print(labels)

    if facts["intensity"]:
        intensity = Table(title="intensity per channel", title_justify="left")
        for column in ("channel", "mean", "std", "p0.5", "p99.5", "min", "max"):
            intensity.add_column(column, justify="right" if column != "channel" else "left")
        for row in facts["intensity"]:
            if row["voxels"]:
                keys = ("mean", "std", "p0_5", "p99_5", "min", "max")
                intensity.add_row(row["channel"], *(_fmt(row[k]) for k in keys))
        console.print(intensity)

    problems = facts["problems"]
    if problems:
        table = Table(title="[bold red]integrity problems[/]", title_justify="left")
        for column in ("case", "file", "problem"):
            table.add_column(column, overflow="fold")
        for p in problems:
            table.add_row(p["case"], p["file"] or "-", p["problem"])
        console.print(table)
        console.print(
            f"[bold red]{len(problems)} problem(s) found[/] in {facts['cases_inspected']} inspected cases"
        )
    else:
        console.print(f"[bold green]no problems found[/] in {facts['cases_inspected']} inspected cases")
