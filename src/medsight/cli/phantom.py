"""`medsight phantom`: write a synthetic dataset, so every method can run without outside data."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("phantom")(phantom)


def phantom(
    out: Path = typer.Argument(..., help="Folder to write the dataset into (created if missing)."),
    cases: int = typer.Option(20, "--cases", min=1, help="Number of cases."),
    dim: int = typer.Option(
        3,
        "--dim",
        min=2,
        max=3,
        help="3: abdomen-like MRI volumes (MSD layout); 2: H&E-like tiles (LViT layout).",
    ),
    seed: int = typer.Option(
        0, "--seed", help="Case i uses seed + i, so the same seed gives the same dataset."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty folder."),
    channels: int = typer.Option(
        1,
        "--channels",
        min=1,
        max=4,
        help="3D only: MRI contrasts per case; 4 gives BraTS-style T1c, T1, T2, FLAIR in one 4D NIfTI.",
    ),
    size: int | None = typer.Option(
        None, "--size", min=8, help="3D only: an isotropic 1 mm grid of size^3 voxels (default 64x64x40)."
    ),
    compress: bool = typer.Option(True, "--compress/--no-compress", help="3D only: .nii.gz or .nii files."),
) -> None:
    """Generate labelled phantoms with one descriptive sentence each."""
    from medsight.datasets.phantom import write_phantom_dataset

    write_phantom_dataset(
        out,
        cases,
        dim=dim,
        seed=seed,
        overwrite=overwrite,
        channels=channels,
        shape=None if size is None else (size,) * 3,
        compress=compress,
    )
    layout = (
        "Medical Segmentation Decathlon (dataset.json, imagesTr/, labelsTr/, texts.csv)"
        if dim == 3
        else "LViT"
    )
    typer.echo(f"wrote {cases} {dim}D phantom cases to {out} in {layout} layout")
