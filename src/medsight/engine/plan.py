"""Per-method defaults planned from the data, as nnU-Net plans its configurations.

The patch (3D) or slice window (2D/2.5D) covers the largest preprocessed case, rounded up to what the
U-Nets need and capped; the batch is as many samples as fit an activation budget, between 2 and 16.
The estimate is deliberately simple: stored activations of a U-Net scale with the voxels of its input
times its first layer's features, about ``ACTIVATION_BYTES_PER_VOXEL`` bytes per input voxel for the
networks here (32 features, float32, ~12 full-resolution maps kept for the backward pass).
With the default 512 MB budget the hippocampus plans batches of 16 slices and of 2 3D patches, the
settings its benchmark measured (a batch of 16 3D patches was ten times slower per step).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medsight.engine.sampling import round_up
from medsight.errors import MedsightError

ACTIVATION_BYTES_PER_VOXEL = 4 * 32 * 12
MEMORY_BUDGET_MB = 512.0
MIN_BATCH, MAX_BATCH = 2, 16
MAX_PATCH = {"3d": 96, "2d": 256, "2.5d": 256}


def fingerprint(shapes: list[tuple[int, ...]], channels: int, slice_axis: int) -> dict[str, Any]:
    """What the plan needs to know of a preprocessed dataset: the largest spatial extent per axis,
    the channels and the slice axis."""
    return {
        "max_shape": [int(n) for n in np.max(np.array(shapes), axis=0)],
        "channels": int(channels),
        "slice_axis": int(slice_axis),
    }


def plan(
    facts: dict[str, Any],
    kind: str,
    memory_budget: float = MEMORY_BUDGET_MB,
    batch_size: int | None = None,
    patch_size: list[int] | None = None,
) -> dict[str, Any]:
    """Batch size and patch size for a method whose input is ``kind`` ("2d", "2.5d" or "3d");
    ``batch_size``/``patch_size`` given by the user win over the plan."""
    biggest = facts["max_shape"]
    if kind == "3d":
        patch = [min(round_up(n), MAX_PATCH[kind]) for n in biggest]
    else:
        patch = [min(round_up(n), MAX_PATCH[kind]) for a, n in enumerate(biggest) if a != facts["slice_axis"]]
    if patch_size:
        if len(patch_size) != len(patch) or min(patch_size) < 1:
            raise MedsightError(
                f"--patch-size needs {len(patch)} positive sizes for a {kind} method, not {patch_size}"
            )
        patch = [round_up(int(n)) for n in patch_size]
    per_sample = float(np.prod(patch)) * ACTIVATION_BYTES_PER_VOXEL / 2**20
    planned = int(np.clip(memory_budget // per_sample, MIN_BATCH, MAX_BATCH))
    return {
        "batch_size": int(batch_size) if batch_size else planned,
        "patch": [int(n) for n in patch],
        "planned_batch_size": planned,
        "memory_budget_mb": float(memory_budget),
        "activation_mb_per_sample": round(per_sample, 1),
    }


def describe(planned: dict[str, Any], method: str) -> str:
    patches = planned.get("plane_patches", [planned["patch"]])  # one per plane with `--slice-planes 3`
    return (
        f"plan for {method}: batch {planned['batch_size']} (planned {planned['planned_batch_size']} for "
        f"{planned['memory_budget_mb']:g} MB at ~{planned['activation_mb_per_sample']:g} MB per sample), "
        f"patch {', '.join('x'.join(map(str, p)) for p in patches)}"
        + (f" (one per plane, {len(patches)} planes)" if len(patches) > 1 else "")
    )
