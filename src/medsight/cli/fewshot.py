"""`medsight fewshot`: segment a structure from annotated examples given at run time (no training).

``--support IMG MASK`` takes two paths and repeats (k-shot). Typer cannot declare a repeated
two-value option, so the command reads its free arguments itself: every ``--support`` consumes
the next two, everything else is a query.
"""

from __future__ import annotations

from pathlib import Path

import typer

from medsight.cli.startup import import_monai

SUPPORT_FLAG = "--support"


def register(app: typer.Typer) -> None:
    app.command(
        "fewshot",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(fewshot)


def split_support(tokens: list[str]) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """``['--support', img, mask, q1, ...]`` -> ``([(img, mask)], [q1, ...])``."""
    pairs, queries = [], []
    i = 0
    while i < len(tokens):
        if tokens[i] == SUPPORT_FLAG:
            if i + 2 >= len(tokens):
                raise typer.BadParameter("--support needs two paths: IMG MASK")
            image, mask = tokens[i + 1 : i + 3]
            if image.startswith("--") or mask.startswith("--"):
                raise typer.BadParameter("--support needs two paths: IMG MASK")
            pairs.append((Path(image), Path(mask)))
            i += 3
        elif tokens[i].startswith("--"):
            raise typer.BadParameter(f"unknown option {tokens[i]}")
        else:
            queries.append(Path(tokens[i]))
            i += 1
    return pairs, queries


def output_name(path: Path, ndim: int) -> str:
    from medsight.io import case_name

    return (case_name(path) if path.is_file() else path.name) + (".png" if ndim == 2 else ".nii.gz")


def fewshot(
    ctx: typer.Context,
    arguments: list[str] = typer.Argument(
        None,
        metavar="--support IMG MASK [--support IMG MASK ...] QUERY...",
        help="Support pairs (image and its mask of the structure; repeat for k-shot) and the scans to segment.",
        show_default=False,
    ),
    model: Path = typer.Option(
        ..., "--model", "-m", help="Checkpoint written by few-shot training (best.pt or last.pt)."
    ),
    out: Path = typer.Option(
        ..., "-o", "--out", help="Output folder: <query-name>.nii.gz (.png for 2D) masks."
    ),
    propagate: bool = typer.Option(
        False,
        "--propagate",
        help="Slice propagation: complete each support volume from its annotated slice(s); no queries.",
    ),
    chunks: int = typer.Option(
        12,
        "--chunks",
        min=1,
        help="Chunks along the slice axis (volume protocol; the papers use 3). Not used with --propagate.",
    ),
    neighbours: int = typer.Option(
        1,
        "--neighbours",
        min=0,
        help="Also use the support slices of this many chunks on each side, averaged (0: the papers' "
        "protocol). Not used with --propagate.",
    ),
    combine: str = typer.Option(
        "ensemble",
        "--combine",
        help="k shots: 'ensemble' averages the shots' predictions, 'average' their prototypes/weights. "
        "Not used with --propagate (each slice takes the nearest annotated slice as its support).",
    ),
    head: str = typer.Option(
        None,
        "--head",
        help="Head of a fewshot-shared model: prototype, local-prototype (default), conditional.",
    ),
    largest_component: bool = typer.Option(
        False, "--largest-component", help="Keep only the largest connected piece of each mask."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
) -> None:
    """Segment QUERY scans with the structure marked in the support masks, or complete a partly
    annotated volume (--propagate). Masks come out in each query's own geometry."""
    import sys

    from medsight.errors import MedsightError

    import_monai()
    tokens = list(arguments or []) + list(ctx.args)
    pairs, queries = split_support(tokens)
    if not pairs:
        raise typer.BadParameter("give at least one --support IMG MASK")
    if propagate and queries:
        raise typer.BadParameter("with --propagate the support volumes are the queries; give no QUERY")
    if not propagate and not queries:
        raise typer.BadParameter("give at least one QUERY scan (or --propagate)")
    try:
        written = _run(
            model, pairs, queries, out, propagate=propagate, chunks=chunks, neighbours=neighbours,
            combine=combine, head=head, largest=largest_component, overwrite=overwrite,
        )  # fmt: skip
    except MedsightError as err:
        print(f"medsight: error: {err}", file=sys.stderr)
        raise typer.Exit(2) from err
    for path in written:
        typer.echo(str(path))


def _run(
    model,
    pairs,
    queries,
    out: Path,
    *,
    propagate: bool,
    chunks: int,
    neighbours: int,
    combine: str,
    head: str | None,
    largest: bool,
    overwrite: bool,
) -> list[Path]:
    import numpy as np

    from medsight import io
    from medsight.cli.outputs import output_paths
    from medsight.tasks.fewshot_predict import FewShotPredictor

    io.check_folder_writable(out)  # before loading the model and reading the scans
    predictor = FewShotPredictor(model, head=head)
    support = [(io.read(image), io.read(mask)) for image, mask in pairs]
    jobs = [(image.path, image, mask) for image, mask in support] if propagate else []
    if not propagate:
        jobs = [(path, io.read(path), None) for path in queries]
    ndim = {path: scan.ndim for path, scan, _ in jobs}
    targets = output_paths([path for path, _, _ in jobs], out, lambda p: output_name(p, ndim[p]), overwrite)
    prepared = None if propagate else predictor.prepare(support, chunks, combine)  # once for every query
    written = []
    for (_, scan, mask), target in zip(jobs, targets, strict=True):
        if propagate:
            result = predictor.propagate(scan, mask, largest_component=largest)
        else:
            result = predictor.segment(prepared, scan, largest_component=largest, neighbours=neighbours)
        if scan.ndim == 2:
            result = result.with_array((result.array > 0).astype(np.uint8) * 255)
        written.append(io.write(result, target, overwrite=overwrite))
    return written
