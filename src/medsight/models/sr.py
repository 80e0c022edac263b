"""Super-resolution network with semantic perception (METHODS.md section 5), 2D.

Layout (all convolutions run on the low-resolution grid; only the upsampler leaves it)::

    x ──3x3──> f0 ──block 1──(SFT)──block 2──(SFT)── ... ──block N──(SFT)
                │        └──────────┬─────────┘                 │
                │              concat of every block's output ──1x1──3x3──(+ f0)──upsampler──(+ interp(x))──> y
    semantic map (B, Cs, h, w) ──1x1──3x3──resize to the LR grid──> one (gamma, beta) per fusion point

- **Distillation block** (progressive channel split, as RFDN/IMDN): at each of three steps a 1x1
  convolution keeps ``distilled`` channels and the rest of the features are refined by a 3x3
  convolution with a residual; the last refinement is the *dynamic perception* convolution
  (:class:`~medsight.models.blocks.DynamicConv2d`, K kernels mixed by input-dependent attention). A
  last 3x3 distils the refined features; the distilled parts are concatenated, fused by a 1x1,
  re-weighted by polarized self-attention (channel-only and spatial-only branches) and added to
  the block input.
- **Semantic feature transfer** (``semantic=True``): the caption encoder's feature map is projected,
  resized (bilinear) to the low-resolution grid and, after each block listed in ``fuse_at``,
  modulates the features as in SFT/FiLM: ``f * (1 + gamma) + beta``. The gamma/beta convolutions
  start at zero, so the untrained branch leaves the plain network unchanged. ``semantic=False`` is
  the ``plain`` variant: the same network without the branch.
- **Upsampler**: ``inplane`` pixel shuffle by ``scale`` (2, 3, 4) on both axes; ``thick`` a sub-pixel
  convolution along the first spatial axis only (the slice axis of a slice-axis x in-plane image):
  ``C * r`` channels reshaped into ``r`` rows per input row.
- **Global residual**: the network adds its output to the interpolated input (``bicubic`` or
  ``bilinear``, ``align_corners=False``), so it learns the detail interpolation misses. Pixel
  shuffle and this interpolation agree on geometry: LR pixel ``i`` is the centre of HR pixels
  ``i*r .. i*r + r - 1``, as :mod:`medsight.transforms.degrade` builds the pairs. (PyTorch's bicubic
  kernel, ``a = -0.75``, does not reproduce a linear ramp exactly; bilinear does.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medsight.errors import MedsightError
from medsight.models.blocks import DynamicConv2d, PolarizedSelfAttention

SR_MODES = ("inplane", "thick")
INTERPOLATIONS = ("bicubic", "bilinear")

__all__ = ["DistillationBlock", "SRNetwork", "SemanticBranch", "SemanticSR", "build_sr_network"]


def _act() -> nn.Module:
    return nn.LeakyReLU(0.05, inplace=True)


class DistillationBlock(nn.Module):
    """Three distil/refine steps (the last refinement dynamic), a final distil, 1x1 fusion, PSA, residual."""

    def __init__(self, channels: int, distilled: int | None = None, kernels: int = 4):
        super().__init__()
        d = distilled or channels // 2
        self.distil = nn.ModuleList([nn.Conv2d(channels, d, 1) for _ in range(3)])
        self.refine = nn.ModuleList(
            [nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)]
            + [DynamicConv2d(channels, channels, 3, kernels=kernels)]
        )
        self.last = nn.Conv2d(channels, d, 3, padding=1)
        self.fuse = nn.Conv2d(4 * d, channels, 1)
        self.attention = PolarizedSelfAttention(channels)
        self.act = _act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts, r = [], x
        for distil, refine in zip(self.distil, self.refine, strict=True):
            parts.append(self.act(distil(r)))
            r = self.act(refine(r) + r)
        parts.append(self.act(self.last(r)))
        return self.attention(self.fuse(torch.cat(parts, dim=1))) + x


class SemanticBranch(nn.Module):
    """Semantic map -> one ``(gamma, beta)`` pair per fusion point, on the SR feature grid."""

    def __init__(self, semantic_channels: int, channels: int, fusions: int):
        super().__init__()
        self.project = nn.Sequential(
            nn.Conv2d(semantic_channels, channels, 1),
            _act(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _act(),
        )
        self.modulate = nn.ModuleList([nn.Conv2d(channels, 2 * channels, 1) for _ in range(fusions)])
        for conv in self.modulate:  # start as the identity modulation
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, semantic: torch.Tensor, size: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s = F.interpolate(self.project(semantic), size=tuple(size), mode="bilinear", align_corners=False)
        return [tuple(conv(s).chunk(2, dim=1)) for conv in self.modulate]  # type: ignore[misc]


class SRNetwork(nn.Module):
    """See the module docstring. ``forward(x, semantic=None)``: ``x`` is ``(B, C, h, w)`` low resolution.

    Output ``(B, C, h*r, w*r)`` (``inplane``) or ``(B, C, h*r, w)`` (``thick``). ``semantic`` is the
    caption encoder's ``(B, Cs, h', w')`` map, required when the network was built with ``semantic=True``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        scale: int = 2,
        mode: str = "inplane",
        semantic: bool = False,
        features: int = 40,
        blocks: int = 4,
        kernels: int = 4,
        semantic_channels: int = 64,
        fuse_at: Sequence[int] | None = None,
        interpolation: str = "bicubic",
    ):
        super().__init__()
        self.in_channels, self.scale, self.mode, self.interpolation = in_channels, scale, mode, interpolation
        self.head = nn.Conv2d(in_channels, features, 3, padding=1)
        self.blocks = nn.ModuleList([DistillationBlock(features, kernels=kernels) for _ in range(blocks)])
        self.fuse = nn.Sequential(nn.Conv2d(blocks * features, features, 1), _act())
        self.body_tail = nn.Conv2d(features, features, 3, padding=1)
        factor = scale * scale if mode == "inplane" else scale
        self.upsample = nn.Conv2d(features, in_channels * factor, 3, padding=1)
        with torch.no_grad():  # a small first correction keeps early training near the interpolation
            self.upsample.weight.mul_(0.1)
            self.upsample.bias.zero_()
        self.fuse_at = tuple(range(blocks)) if fuse_at is None else tuple(int(i) for i in fuse_at)
        self.semantic = SemanticBranch(semantic_channels, features, len(self.fuse_at)) if semantic else None

    def set_temperature(self, temperature: float) -> None:
        """Softmax temperature of every dynamic convolution's kernel attention.

        Chen et al. anneal it from 30 (near-uniform mixing, all kernels learn) to 1 over the first
        epochs; the training task calls this once per epoch.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for module in self.modules():
            if isinstance(module, DynamicConv2d):
                module.temperature = float(temperature)

    def interpolate(self, x: torch.Tensor) -> torch.Tensor:
        """The baseline the network corrects: ``bicubic``/``bilinear`` on the upsampled axes."""
        factor = (self.scale, self.scale) if self.mode == "inplane" else (self.scale, 1)
        return F.interpolate(x, scale_factor=factor, mode=self.interpolation, align_corners=False)

    def _shuffle(self, y: torch.Tensor) -> torch.Tensor:
        if self.mode == "inplane":
            return F.pixel_shuffle(y, self.scale)
        b, _, h, w = y.shape
        y = y.reshape(b, self.in_channels, self.scale, h, w).permute(0, 1, 3, 2, 4)
        return y.reshape(b, self.in_channels, h * self.scale, w)

    def forward(self, x: torch.Tensor, semantic: torch.Tensor | None = None) -> torch.Tensor:
        if self.semantic is not None and semantic is None:
            raise ValueError(
                "this super-resolution network was built with semantic=True: pass the semantic map"
            )
        mods = self.semantic(semantic, x.shape[2:]) if self.semantic is not None else []
        f0 = self.head(x)
        f, outs = f0, []
        for i, block in enumerate(self.blocks):
            f = block(f)
            if i in self.fuse_at and mods:
                gamma, beta = mods[self.fuse_at.index(i)]
                f = f * (1.0 + gamma) + beta
            outs.append(f)
        body = self.body_tail(self.fuse(torch.cat(outs, dim=1))) + f0
        return self._shuffle(self.upsample(body)) + self.interpolate(x)


def build_sr_network(
    in_channels: int = 1,
    scale: int = 2,
    mode: str = "inplane",
    method: str = "plain",
    **kwargs: Any,
) -> SRNetwork:
    """The super-resolution network for ``method`` ``plain`` or ``semantic`` (the latter adds the branch).

    ``kwargs`` go to :class:`SRNetwork` (``features``, ``blocks``, ``kernels``, ``semantic_channels``,
    ``fuse_at``, ``interpolation``). Bad user options raise :class:`MedsightError`.
    """
    if method not in ("plain", "semantic"):
        raise MedsightError(f"unknown super-resolution method {method!r}; choose plain or semantic")
    if mode not in SR_MODES:
        raise MedsightError(f"unknown super-resolution mode {mode!r}; choose inplane or thick")
    allowed = (2, 3, 4) if mode == "inplane" else tuple(range(2, 9))
    if scale not in allowed:
        raise MedsightError(f"{mode} scale must be one of {list(allowed)}, got {scale}")
    if in_channels not in (1, 3):
        raise MedsightError(f"super-resolution takes 1 or 3 channels, got {in_channels}")
    interpolation = kwargs.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise MedsightError(f"interpolation must be bicubic or bilinear, got {interpolation!r}")
    blocks = int(kwargs.get("blocks", 4))
    fuse_at = kwargs.get("fuse_at")
    if fuse_at is not None and any(not 0 <= int(i) < blocks for i in fuse_at):
        raise MedsightError(f"fuse_at indices must lie in 0..{blocks - 1}, got {list(fuse_at)}")
    net = SRNetwork(in_channels, scale, mode, semantic=method == "semantic", **kwargs)
    # what a checkpoint stores to rebuild the same network: build_sr_network(**net.config)
    net.config = {"in_channels": in_channels, "scale": scale, "mode": mode, "method": method, **kwargs}
    return net


class SemanticSR(nn.Module):
    """The super-resolution network with its caption encoder: one input (the LR image), one output.

    The encoder sees the interpolated input, i.e. an image on the high-resolution grid like those it
    learned to describe, and its map feeds the semantic branch. ``freeze_encoder=True`` keeps the
    caption encoder as trained (no gradients); ``False`` fine-tunes it with the SR loss. A network
    built without the branch (``plain``) ignores the encoder, which may then be ``None``.
    """

    def __init__(self, sr: SRNetwork, encoder: nn.Module | None = None, freeze_encoder: bool = True):
        super().__init__()
        if sr.semantic is not None and encoder is None:
            raise ValueError("a semantic super-resolution network needs the caption encoder")
        self.sr = sr
        self.encoder = encoder if sr.semantic is not None else None
        self.freeze_encoder = freeze_encoder
        if self.encoder is not None and freeze_encoder:
            self.encoder.requires_grad_(False)

    def semantic_map(self, x: torch.Tensor) -> torch.Tensor:
        """The caption encoder's map of the interpolated input."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            return self.encoder(self.sr.interpolate(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            return self.sr(x)
        return self.sr(x, self.semantic_map(x))
