"""Transforms MONAI lacks: superpixel pseudo-labels and self-supervised few-shot episodes."""

from medsight.transforms.superpixels import Episode, EpisodeSampler, body_mask, superpixels

__all__ = ["Episode", "EpisodeSampler", "body_mask", "superpixels"]
