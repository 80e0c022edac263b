"""Few-shot segmentation networks: one shared 2D encoder, three ways to use the support set.

- ``prototype`` (PANet, Wang et al. 2019): masked average pooling (MAP) of support features under
  the support mask gives a foreground and a background prototype; each query pixel gets
  ``scale * cos(feature, prototype)`` per class, then softmax. PANet's alignment loss segments the
  support back from the query's own prediction (done by the training task with the same calls).
- ``local-prototype`` (ALPNet, Ouyang et al. 2020): besides the global prototype of each class,
  MAP over a grid of ``window x window`` windows that lie (at least ``threshold``) inside the
  class gives local prototypes; a pixel's class score is ``sum_k softmax_k(s_k) s_k`` over that
  class's prototype similarities ``s_k``, a soft maximum.
- ``conditional`` (Roy et al. 2020): a conditioner arm reads the support features and mask and
  emits channel weights (squeeze-and-excite) that modulate each block of a segmenter arm reading
  the query.

k-shot: prototypes and conditioning weights are averaged over the shots (local prototypes of all
shots are pooled together, their global prototypes averaged). Pure modules: no device calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medsight.models.blocks import SqueezeExcite, conv_norm_act2d

__all__ = [
    "HEADS",
    "FewShotEncoder",
    "FewShotNet",
    "combine_local_similarities",
    "cosine_logits",
    "episode_losses",
    "local_prototypes",
    "masked_average_pooling",
    "shared_heads",
]

HEADS = ("prototype", "local-prototype", "conditional")


def masked_average_pooling(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``(N, F, H, W)`` features and ``(N, H, W)`` (soft) mask -> ``(N, F)``: ``sum(f m) / sum(m)``."""
    mask = mask.unsqueeze(1).to(features.dtype)
    return (features * mask).sum(dim=(2, 3)) / (mask.sum(dim=(2, 3)) + eps)


def cosine_logits(
    features: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """``(N, F, H, W)`` features, ``(N, K, F)`` prototypes -> ``(N, K, H, W)`` = ``scale * cos``."""
    f = F.normalize(features, dim=1, eps=1e-6)
    p = F.normalize(prototypes, dim=2, eps=1e-6)
    return scale * torch.einsum("nfhw,nkf->nkhw", f, p)


def local_prototypes(
    features: torch.Tensor, mask: torch.Tensor, window: int, threshold: float = 0.95
) -> torch.Tensor:
    """Local prototypes of one image: ``(F, H, W)`` features, ``(H, W)`` mask -> ``(M, F)``.

    The image is tiled into ``window x window`` windows (the last partial row/column dropped);
    each window whose mask covers at least ``threshold`` of it gives the mask-weighted mean of its
    features. ``M`` may be 0.
    """
    m = mask.to(features.dtype)[None, None]
    weighted = F.avg_pool2d(features[None] * m, window, stride=window)[0]  # (F, h, w)
    share = F.avg_pool2d(m, window, stride=window)[0, 0]  # (h, w)
    keep = share >= threshold
    return (weighted[:, keep] / share[keep].clamp_min(1e-6)).T


def combine_local_similarities(similarities: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """A soft maximum over prototypes: ``sum_k softmax_k(s) * s_k`` along ``dim``."""
    return (similarities.softmax(dim=dim) * similarities).sum(dim=dim)


class FewShotEncoder(nn.Module):
    """A small CNN, output stride 4: ``(B, C, H, W) -> (B, features, H/4, W/4)``.

    One full-resolution convolution, two strided stages, dilated convolutions (rates 2 and 4) at
    the deepest stage for context, and a linear 1x1 projection (no activation, since the features
    are compared by cosine).
    """

    stride = 4

    def __init__(self, in_channels: int = 1, width: int = 16, features: int = 64):
        super().__init__()
        if in_channels < 1 or width < 1 or features < 1:
            raise ValueError(
                f"in_channels, width and features must be >= 1, got {in_channels}, {width}, {features}"
            )

        def down(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(i, o, 3, stride=2, padding=1, bias=False),
                nn.InstanceNorm2d(o, affine=True),
                nn.LeakyReLU(0.01, inplace=True),
            )

        self.body = nn.Sequential(
            conv_norm_act2d(in_channels, width),
            down(width, 2 * width),
            conv_norm_act2d(2 * width, 2 * width),
            down(2 * width, 4 * width),
            conv_norm_act2d(4 * width, 4 * width, dilation=2),
            conv_norm_act2d(4 * width, 4 * width, dilation=4),
        )
        self.project = nn.Conv2d(4 * width, features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.body(x))


class FewShotNet(nn.Module):
    """Shared encoder plus one few-shot head (``HEADS``).

    Use in two steps: ``cond = net.condition(support_images, support_masks)`` with supports
    ``(B, S, C, H, W)`` and masks ``(B, S, H, W)`` (S shots per episode, averaged), then
    ``net.segment(query, cond)`` with queries ``(Q, C, H, W)`` gives logits ``(Q, 2, H, W)``
    (background, foreground). With ``B == 1`` the conditioning serves any number of queries.
    """

    def __init__(
        self,
        in_channels: int = 1,
        head: str = "prototype",
        width: int = 16,
        features: int = 64,
        scale: float = 20.0,
        window: int = 2,
        threshold: float = 0.95,
        se_blocks: int = 2,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown few-shot head {head!r}; choose one of {', '.join(HEADS)}")
        self.head = head
        self.window = int(window)
        self.threshold = float(threshold)
        self.encoder = FewShotEncoder(in_channels, width, features)
        if head == "conditional":
            self.conditioner = nn.Sequential(
                conv_norm_act2d(features + 1, features), conv_norm_act2d(features, features)
            )
            self.excite = nn.ModuleList(nn.Linear(2 * features, features) for _ in range(se_blocks))
            self.segmenter = nn.ModuleList(conv_norm_act2d(features, features) for _ in range(se_blocks))
            self.se = nn.ModuleList(SqueezeExcite(features) for _ in range(se_blocks))
            self.classifier = nn.Conv2d(features, 2, 1)
        else:
            self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    # -- features ---------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> features ``(N, F, H/4, W/4)``. Masks are area-downsampled to match
        (soft, so a mask of a few pixels still weighs in) and logits upsampled back (as PANet)."""
        return self.encoder(images)

    # -- support -> conditioning ----------------------------------------------------------
    def condition(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> dict:
        b, s = support_images.shape[:2]
        feats = self.embed(support_images.flatten(0, 1))
        return self.condition_from_features(feats, support_masks.flatten(0, 1), b, s)

    def condition_from_features(self, feats: torch.Tensor, masks: torch.Tensor, b: int, s: int) -> dict:
        """Conditioning from embedded supports ``(B*S, F, h, w)`` and masks ``(B*S, H, W)``."""
        masks = masks.to(feats.dtype)
        if masks.shape[-2:] != feats.shape[-2:]:
            masks = F.interpolate(masks[:, None], size=feats.shape[-2:], mode="area")[:, 0]
        if self.head == "prototype":
            fg = masked_average_pooling(feats, masks)
            bg = masked_average_pooling(feats, 1 - masks)
            return {"prototypes": torch.stack([bg, fg], 1).reshape(b, s, 2, -1).mean(1)}
        if self.head == "local-prototype":
            fg_global = masked_average_pooling(feats, masks).reshape(b, s, -1).mean(1)
            bg_global = masked_average_pooling(feats, 1 - masks).reshape(b, s, -1).mean(1)
            sets = []
            for i in range(b):
                shots = range(i * s, (i + 1) * s)
                per_class = []
                for global_proto, weight in ((bg_global[i], 1 - masks), (fg_global[i], masks)):
                    local = [
                        local_prototypes(feats[j], weight[j], self.window, self.threshold) for j in shots
                    ]
                    per_class.append(torch.cat([global_proto[None], *local]))
                sets.append(per_class)
            return {"local": sets}
        x = self.conditioner(torch.cat([feats, masks[:, None]], 1))
        # Mean over the image and over the mask: the second says what the structure looks like.
        pooled = torch.cat([x.mean(dim=(2, 3)), masked_average_pooling(x, masks)], 1)
        weights = [torch.sigmoid(fc(pooled)).reshape(b, s, -1).mean(1) for fc in self.excite]
        return {"se_weights": weights}

    # -- query -> logits -------------------------------------------------------------------
    def segment(self, query: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.segment_features(self.embed(query), cond, query.shape[-2:])

    def segment_features(self, feats: torch.Tensor, cond: dict, size) -> torch.Tensor:
        q = feats.shape[0]
        if self.head == "prototype":
            protos = cond["prototypes"]
            logits = cosine_logits(
                feats, protos.expand(q, -1, -1) if protos.shape[0] == 1 else protos, self.scale
            )
        elif self.head == "local-prototype":
            sets = cond["local"]
            out = []
            for i in range(q):
                per_class = sets[0] if len(sets) == 1 else sets[i]
                scores = [
                    combine_local_similarities(cosine_logits(feats[i : i + 1], p[None], self.scale))
                    for p in per_class
                ]
                out.append(torch.stack(scores, 1))
            logits = torch.cat(out)
        else:
            x = feats
            for block, se, w in zip(self.segmenter, self.se, cond["se_weights"], strict=True):
                x = se(block(x), weights=w.expand(q, -1) if w.shape[0] == 1 else w)
            logits = self.classifier(x)
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def forward(self, support_images: torch.Tensor, support_masks: torch.Tensor, query: torch.Tensor):
        """One-call form: ``(B, S, C, H, W)``, ``(B, S, H, W)``, ``(B, C, H, W)`` -> ``(B, 2, H, W)``."""
        return self.segment(query, self.condition(support_images, support_masks))


def shared_heads(heads, model_kwargs: dict) -> nn.ModuleDict:
    """One :class:`FewShotNet` per head, all holding the same encoder module."""
    nets = nn.ModuleDict({h: FewShotNet(head=h, **model_kwargs) for h in heads})
    for h in heads[1:]:
        nets[h].encoder = nets[heads[0]].encoder
    return nets


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice of the foreground (per episode, averaged)."""
    ce = F.cross_entropy(logits, target)
    p = logits.softmax(1)[:, 1]
    g = (target == 1).to(p.dtype)
    inter = (p * g).sum(dim=(1, 2))
    dice = (2 * inter + 1) / (p.sum(dim=(1, 2)) + g.sum(dim=(1, 2)) + 1)
    return ce + (1 - dice).mean()


def episode_losses(nets, batch, align_weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Training losses of a batch of 1-shot episodes ``(support images, support masks, query
    images, query masks)`` for every head of ``nets`` (head -> FewShotNet, one shared encoder that
    embeds each image once): ``loss`` (summed over heads, alignment weighted), and the heads' mean
    ``segmentation`` and ``alignment`` losses. Alignment (PANet): segment the support back from the
    query's own prediction."""
    s_img, s_mask, q_img, q_mask = batch
    heads = list(nets.keys())
    b, size = s_img.shape[0], q_img.shape[-2:]
    feats = nets[heads[0]].embed(torch.cat([s_img, q_img]))
    s_feats, q_feats = feats[:b], feats[b:]
    zero = feats.new_zeros(())
    loss, seg, align = zero, zero, zero
    for h in heads:
        model = nets[h]
        logits = model.segment_features(q_feats, model.condition_from_features(s_feats, s_mask, b, 1), size)
        head_seg, head_align = segmentation_loss(logits, q_mask), zero
        if align_weights[h] > 0:
            predicted = logits.argmax(1).detach()
            found = predicted.flatten(1).any(1)
            if found.any():
                back_cond = model.condition_from_features(
                    q_feats[found], predicted[found], int(found.sum()), 1
                )
                back = model.segment_features(s_feats[found], back_cond, size)
                head_align = F.cross_entropy(back, s_mask[found].long())
        loss = loss + head_seg + align_weights[h] * head_align
        seg, align = seg + head_seg / len(heads), align + head_align / len(heads)
    return {"loss": loss, "segmentation": seg, "alignment": align}


def episode_dice(nets, batch) -> dict[str, torch.Tensor]:
    """Per head, the Dice of each episode's query prediction (argmax) against its query mask ``(B,)``."""
    s_img, s_mask, q_img, q_mask = batch
    b, size = s_img.shape[0], q_img.shape[-2:]
    feats = next(iter(nets.values())).embed(torch.cat([s_img, q_img]))
    out = {}
    for h, model in nets.items():
        cond = model.condition_from_features(feats[:b], s_mask, b, 1)
        predicted = model.segment_features(feats[b:], cond, size).argmax(1) == 1
        truth = q_mask == 1
        inter = (predicted & truth).flatten(1).sum(1).float()
        total = (predicted.flatten(1).sum(1) + truth.flatten(1).sum(1)).float()
        out[h] = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    return out
