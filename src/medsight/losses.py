"""Segmentation losses for strongly imbalanced labels (docs/methods.md section 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["WeightedCEDiceLoss", "inverse_frequency_weights", "require_finite_loss"]


def require_finite_loss(loss: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
    """Stop training on a NaN or infinite loss: every later weight would be NaN, and a checkpoint
    saved from them would segment nothing. Raised before the step, so no checkpoint comes from it."""
    if not torch.isfinite(loss.detach()).all():
        from medsight.errors import MedsightError

        raise MedsightError(
            f"training stopped: the loss became {float(loss.detach())} at epoch {epoch + 1}, step "
            f"{step + 1}; no checkpoint was written from it (lower --lr, or check the data with "
            "`medsight data inspect`)"
        )
    return loss


def inverse_frequency_weights(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class weights ``w_c = N / (P * n_c)`` from an integer label map.

    ``n_c`` is the number of voxels of class ``c``, ``N`` the total and ``P`` the number of classes
    present, so a perfectly balanced batch gets all-ones weights. Absent classes get weight 0:
    no voxel is labelled with them, so their cross-entropy weight is never used.
    """
    counts = torch.bincount(target.reshape(-1).long(), minlength=num_classes)[:num_classes].to(torch.float32)
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float32, device=target.device)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


class WeightedCEDiceLoss(nn.Module):
    """``ce_weight * CE_w(logits, y) + dice_weight * (1 - softDice(softmax(logits), onehot(y)))``.

    ``CE_w`` is ``torch.nn.functional.cross_entropy`` with per-class weights (the weighted mean over
    voxels, ``sum_i w_{y_i} (-log p_{i, y_i}) / sum_i w_{y_i}``); the Dice term is MONAI's
    ``DiceLoss(to_onehot_y=True, softmax=True)``.

    Args:
        num_classes: classes including background; logits must have this many channels.
        class_weights: ``None`` (unweighted), a sequence of ``num_classes`` weights, or ``"auto"``
            for inverse-frequency weights recomputed from each target batch.
        ce_weight, dice_weight: the mix of the two terms.
        include_background: whether background takes part in the Dice term. Off by default, as in
            nnU-Net: background Dice is near 1 and would dilute the small structures.
        batch_dice: compute Dice over the whole batch at once rather than per image, so images
            without foreground do not produce noisy 0/0 Dice values.

    Targets are integer label maps ``(B, *spatial)`` or ``(B, 1, *spatial)``, 2D or 3D.
    """

    def __init__(
        self,
        num_classes: int,
        class_weights: Sequence[float] | Literal["auto"] | None = None,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        include_background: bool = False,
        batch_dice: bool = True,
    ):
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(
                f"num_classes must be >= 2 (background plus at least one class), got {num_classes}"
            )
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
            raise ValueError(
                f"ce_weight and dice_weight must be >= 0, not both 0; got {ce_weight}, {dice_weight}"
            )
        self.num_classes = int(num_classes)
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.auto_weights = isinstance(class_weights, str)
        if self.auto_weights and class_weights != "auto":
            raise ValueError(
                f"class_weights must be None, 'auto' or {num_classes} numbers, got {class_weights!r}"
            )
        fixed = None
        if class_weights is not None and not self.auto_weights:
            fixed = torch.as_tensor([float(w) for w in class_weights], dtype=torch.float32)
            if fixed.numel() != self.num_classes or bool((fixed < 0).any()):
                raise ValueError(
                    f"class_weights needs {self.num_classes} non-negative numbers, got {list(class_weights)}"
                )
        # A buffer follows the module across devices and into the state dict.
        self.register_buffer("class_weights", fixed, persistent=False)
        self.dice = DiceLoss(
            include_background=include_background, to_onehot_y=True, softmax=True, batch=batch_dice
        )

    def _label_map(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim < 3 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (B, {self.num_classes}, *spatial), got {tuple(logits.shape)}")
        if target.ndim == logits.ndim and target.shape[1] == 1:
            target = target[:, 0]
        if target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(
                f"target must be (B, *spatial) or (B, 1, *spatial) matching logits {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if target.is_floating_point() and not bool((target == target.round()).all()):
            raise ValueError("target must hold integer class labels, got fractional values")
        target = target.long()
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"target labels must lie in [0, {self.num_classes - 1}], got [{low}, {high}]")
        return target

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cross-entropy and Dice terms and their weighted sum (``"ce"``, ``"dice"``, ``"total"``)."""
        labels = self._label_map(logits, target)
        weight = (
            inverse_frequency_weights(labels, self.num_classes) if self.auto_weights else self.class_weights
        )
        if weight is not None:
            weight = weight.to(device=logits.device, dtype=logits.dtype)
        ce = F.cross_entropy(logits, labels, weight=weight)
        dice = self.dice(logits, labels.unsqueeze(1))
        return {"ce": ce, "dice": dice, "total": self.ce_weight * ce + self.dice_weight * dice}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.terms(logits, target)["total"]
