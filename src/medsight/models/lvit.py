"""LViT: a U-shaped CNN branch and a ViT branch side by side, with text fused into the ViT branch
(Li et al., IEEE TMI 2023, arXiv 2206.14718; docs/methods.md section 2). Our own implementation.

Layout (``w`` = ``width``; the U has four CNN levels with 1, 2, 4, 8 times ``w`` channels and a
bottleneck one scale below the last):

- a **stem** (3x3 conv, stride 2, ``w`` channels) puts the first level at scale 1/2, and a
  full-resolution refinement (the upsampled decoder output concatenated with the input, one 3x3
  conv) precedes the 1x1 head. This is how MONAI's U-Net spends its compute too (its first level
  is already strided). On this CPU it makes a training step 2.4x faster than levels starting at
  full resolution, with the same parameters, and the budgeted benchmark scores higher for it
  (docs/experiments.md). ``stem=False`` keeps the first level at full resolution, as in the paper's figure;
- every ViT stage works on one shared token grid, 16 pixels of the first level per token. Down
  stage ``i`` patch-embeds the level-``i`` map with patches of ``16/2^i`` pixels, adds the tokens
  carried from the previous stage (linearly widened), runs ``depth`` pre-norm transformer layers,
  and *reconstructs* the tokens back into the CNN map (bilinear upsampling + 1x1 conv, added):
  that is the feature exchange, both ways, at every scale;
- text: token embeddings ``(B, L, 384)`` are projected to the first stage's width and concatenated
  to its image tokens, so image tokens attend to words (padded words are masked out); the text
  tokens are dropped after the stage. Later stages see the text through the image tokens;
- up stages mirror the down stages on the decoder maps, starting from the down stage's tokens at
  the same scale (the ViT skip connection);
- skip connections pass through a Pixel-Level Attention Module (:class:`PLAM`).

- **grounding** (``grounded=True``, our addition): the input carries two more channels, the
  absolute (row, column) position of every pixel in the *whole* image, scaled to [-1, 1], which
  crops, flips and rotations move with the pixels. The first stage adds a projection of each
  token's mean position (Fourier features) to the image tokens before they meet the words, so a
  sentence about the whole image ("the nuclei density in the left is high") can be tied to where a
  training crop or inference window lies. The CNN branch never sees the positions.

``with_text=False`` builds the same network without the text projection (the no-text ablation);
``forward`` then ignores any text. With ``with_text=True`` an image without text (``text=None``
or an all-False mask) is segmented from the image alone: no word enters the attention.

Any ``H, W``: the input is zero-padded at the end to a multiple of the total stride (32 with the
stem, 16 without), and to at least twice that, and the output is cropped back.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsight.models.blocks import conv_norm_act2d, pad_to_multiple

__all__ = [
    "LVIT_SIZES",
    "PLAM",
    "LViT",
    "forward",
    "lv_loss",
    "lvit",
    "positions",
    "predict_probabilities",
    "pseudo_label_loss",
]

TEXT_DIM = 384
LVIT_SIZES = {
    "small": {"width": 16, "depth": 1, "heads": 2},
    "large": {"width": 32, "depth": 2, "heads": 4},
}
FREQUENCIES = (1, 2, 4)  # of the Fourier features of absolute positions (grounded=True)
LEVELS = 4  # CNN scales 1 .. 1/8 with a ViT stage each; the bottleneck sits at 1/16
GRID_STRIDE = 2**LEVELS


class PLAM(nn.Module):
    """Pixel-Level Attention Module for skip connections.

    Two parallel pooled descriptors weigh the features: a channel branch,
    ``a_c = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` of shape ``(B, C, 1, 1)`` (pooling over
    pixels), and a pixel branch, ``a_p = sigmoid(conv7x7([mean_c(x), max_c(x)]))`` of shape
    ``(B, 1, H, W)`` (pooling over channels). The output keeps the input as a residual so local
    detail is never suppressed outright: ``y = x + x * a_c * a_p``.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
        )
        self.pixel = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = torch.sigmoid(
            self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
        )
        pixel = torch.sigmoid(self.pixel(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))
        return x + x * channel * pixel


def _double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(conv_norm_act2d(in_ch, out_ch), conv_norm_act2d(out_ch, out_ch))


class TokenStage(nn.Module):
    """One ViT stage on the shared token grid: patch embedding of a CNN map, carried tokens added,
    transformer layers (optionally with text tokens appended), reconstruction added to the map."""

    def __init__(self, channels: int, patch: int, depth: int, heads: int, carried_dim: int | None):
        super().__init__()
        dim = channels
        self.patch = patch
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.position = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)  # size-agnostic position code
        self.carry = nn.Linear(carried_dim, dim) if carried_dim else None
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.reconstruct = nn.Sequential(
            nn.Conv2d(dim, channels, 1, bias=False),
            nn.InstanceNorm2d(channels, affine=True),
            nn.LeakyReLU(0.01),
        )

    def forward(
        self,
        features: torch.Tensor,
        carried: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        absolute: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.embed(features)
        grid = grid + self.position(grid)
        if absolute is not None:
            grid = grid + absolute
        b, d, gh, gw = grid.shape
        tokens = grid.flatten(2).transpose(1, 2)
        if carried is not None and self.carry is not None:
            tokens = tokens + self.carry(carried)
        n = tokens.shape[1]
        padding = None
        if text is not None:
            tokens = torch.cat([tokens, text], dim=1)
            image_valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
            padding = ~torch.cat([image_valid, text_mask.to(torch.bool)], dim=1)
        for layer in self.layers:
            tokens = layer(tokens, src_key_padding_mask=padding)
        tokens = self.norm(tokens[:, :n])
        back = tokens.transpose(1, 2).reshape(b, d, gh, gw)
        back = F.interpolate(back, size=features.shape[-2:], mode="bilinear", align_corners=False)
        return tokens, features + self.reconstruct(back)


class LViT(nn.Module):
    """``LViT(in_channels, num_classes, width, depth, heads, with_text)``;
    ``forward(x, text=None, text_mask=None)`` with ``x (B, C, H, W)``, ``text (B, L, 384)``,
    ``text_mask (B, L)`` bool -> logits ``(B, num_classes, H, W)``."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        width: int = 16,
        depth: int = 1,
        heads: int = 2,
        with_text: bool = True,
        text_dim: int = TEXT_DIM,
        stem: bool = True,
        grounded: bool = False,
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 2:
            raise ValueError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels}, {num_classes}")
        if width < 1 or width % heads:
            raise ValueError(f"width ({width}) must be a positive multiple of heads ({heads})")
        self.with_text = bool(with_text)
        widths = [width * 2**i for i in range(LEVELS)]
        self.stem = self.refine = None  # the strided stem and its full-resolution counterpart
        if stem:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
                nn.InstanceNorm2d(width, affine=True),
                nn.LeakyReLU(0.01, inplace=True),
            )
            self.refine = conv_norm_act2d(width + in_channels, width)
        self.multiple = GRID_STRIDE * (2 if stem else 1)
        first_in = width if stem else in_channels
        self.encoders = nn.ModuleList(
            _double_conv(first_in if i == 0 else widths[i - 1], widths[i]) for i in range(LEVELS)
        )
        self.bottleneck = _double_conv(widths[-1], widths[-1])
        self.down_vit = nn.ModuleList(
            TokenStage(widths[i], GRID_STRIDE // 2**i, depth, heads, widths[i - 1] if i else None)
            for i in range(LEVELS)
        )
        self.up_vit = nn.ModuleList(
            TokenStage(widths[i], GRID_STRIDE // 2**i, depth, heads, widths[i]) for i in range(LEVELS)
        )
        self.skip_attention = nn.ModuleList(PLAM(c) for c in widths)
        below = [*widths[1:], widths[-1]]  # channels arriving from one scale down
        self.decoders = nn.ModuleList(_double_conv(below[i] + widths[i], widths[i]) for i in range(LEVELS))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        if self.with_text:
            self.text_projection = nn.Sequential(nn.Linear(text_dim, widths[0]), nn.LayerNorm(widths[0]))
            self.text_type = nn.Parameter(torch.zeros(1, 1, widths[0]))
        self.in_channels = in_channels
        self.grounded = bool(grounded)
        if self.grounded:  # sin and cos of pi * f * (row, col) for f = 1, 2, 4 -> the token width
            self.locate = nn.Conv2d(2 * 2 * len(FREQUENCIES), widths[0], 1)

    def forward(
        self, x: torch.Tensor, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        height, width = x.shape[-2:]
        expected = self.in_channels + (2 if self.grounded else 0)
        if x.shape[1] != expected:
            what = " (the image's, then row and column positions)" if self.grounded else ""
            raise ValueError(f"LViT expects {expected} input channels{what}, got {x.shape[1]}")
        # At least two bottleneck pixels a side: instance norm needs more than one value.
        x = F.pad(x, (0, max(0, 2 * self.multiple - width), 0, max(0, 2 * self.multiple - height)))
        x, _ = pad_to_multiple(x, self.multiple)
        words = None
        if self.with_text and text is not None:
            if text_mask is None:
                text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            words = self.text_projection(text.to(x.dtype)) + self.text_type

        absolute = None
        if self.grounded:
            x, where = x[:, : self.in_channels], x[:, self.in_channels :]
            where = F.avg_pool2d(where, self.multiple)  # each token's mean position
            angles = torch.cat([torch.pi * f * where for f in FREQUENCIES], dim=1)
            absolute = self.locate(torch.cat([angles.sin(), angles.cos()], dim=1))
        skips, tokens_per_level, tokens = [], [], None
        h = x if self.stem is None else self.stem(x)
        for level, (encoder, stage) in enumerate(zip(self.encoders, self.down_vit, strict=True)):
            h = encoder(h if level == 0 else F.max_pool2d(h, 2))
            first = level == 0
            tokens, h = stage(
                h, tokens, words if first else None, text_mask if first else None, absolute if first else None
            )
            skips.append(h)
            tokens_per_level.append(tokens)
        h = self.bottleneck(F.max_pool2d(h, 2))
        for level in reversed(range(LEVELS)):
            h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
            h = self.decoders[level](torch.cat([h, self.skip_attention[level](skips[level])], dim=1))
            _, h = self.up_vit[level](h, tokens_per_level[level])
        if self.stem is not None:
            h = F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)
            h = self.refine(torch.cat([h, x], dim=1))
        return self.head(h)[..., :height, :width]


def lvit(
    in_channels: int = 3,
    num_classes: int = 2,
    size: str = "small",
    with_text: bool = True,
    grounded: bool = False,
) -> LViT:
    """LViT in its ``small`` (width 16, one transformer layer per stage, 2 heads) or ``large``
    (width 32, two layers, 4 heads) configuration, both with the strided stem."""
    if size not in LVIT_SIZES:
        raise ValueError(f"size must be one of {', '.join(LVIT_SIZES)}, not {size!r}")
    return LViT(in_channels, num_classes, with_text=with_text, grounded=grounded, **LVIT_SIZES[size])


# -- losses of the semi-supervised half (tasks/lvit.py) ---------------------------------------------
def lv_loss(probabilities, matched, grid: int = 4, valid=None):
    """``1 - cos(pool(p_fg), pool(onehot(matched)_fg))`` averaged over the valid images.

    ``probabilities (B, K, H, W)`` (softmax), ``matched (B, H, W)`` class indices of the text-matched
    labeled mask, ``valid (B,)`` bool (images without a match contribute nothing). Foreground
    classes are average-pooled onto a ``grid x grid`` map, so the loss asks for the same *layout* of
    density, not the same pixels.
    """
    k = probabilities.shape[1]
    reference = F.one_hot(matched.long().clamp(0, k - 1), k).permute(0, 3, 1, 2).to(probabilities.dtype)
    pred = F.adaptive_avg_pool2d(probabilities[:, 1:], grid).flatten(1)
    ref = F.adaptive_avg_pool2d(reference[:, 1:], grid).flatten(1)
    per_image = 1.0 - F.cosine_similarity(pred, ref, dim=1, eps=1e-6)
    if valid is None:
        return per_image.mean()
    valid = valid.to(per_image.dtype)
    return (per_image * valid).sum() / valid.sum().clamp_min(1.0) if valid.any() else per_image.sum() * 0.0


def pseudo_label_loss(logits, target, threshold: float = 0.7):
    """Cross-entropy plus foreground Dice towards the pseudo-labels' most likely class, on the pixels
    whose pseudo-label probability reaches ``threshold`` (``target (B, K, H, W)``; padded pixels,
    all-zero, never qualify). Training on confident hard labels rather than on the blurred average
    keeps an early, unsure teacher from pulling every pixel towards 0.5."""
    confidence, hard = target.max(dim=1)
    keep = (confidence >= threshold).to(logits.dtype)
    kept = keep.sum()
    if kept == 0:
        return logits.sum() * 0.0
    ce = (F.cross_entropy(logits, hard, reduction="none") * keep).sum() / kept
    probs = torch.softmax(logits, dim=1)[:, 1:] * keep[:, None]
    onehot = F.one_hot(hard, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(logits.dtype) * keep[:, None]
    dice = 1.0 - (2 * (probs * onehot).sum() + 1e-5) / (probs.sum() + onehot.sum() + 1e-5)
    return ce + dice


# -- inputs and inference ---------------------------------------------------------------------------
def uses_text(model) -> bool:
    return isinstance(model, LViT) and model.with_text


def is_grounded(model) -> bool:
    return isinstance(model, LViT) and model.grounded


def positions(shape: tuple[int, ...]) -> np.ndarray:
    """(2, h, w): every pixel's row and column in the whole image, scaled to [-1, 1]. Spatial
    augmentation moves these channels with the image, so a crop keeps knowing where it came from."""
    rows, cols = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape[-2:])
    return np.stack(np.meshgrid(rows, cols, indexing="ij"))


def forward(model, x, tokens=None, mask=None):
    """Logits for a batch; text goes only to a text-taking network."""
    if uses_text(model) and tokens is not None:
        return model(x, tokens, mask)
    return model(x)


def predict_probabilities(
    model, image: np.ndarray, text=None, roi: int = 256, batch: int = 4, tta: bool = False
) -> np.ndarray:
    """(C, h, w) -> (K, h, w) class probabilities by MONAI's Gaussian-weighted sliding window.

    ``tta`` averages the probabilities over the eight rotations and mirror images of the input
    (each mapped back), the same dihedral group the training crops are drawn from, so every view is
    one the network has learned; it costs eight passes.
    """
    import warnings

    from monai.inferers import sliding_window_inference

    from medsight.engine.tta import average_over_views, dihedral_views

    device = next(model.parameters()).device
    tokens = mask = None
    if text is not None and text.has_text:
        tokens = torch.from_numpy(text.tokens)[None].to(device)
        mask = torch.from_numpy(text.mask)[None].to(device)

    def predictor(window):
        n = window.shape[0]
        if tokens is None:
            return forward(model, window)
        return forward(model, window, tokens.expand(n, -1, -1), mask.expand(n, -1))

    if is_grounded(model):
        image = np.concatenate([image, positions(image.shape)])

    def one_view(view: np.ndarray) -> np.ndarray:
        logits = sliding_window_inference(
            torch.from_numpy(view.astype(np.float32))[None],
            (roi, roi),
            batch,
            predictor,
            overlap=0.25,
            mode="gaussian",
            sw_device=device,
            device="cpu",
        )
        return torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].numpy()

    training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # MONAI 1.5 indexes with a list internally, which torch 2.x deprecates: nothing to act on
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
            return average_over_views(one_view, image, dihedral_views() if tta else dihedral_views()[:1])
    finally:
        model.train(training)
