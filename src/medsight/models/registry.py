"""Segmentation networks by name, so a checkpoint can store ``(name, arguments)`` and rebuild the model.

Each entry knows its builder and the input it takes:

- ``"2d"``: one slice, ``(B, C, H, W)``;
- ``"2.5d"``: a stack of ``slices`` consecutive slices, ``(B, C, slices, H, W)``, predicting the centre;
- ``"3d"``: a volume or patch, ``(B, C, D, H, W)``.

All return logits ``(B, num_classes, *spatial)`` of the predicted slice or volume.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from medsight.errors import MedsightError
from medsight.models.baselines import unet2d, unet3d
from medsight.models.context25d import Context25D
from medsight.models.lvit import lvit

__all__ = [
    "MODELS",
    "InputKind",
    "ModelSpec",
    "UnknownModelError",
    "build_model",
    "build_model_from_config",
    "get_spec",
    "model_config",
]

InputKind = Literal["2d", "2.5d", "3d"]


class UnknownModelError(MedsightError, ValueError):
    """An unknown model name or argument; also a ``ValueError`` for library callers."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build one network and what it reads."""

    name: str
    builder: Callable[..., nn.Module]
    input_kind: InputKind
    description: str

    def argument_names(self) -> list[str]:
        """Keyword arguments the builder accepts besides ``in_channels`` and ``num_classes``."""
        params = inspect.signature(self.builder).parameters
        return [p for p in params if p not in ("in_channels", "num_classes")]

    def slices(self, kwargs: dict[str, Any]) -> int:
        """Slices per input: the stack size for 2.5D networks, 1 for 2D, 0 (the whole volume) for 3D."""
        if self.input_kind == "2.5d":
            default = inspect.signature(self.builder).parameters["slices"].default
            return int(kwargs.get("slices", default))
        return 1 if self.input_kind == "2d" else 0


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("unet2d", unet2d, "2d", "MONAI residual U-Net on single slices"),
        ModelSpec(
            "context25d",
            Context25D,
            "2.5d",
            "context-aware 2.5D network: 3D encoder over a slice stack, ASPP, depthwise-separable decoder",
        ),
        ModelSpec("unet3d", unet3d, "3d", "MONAI residual U-Net on volumes"),
        ModelSpec(
            "lvit",
            lvit,
            "2d",
            "LViT: CNN and ViT branches side by side, text fused into the ViT (`medsight textseg`)",
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; unknown names raise an error listing the valid ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}"
        ) from None


def build_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the network registered as ``name`` (unknown names or arguments raise ``UnknownModelError``)."""
    spec = get_spec(name)
    allowed = spec.argument_names()
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise UnknownModelError(
            f"model {name!r} has no argument(s) {', '.join(unknown)}; it accepts: {', '.join(allowed)}"
        )
    return spec.builder(in_channels=in_channels, num_classes=num_classes, **kwargs)


def model_config(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> dict[str, Any]:
    """The plain-data description a checkpoint stores; ``build_model_from_config`` inverts it."""
    get_spec(name)
    return {
        "name": name,
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "kwargs": dict(kwargs),
    }


def build_model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from ``model_config(...)`` output (e.g. read back from a checkpoint)."""
    missing = {"name", "in_channels", "num_classes"} - set(config)
    if missing:
        raise UnknownModelError(f"model config lacks {', '.join(sorted(missing))}")
    return build_model(
        config["name"], config["in_channels"], config["num_classes"], **dict(config.get("kwargs") or {})
    )
