"""Model size and cost: parameter counts and FLOPs from ``torch.utils.flop_counter``.

FLOPs count one multiply-add as 2 and cover what ``FlopCounterMode`` counts (convolutions,
transposed convolutions, matrix products); norms, activations and interpolation are left out
for every model alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medsight.models.registry import get_spec

__all__ = ["count_parameters", "flops", "flops_per_volume", "model_summary", "slices_first"]


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on a zero tensor of ``input_shape`` (batch axis included).

    The model runs in eval mode without gradients, on its own device and dtype; its training
    mode is restored afterwards. Divide by ``1e9`` for GFLOPs.
    """
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with counter, torch.no_grad():
            model(torch.zeros(tuple(int(s) for s in input_shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def slices_first(shape: Sequence[int], slice_axis: int) -> tuple[int, ...]:
    """A volume shape reordered to ``(D, H, W)`` with the slice axis first, as the helpers below take it."""
    rest = [int(n) for a, n in enumerate(shape) if a != slice_axis]
    return (int(shape[slice_axis]), *rest)


def flops_per_volume(
    name: str,
    model: nn.Module,
    volume_shape: Sequence[int],
    in_channels: int = 1,
    slices: int | None = None,
) -> int:
    """FLOPs to segment one volume of ``volume_shape = (D, H, W)`` (slices along ``D``).

    2D and 2.5D networks run once per slice: ``D`` forwards on ``(1, C, H, W)`` or
    ``(1, C, slices, H, W)`` (the stack is edge-padded at the volume ends, so every slice costs
    the same). 3D networks run **once on the whole volume** (padded inside the model as
    needed); sliding-window inference with overlapping patches would cost more, so this is the
    3D network's lower bound. ``slices`` defaults to ``model.slices``.
    """
    depth, height, width = (int(s) for s in volume_shape)
    kind = get_spec(name).input_kind
    if kind == "3d":
        return flops(model, (1, in_channels, depth, height, width))
    if kind == "2d":
        return depth * flops(model, (1, in_channels, height, width))
    stack = int(slices if slices is not None else model.slices)
    return depth * flops(model, (1, in_channels, stack, height, width))


def model_summary(
    name: str,
    model: nn.Module,
    volume_shape: Sequence[int],
    in_channels: int = 1,
    slices: int | None = None,
) -> dict[str, Any]:
    """Parameters and GFLOPs per slice and per volume, as plain data for a report or a benchmark
    file. Per slice is one forward of a 2D or 2.5D network; for a 3D network, its volume's share."""
    total = flops_per_volume(name, model, volume_shape, in_channels, slices)
    return {
        "model": name,
        "parameters": count_parameters(model),
        "volume_shape": [int(s) for s in volume_shape],
        "gflops_per_slice": total / int(volume_shape[0]) / 1e9,
        "gflops_per_volume": total / 1e9,
    }
