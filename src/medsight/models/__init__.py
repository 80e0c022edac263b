"""Segmentation networks as pure, device-agnostic ``nn.Module`` s, built by name from the registry."""

from medsight.models.baselines import PadToMultiple, unet2d, unet3d
from medsight.models.blocks import ASPP, DepthwiseSeparableConv2d, SqueezeExcite, pad_to_multiple
from medsight.models.context25d import Context25D
from medsight.models.registry import (
    MODELS,
    ModelSpec,
    UnknownModelError,
    build_model,
    build_model_from_config,
    get_spec,
    model_config,
)
from medsight.models.summary import count_parameters, flops, flops_per_volume, model_summary

__all__ = [
    "ASPP",
    "MODELS",
    "Context25D",
    "DepthwiseSeparableConv2d",
    "ModelSpec",
    "PadToMultiple",
    "SqueezeExcite",
    "UnknownModelError",
    "build_model",
    "build_model_from_config",
    "count_parameters",
    "flops",
    "flops_per_volume",
    "get_spec",
    "model_config",
    "model_summary",
    "pad_to_multiple",
    "unet2d",
    "unet3d",
]
