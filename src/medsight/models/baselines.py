"""Baseline networks: MONAI's residual U-Net in 2D and 3D, wrapped to accept any input size.

``monai.networks.nets.UNet`` rather than ``BasicUNet`` (fixed five-level widths) or ``DynUNet``
(nnU-Net-style, needs kernel/stride plans): it takes the widths, strides, residual units and norm
we compare against directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn

from medsight.models.blocks import pad_to_multiple

__all__ = ["PadToMultiple", "unet2d", "unet3d"]


class PadToMultiple(nn.Module):
    """Run ``net`` on the input zero-padded to multiples of ``multiple`` and crop the output back.

    A U-Net with total stride ``s`` needs sizes divisible by ``s``; clinical crops (35x51x35
    hippocampus) are not.
    """

    def __init__(self, net: nn.Module, multiple: int):
        super().__init__()
        self.net = net
        self.multiple = int(multiple)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, crop = pad_to_multiple(x, self.multiple)
        return self.net(padded)[crop]


def _unet(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    channels: Sequence[int],
    strides: Sequence[int],
    num_res_units: int,
    norm: str,
    dropout: float,
) -> PadToMultiple:
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 (background plus at least one class), got {num_classes}")
    channels, strides = tuple(int(c) for c in channels), tuple(int(s) for s in strides)
    if len(strides) != len(channels) - 1:
        raise ValueError(f"need one stride per downsampling: {len(channels) - 1} for channels {channels}")
    net = UNet(
        spatial_dims=spatial_dims,
        in_channels=int(in_channels),
        out_channels=int(num_classes),
        channels=channels,
        strides=strides,
        num_res_units=int(num_res_units),
        norm=norm,
        dropout=float(dropout),
    )
    return PadToMultiple(net, math.prod(strides))


def unet2d(
    in_channels: int = 1,
    num_classes: int = 2,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 2,
    norm: str = "instance",
    dropout: float = 0.0,
) -> PadToMultiple:
    """MONAI ``UNet`` in 2D: ``(B, C, H, W) -> (B, num_classes, H, W)`` logits, any ``H, W``."""
    return _unet(2, in_channels, num_classes, channels, strides, num_res_units, norm, dropout)


def unet3d(
    in_channels: int = 1,
    num_classes: int = 2,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 2,
    norm: str = "instance",
    dropout: float = 0.0,
) -> PadToMultiple:
    """MONAI ``UNet`` in 3D: ``(B, C, D, H, W) -> (B, num_classes, D, H, W)`` logits, any size."""
    return _unet(3, in_channels, num_classes, channels, strides, num_res_units, norm, dropout)
