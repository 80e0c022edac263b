"""Building blocks shared by medsight's networks (2D unless stated otherwise).

All blocks are device-agnostic ``nn.Module`` s; they never move tensors between devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ASPP",
    "DepthwiseSeparableConv2d",
    "DynamicConv2d",
    "PolarizedSelfAttention",
    "SqueezeExcite",
    "conv_norm_act2d",
    "pad_to_multiple",
]


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


class PolarizedSelfAttention(nn.Module):
    """Polarized self-attention, parallel layout (Liu et al. 2021, arXiv 2107.00782), 2D.

    Channel-only branch: ``q = softmax_HW(W_q x)`` (one map, ``C -> 1``), ``v = W_v x`` (``C -> C/2``);
    ``z = v q`` collapses the spatial axes fully, then ``a_ch = sigmoid(LN(W_z z))`` (``C/2 -> C``).
    Spatial-only branch: ``q = softmax_C(avgpool(W_q x))`` (``C -> C/2``, channels collapsed after
    pooling), ``v = W_v x`` (``C -> C/2``); ``a_sp = sigmoid(q^T v)``, one weight per pixel.
    Output ``a_ch * x + a_sp * x``: with all weights zero both gates are 0.5 and the block is the identity.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"PolarizedSelfAttention needs >= 2 channels, got {channels}")
        half = channels // 2
        # No bias: softmax over pixels ignores a constant shift, so it could never learn.
        self.ch_q = nn.Conv2d(channels, 1, 1, bias=False)
        self.ch_v = nn.Conv2d(channels, half, 1)
        self.ch_z = nn.Conv2d(half, channels, 1)
        self.ch_norm = nn.LayerNorm(channels)
        self.sp_q = nn.Conv2d(channels, half, 1)
        self.sp_v = nn.Conv2d(channels, half, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints before the bias went carry ch_q.bias; it never changed an output, so drop it.
        state_dict.pop(prefix + "ch_q.bias", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, 1, 1)`` channel weights in (0, 1)."""
        q = torch.softmax(self.ch_q(x).flatten(2), dim=2)  # (B, 1, HW)
        z = torch.bmm(self.ch_v(x).flatten(2), q.transpose(1, 2))  # (B, C/2, 1)
        z = self.ch_z(z.unsqueeze(-1)).flatten(1)  # (B, C)
        return torch.sigmoid(self.ch_norm(z))[..., None, None]

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` pixel weights in (0, 1)."""
        q = torch.softmax(self.sp_q(x).mean(dim=(2, 3)), dim=1)  # (B, C/2)
        s = torch.bmm(q.unsqueeze(1), self.sp_v(x).flatten(2))  # (B, 1, HW)
        return torch.sigmoid(s).reshape(x.shape[0], 1, *x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.channel_gate(x) + x * self.spatial_gate(x)


class DynamicConv2d(nn.Module):
    """Dynamic (perception) convolution: ``K`` kernels mixed per sample by input-dependent attention.

    ``pi = softmax(MLP(avgpool(x)) / temperature)`` over the ``K`` kernels (Chen et al. 2020,
    "Dynamic Convolution"); each sample is convolved with ``sum_k pi_k W_k`` (and ``sum_k pi_k b_k``).
    The batch runs as one grouped convolution (``groups = B``), so the cost is that of one
    ordinary convolution plus the tiny attention MLP. ``forward(x, attention=...)`` takes given
    ``(B, K)`` weights instead (tests, analysis). A large ``temperature`` keeps the mix near uniform
    early in training, as the paper recommends; it can be lowered later through the attribute.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        kernels: int = 4,
        reduction: int = 4,
        temperature: float = 30.0,
        bias: bool = True,
    ):
        super().__init__()
        if kernels < 1 or temperature <= 0 or kernel_size % 2 == 0:
            raise ValueError(
                f"need kernels >= 1, temperature > 0 and an odd kernel_size ('same' padding), "
                f"got {kernels}, {temperature} and {kernel_size}"
            )
        self.in_ch, self.out_ch, self.kernel_size, self.kernels = in_ch, out_ch, kernel_size, kernels
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.empty(kernels, out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(kernels, out_ch)) if bias else None
        for k in range(kernels):  # each kernel initialised like an ordinary convolution
            nn.init.kaiming_uniform_(self.weight[k], a=5**0.5)
        hidden = max(4, in_ch // reduction)
        self.fc1 = nn.Linear(in_ch, hidden)
        self.fc2 = nn.Linear(hidden, kernels)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` kernel weights, summing to 1 per sample."""
        logits = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))
        return torch.softmax(logits / self.temperature, dim=1)

    def forward(self, x: torch.Tensor, attention: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        pi = self.attention(x) if attention is None else attention
        weight = torch.einsum("bk,koihw->boihw", pi, self.weight).reshape(
            -1, self.in_ch, *self.weight.shape[3:]
        )
        bias = None if self.bias is None else (pi @ self.bias).reshape(-1)
        y = F.conv2d(
            x.reshape(1, b * self.in_ch, h, w), weight, bias, padding=self.kernel_size // 2, groups=b
        )
        return y.reshape(b, self.out_ch, *y.shape[2:])
