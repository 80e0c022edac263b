"""Context-aware 2.5D segmentation network (docs/methods.md section 1; patent CN114723669A).

The network reads ``k`` consecutive slices ``(B, C, k, H, W)`` and predicts logits for the centre
slice ``(B, num_classes, H, W)``.

Layout (default ``features=(16, 32, 64, 128)``, ``k=5``)::

    input (C, 5, H, W)
      enc0: 3D conv 3x3x3, stride (1,2,2), valid along slices          -> (16, 3, H/2, W/2)
      enc1: 3D separable conv 3x3x3, stride (1,2,2), valid along slices -> (32, 1, H/4, W/4)
      enc2: 3D separable conv 1x3x3, stride (1,2,2)                     -> (64, 1, H/8, W/8)
      ASPP (2D, separable dilated branches) 64 -> 128 at H/8
      decoder: bilinear upsample x2 + concat centre-slice skip + depthwise-separable conv
      refine: concat the raw centre slice at full size + depthwise-separable conv
      head: 1x1 conv -> num_classes

About 57k parameters and 0.32 GFLOPs per 36x52x36 volume (36 forwards), against 1.19M and
1.11 GFLOPs for MONAI's 3D U-Net of the same widths on the whole volume.

Slice-axis collapse: each encoder level removes ``r`` slices on each side with a convolution
that is *valid* (unpadded) along the slice axis, kernel depth ``2r + 1`` (at least 3). The
``(k - 1) / 2`` removals are spread over the encoder levels, earliest levels first, so the slice
axis is 1 before the bottleneck; early collapse keeps the 3D convolutions cheap.

Skip connections take the **centre slice** of each encoder level. A valid convolution along the
slice axis keeps the stack centred on the target slice, so the centre of every level is already
a learned mix of its ``2r + 1`` neighbours; a separate learned ``1 x k`` reduction would add
parameters without adding context.

``H`` and ``W`` need not be divisible by ``2**levels``: the input is zero-padded at the end of
each in-plane axis and the logits are cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medsight.models.blocks import ASPP, DepthwiseSeparableConv2d, pad_to_multiple

__all__ = ["Context25D", "slice_reduction_schedule"]


def slice_reduction_schedule(slices: int, levels: int) -> list[int]:
    """How many slices each encoder level removes from each side so ``slices`` shrink to 1.

    The total is ``(slices - 1) / 2``, spread evenly over ``levels`` with the remainder on the
    earliest levels, e.g. ``(5, 3) -> [1, 1, 0]`` and ``(9, 3) -> [2, 1, 1]``.
    """
    total = (slices - 1) // 2
    base, extra = divmod(total, levels)
    return [base + (1 if level < extra else 0) for level in range(levels)]


def _conv3d(
    in_ch: int, out_ch: int, kernel: tuple[int, int, int], stride, padding, separable: bool
) -> nn.Module:
    """A bias-free 3D convolution; ``separable`` factorises it into depthwise + pointwise."""
    if not separable:
        return nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)
    return nn.Sequential(
        nn.Conv3d(in_ch, in_ch, kernel, stride=stride, padding=padding, groups=in_ch, bias=False),
        nn.Conv3d(in_ch, out_ch, 1, bias=False),
    )


class _EncoderBlock3d(nn.Module):
    """3D conv (stride ``(1, 2, 2)``, valid by ``r`` slices each side) -> instance norm -> LeakyReLU.

    The kernel is ``(2r + 1, 3, 3)`` with at least 3 along the slices (padded back to ``r``
    removals), or ``(1, 3, 3)`` once a single slice is left. With ``residual=True`` a second
    in-plane conv and a shortcut are added: ``y = act(g(f(x)) + P x')`` where ``x'`` is ``x``
    cropped to the kept slices and ``P`` a strided 1x1x1 projection.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        in_depth: int,
        reduce: int,
        residual: bool,
        separable_first: bool,
        separable_second: bool,
    ):
        super().__init__()
        self.reduce = reduce
        if in_depth == 1:
            depth_kernel, depth_pad = 1, 0
        else:
            depth_kernel = max(3, 2 * reduce + 1)
            depth_pad = (depth_kernel - 1) // 2 - reduce
        self.conv = _conv3d(
            in_ch, out_ch, (depth_kernel, 3, 3), (1, 2, 2), (depth_pad, 1, 1), separable_first
        )
        self.norm = nn.InstanceNorm3d(out_ch, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.residual = residual
        if residual:
            self.conv2 = _conv3d(out_ch, out_ch, (1, 3, 3), 1, (0, 1, 1), separable_second)
            self.norm2 = nn.InstanceNorm3d(out_ch, affine=True)
            self.shortcut = nn.Conv3d(in_ch, out_ch, kernel_size=1, stride=(1, 2, 2), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm(self.conv(x)))
        if not self.residual:
            return y
        kept = x[:, :, self.reduce : x.shape[2] - self.reduce] if self.reduce else x
        return self.act(self.norm2(self.conv2(y)) + self.shortcut(kept))


class Context25D(nn.Module):
    """2.5D segmentation network: 3D encoder over a slice stack, ASPP bottleneck, light 2D decoder.

    Args:
        in_channels: image channels per slice (modalities).
        num_classes: output classes including background (>= 2).
        slices: stack size ``k``, odd and >= 1; the target is the centre slice.
        features: channels per encoder level; the last entry is the ASPP width. Each entry
            but the last halves the in-plane size, so ``H, W`` are padded to multiples of
            ``2 ** (len(features) - 1)`` internally.
        aspp_rates: ASPP rates at the bottleneck (1 means a 1x1 branch). The defaults suit a
            bottleneck of about 5 to 30 pixels (1/8 of the slice).
        residual: add a second in-plane conv and a shortcut to each encoder level.
        separable_encoder: make the encoder's convs depthwise-separable (depthwise + pointwise), as
            in the light 2.5D nnU-Net of Zhao et al. 2021, except the very first one: it reads the
            raw slices, has few input channels and is cheap anyway. Without it the encoder alone
            costs about as much as a 3D U-Net of the same width.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        slices: int = 5,
        features: Sequence[int] = (16, 32, 64, 128),
        aspp_rates: Sequence[int] = (1, 2, 4, 6),
        residual: bool = False,
        separable_encoder: bool = True,
    ):
        super().__init__()
        features = tuple(int(f) for f in features)
        if int(in_channels) < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if int(num_classes) < 2:
            raise ValueError(
                f"num_classes must be >= 2 (background plus at least one class), got {num_classes}"
            )
        if int(slices) < 1 or int(slices) % 2 == 0:
            raise ValueError(f"slices must be an odd integer >= 1 so a centre slice exists, got {slices}")
        if len(features) < 2 or any(f < 1 for f in features):
            raise ValueError(
                f"features needs at least two positive widths (encoder + bottleneck), got {features}"
            )
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.slices = int(slices)
        self.features = features
        self.multiple = 2 ** (len(features) - 1)

        encoder_widths = features[:-1]
        schedule = slice_reduction_schedule(self.slices, len(encoder_widths))
        self.encoder = nn.ModuleList()
        depth, channels = self.slices, self.in_channels
        for level, (width, reduce) in enumerate(zip(encoder_widths, schedule, strict=True)):
            block = _EncoderBlock3d(
                channels,
                width,
                depth,
                reduce,
                residual,
                separable_first=separable_encoder and level > 0,
                separable_second=separable_encoder,
            )
            self.encoder.append(block)
            depth, channels = depth - 2 * reduce, width
        self.bottleneck = ASPP(
            encoder_widths[-1],
            features[-1],
            rates=aspp_rates,
            separable=True,
            branch_ch=max(1, features[-1] // 4),
        )

        # Decoder level i fuses the coarser decoder output with encoder level i's centre slice.
        self.decoder = nn.ModuleList()
        coarser = features[-1]
        for width in reversed(encoder_widths):
            self.decoder.append(DepthwiseSeparableConv2d(coarser + width, width))
            coarser = width
        # Full resolution: fuse with the raw centre slice so boundaries stay sharp; kept narrow
        # because every pixel of every slice pays for it.
        refine_width = max(self.num_classes, coarser // 2)
        self.refine = DepthwiseSeparableConv2d(coarser + self.in_channels, refine_width)
        self.head = nn.Conv2d(refine_width, self.num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels or x.shape[2] != self.slices:
            raise ValueError(
                f"Context25D expects (B, {self.in_channels}, {self.slices}, H, W), got {tuple(x.shape)}"
            )
        x, crop = pad_to_multiple(x, (1, self.multiple, self.multiple))
        centre = x[:, :, self.slices // 2]

        skips: list[torch.Tensor] = []
        y = x
        for block in self.encoder:
            y = block(y)
            skips.append(y[:, :, y.shape[2] // 2])
        y = self.bottleneck(y[:, :, 0])

        for fuse, skip in zip(self.decoder, reversed(skips), strict=True):
            if y.shape[-2:] != skip.shape[-2:]:
                y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = fuse(torch.cat([y, skip], dim=1))
        y = F.interpolate(y, size=centre.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(self.refine(torch.cat([y, centre], dim=1)))
        return logits[..., crop[3], crop[4]]
