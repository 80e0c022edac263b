"""Options every training or predicting command shares, declared once so that their names, defaults
and help read the same in `train`, `textseg train`, `sr train`, `pretrain` and the predictors."""

from __future__ import annotations

import typer

DEVICE = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps.")
PRECISION = typer.Option("auto", help="auto (mixed on CUDA, 32 on CPU), 32, 16-mixed, bf16-mixed.")
NUM_WORKERS = typer.Option(0, min=0, help="DataLoader processes sampling training batches.")
EMA_DECAY = typer.Option(
    0.999,
    help="Validate and keep a moving average of the weights with this decay (0: the weights as trained).",
)
