"""Compatibility names: supervised segmentation now trains through the one loop
(:mod:`medsight.engine.loop`) as :mod:`medsight.tasks.segmentation`; the helpers other trainers
import from here live in the loop. Import from those modules in new code."""

from __future__ import annotations

from medsight.engine.loop import (
    RAN_WITHOUT_OPTION,
    adamw,
    average_decay,
    check_decay,
    check_resumable,
    save_epoch,
    weight_average,
)
from medsight.tasks.segmentation import SegmentationConfig, class_weights, dice_per_class, prepare_data, train

TrainConfig = SegmentationConfig

__all__ = [
    "RAN_WITHOUT_OPTION",
    "SegmentationConfig",
    "TrainConfig",
    "adamw",
    "average_decay",
    "check_decay",
    "check_resumable",
    "class_weights",
    "dice_per_class",
    "prepare_data",
    "save_epoch",
    "train",
    "weight_average",
]
