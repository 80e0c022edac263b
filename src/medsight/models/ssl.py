"""Networks for self-supervised pretraining whose weights transfer into the registry's ``unet2d``.

``PretextUNet`` is the plain ``unet2d`` (same builder, same arguments, so the same parameter names)
whose last layer outputs ``head_features`` channels instead of the classes, followed by the pretext
heads: intersection-line heatmaps (1x1 conv to ``n_views`` channels at full resolution), the stack
position (global average pool of the bottleneck -> linear -> sigmoid) and Models-Genesis restoration
(1x1 conv to the input channels). ``transferable_state_dict()`` is every U-Net layer but the last, as
the anatomy-oriented-planes paper transfers; ``load_transferable`` puts it into a fresh segmentation
``unet2d`` and refuses anything that does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medsight.errors import MedsightError
from medsight.models.baselines import unet2d

__all__ = ["PretextUNet", "last_layer_prefix", "load_transferable", "pretext_loss"]


def _monai_unet(model: nn.Module) -> nn.Module:
    """The MONAI UNet inside a registry U-Net (``PadToMultiple(net=UNet)``)."""
    net = getattr(model, "net", None)
    if net is None or not isinstance(getattr(net, "model", None), nn.Sequential):
        raise MedsightError(
            f"{type(model).__name__} is not a registry U-Net (unet2d); cannot transfer into it"
        )
    return net


def last_layer_prefix(model: nn.Module) -> str:
    """State-dict prefix of the U-Net's last layer (the top up-sampling block that outputs the classes)."""
    return f"net.model.{len(_monai_unet(model).model) - 1}."


def _bottleneck(model: nn.Module) -> nn.Module:
    """The deepest block of a MONAI UNet: ``model = (down, SkipConnection(inner), up)`` down to the bottom."""
    node = _monai_unet(model).model
    while True:
        inner = node[1].submodule
        if not isinstance(inner, nn.Sequential):
            return inner
        node = inner


def _keep_pooled(module: nn.Module, inputs, output: torch.Tensor) -> None:
    # stored on the block itself (not on the wrapper) so deep copies of the model keep working
    module.pooled = output.mean(dim=tuple(range(2, output.ndim)))


class PretextUNet(nn.Module):
    """``unet2d`` with pretext heads; ``forward`` returns a dict with the heads it has.

    - ``"heatmap"``: ``(B, n_views, H, W)`` raw values (regress the Gaussian ridges with MSE);
    - ``"position"``: ``(B,)`` in ``(0, 1)``;
    - ``"restoration"``: ``(B, in_channels, H, W)`` raw values.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_views: int = 2,
        position: bool = True,
        restoration: bool = False,
        head_features: int = 16,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 2,
        norm: str = "instance",
        dropout: float = 0.0,
    ):
        super().__init__()
        if n_views < 0 or (n_views == 0 and not position and not restoration):
            raise ValueError("PretextUNet needs at least one head (n_views > 0, position or restoration)")
        self.unet = unet2d(in_channels, head_features, channels, strides, num_res_units, norm, dropout)
        self.act = nn.PReLU()
        self.heatmap = nn.Conv2d(head_features, n_views, 1) if n_views else None
        self.restoration = nn.Conv2d(head_features, in_channels, 1) if restoration else None
        self.position = nn.Linear(int(channels[-1]), 1) if position else None
        if self.position is not None:
            _bottleneck(self.unet).register_forward_hook(_keep_pooled)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.act(self.unet(x))
        out: dict[str, torch.Tensor] = {}
        if self.heatmap is not None:
            out["heatmap"] = self.heatmap(features)
        if self.restoration is not None:
            out["restoration"] = self.restoration(features)
        if self.position is not None:
            bottom = _bottleneck(self.unet)
            out["position"] = torch.sigmoid(self.position(bottom.pooled)).squeeze(-1)
            bottom.pooled = None
        return out

    def transferable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every U-Net parameter but the last layer's, named as in a plain ``unet2d``."""
        skip = last_layer_prefix(self.unet)
        return {k: v.detach().clone() for k, v in self.unet.state_dict().items() if not k.startswith(skip)}


def load_transferable(seg_model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load pretrained U-Net weights into ``seg_model`` (a registry ``unet2d``): ``(loaded, skipped)``.

    Every entry of ``state`` must exist in ``seg_model`` with the same shape, and everything it leaves
    out must belong to the last layer; otherwise nothing is loaded and a ``MedsightError`` says why.
    """
    target = seg_model.state_dict()
    skip = last_layer_prefix(seg_model)
    if not state:
        raise MedsightError("the pretrained weights are empty")
    unknown = sorted(k for k in state if k not in target)
    if unknown:
        raise MedsightError(
            f"pretrained weights do not fit this network: {len(unknown)} unknown layer(s), e.g. {unknown[0]}"
        )
    wrong = [k for k in state if tuple(state[k].shape) != tuple(target[k].shape)]
    if wrong:
        k = wrong[0]
        raise MedsightError(
            f"pretrained weights do not fit this network: {len(wrong)} shape mismatch(es), e.g. {k} "
            f"{tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        )
    skipped = sorted(k for k in target if k not in state)
    inner = [k for k in skipped if not k.startswith(skip)]
    if inner:
        raise MedsightError(
            f"pretrained weights do not fit this network: {len(inner)} layer(s) besides the last are "
            f"missing, e.g. {inner[0]}"
        )
    seg_model.load_state_dict({**target, **state})
    return sorted(state), skipped


def pretext_loss(
    out: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    weights: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the MSE of every head that has a target (the paper: heatmap and position, 1 and 1).

    ``targets`` uses the head names: ``"heatmap"`` ``(B, n_views, H, W)``, ``"position"`` ``(B,)``,
    ``"restoration"`` (the uncorrupted image). Returns the total and each term as a float for logging.
    """
    weights = {"heatmap": 1.0, "position": 1.0, "restoration": 1.0, **(weights or {})}
    heads = [name for name in ("heatmap", "position", "restoration") if name in out and name in targets]
    if not heads:
        raise ValueError(f"no pretext head has a target: outputs {sorted(out)}, targets {sorted(targets)}")
    terms = {name: nn.functional.mse_loss(out[name], targets[name].to(out[name].dtype)) for name in heads}
    total = sum(weights[name] * term for name, term in terms.items())
    return total, {name: float(term.detach()) for name, term in terms.items()}
