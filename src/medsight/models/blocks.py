"""Building blocks shared by medsight's networks (2D unless stated otherwise).

All blocks are device-agnostic ``nn.Module`` s; they never move tensors between devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ASPP", "DepthwiseSeparableConv2d", "SqueezeExcite", "conv_norm_act2d", "pad_to_multiple"]


def conv_norm_act2d(
    in_ch: int,
    out_ch: int,
    kernel_size: int = 3,
    dilation: int = 1,
    groups: int = 1,
) -> nn.Sequential:
    """``Conv2d`` (no bias, 'same' padding) -> ``InstanceNorm2d`` (affine) -> ``LeakyReLU(0.01)``."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=False),
        nn.InstanceNorm2d(out_ch, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class DepthwiseSeparableConv2d(nn.Module):
    """A 3x3 convolution factorised into a depthwise and a pointwise step.

    ``y = act(norm(W_p * (W_d (*) x)))`` where ``W_d`` is one 3x3 filter per input channel
    (``groups = in_ch``) and ``W_p`` a 1x1 convolution mixing channels. Weights:
    ``9 * in_ch + in_ch * out_ch`` instead of ``9 * in_ch * out_ch`` (no biases: the norm
    follows), i.e. roughly ``1/out_ch + 1/9`` of the cost of a full 3x3 convolution.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, dilation: int = 1):
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.depthwise = nn.Conv2d(
            in_ch, in_ch, kernel_size, padding=padding, dilation=dilation, groups=in_ch, bias=False
        )
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.norm = nn.InstanceNorm2d(out_ch, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.pointwise(self.depthwise(x))))


class SqueezeExcite(nn.Module):
    """Channel squeeze-and-excitation (Hu et al. 2018), for 2D or 3D feature maps.

    ``s = sigmoid(W_2 relu(W_1 mean_spatial(x)))`` with ``W_1: C -> C/r`` and ``W_2: C/r -> C``;
    the output is ``x * s`` broadcast over the spatial axes. ``forward(x, weights=...)`` accepts
    externally computed ``s`` of shape ``(B, C)`` instead (a conditioner arm in few-shot
    segmentation produces them from the support set).
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels} and {reduction}")
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The channel weights ``s`` in (0, 1), shape ``(B, C)``."""
        squeezed = x.flatten(2).mean(dim=2)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(squeezed))))

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.excitation(x) if weights is None else weights
        return x * scale.reshape(*scale.shape, *([1] * (x.ndim - 2)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3), 2D.

    Parallel branches on the same input, each ``out_ch`` wide: for every rate ``r`` in ``rates``
    a 1x1 convolution when ``r == 1``, otherwise a 3x3 convolution with dilation ``r`` (effective
    extent ``2r + 1`` pixels); plus an image-level branch (global average pool, 1x1 conv,
    broadcast back). The branches are concatenated and projected by a 1x1 conv:
    ``y = act(norm(W_proj [b_1(x), ..., b_n(x), pool(x)]))``.

    ``separable=True`` makes each dilated 3x3 branch depthwise-separable (DeepLab v3+), cutting
    its cost by roughly ``9x`` for wide inputs. ``branch_ch`` (default ``out_ch``) narrows the
    branches, which shrinks the projection, the dominant cost, by the same factor.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        rates: Sequence[int] = (1, 6, 12, 18),
        separable: bool = False,
        branch_ch: int | None = None,
    ):
        super().__init__()
        rates = tuple(int(r) for r in rates)
        if not rates or any(r < 1 for r in rates):
            raise ValueError(f"ASPP rates must be a non-empty sequence of integers >= 1, got {rates}")
        self.rates = rates
        width = out_ch if branch_ch is None else int(branch_ch)
        if width < 1:
            raise ValueError(f"ASPP branch_ch must be >= 1, got {branch_ch}")
        branches: list[nn.Module] = []
        for rate in rates:
            if rate == 1:
                branches.append(conv_norm_act2d(in_ch, width, kernel_size=1))
            elif separable:
                branches.append(DepthwiseSeparableConv2d(in_ch, width, kernel_size=3, dilation=rate))
            else:
                branches.append(conv_norm_act2d(in_ch, width, kernel_size=3, dilation=rate))
        self.branches = nn.ModuleList(branches)
        # No norm on the pooled branch: instance norm over a 1x1 map is undefined.
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, width, 1), nn.LeakyReLU(0.01, inplace=True)
        )
        self.project = conv_norm_act2d(width * (len(rates) + 1), out_ch, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


def pad_to_multiple(x: torch.Tensor, multiple: int | Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the trailing spatial axes of ``x`` (``(B, C, *spatial)``) up to multiples of ``multiple``.

    ``multiple`` is one int for all spatial axes or one per axis. Returns the padded tensor and
    the index that crops a same-layout output back to the original size (``y[crop]``). Padding
    goes at the end of each axis so voxel ``(0, 0)`` keeps its place.
    """
    spatial = x.shape[2:]
    multiples = [int(multiple)] * len(spatial) if isinstance(multiple, int) else [int(m) for m in multiple]
    if len(multiples) != len(spatial):
        raise ValueError(f"need one multiple per spatial axis ({len(spatial)}), got {multiples}")
    extra = [(-size) % m for size, m in zip(spatial, multiples, strict=True)]
    crop = (slice(None), slice(None), *(slice(0, size) for size in spatial))
    if not any(extra):
        return x, crop
    pad: list[int] = []
    for amount in reversed(extra):  # F.pad lists the last axis first
        pad += [0, amount]
    return F.pad(x, pad), crop
