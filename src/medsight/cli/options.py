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
LR_WARMUP = typer.Option(
    0.0, help="Fraction of the steps over which the learning rate rises linearly from near 0 (0: none)."
)

# Options every trainer shares: the run folder's fate, the budget, the seeds and the data layout.
SEED = typer.Option(0, help="Seeds the split, the weights and the sampling: same seed, same run.")
SPLIT_SEED = typer.Option(None, help="Seed of the train/validation split only (default: --seed).")
TIME_LIMIT = typer.Option(None, help="Training budget in minutes; stops after the epoch that passes it.")
LAYOUT = typer.Option(None, help="Force a dataset layout instead of detecting it.")
RESUME = typer.Option(False, help="Continue the run in --out from its last checkpoint.")
START_AFRESH = typer.Option(False, help="Start afresh even if --out holds a run.")
