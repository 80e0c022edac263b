"""WeightedCEDiceLoss and inverse-frequency weights on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medsight.losses import WeightedCEDiceLoss, inverse_frequency_weights


def perfect_logits(labels: torch.Tensor, num_classes: int, margin: float = 30.0) -> torch.Tensor:
    """Logits whose argmax is ``labels`` with near-certain softmax, channel axis at 1."""
    return margin * F.one_hot(labels, num_classes).movedim(-1, 1).float()


def test_weighted_cross_entropy_on_two_pixels_by_hand():
    # Pixel 1: logits (2, 0), label 0.  Pixel 2: logits (0, 1), label 1.  Class weights (1, 3).
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    loss = WeightedCEDiceLoss(2, class_weights=[1.0, 3.0], dice_weight=0.0)
    ce_pixel1 = -math.log(math.exp(2) / (math.exp(2) + 1))
    ce_pixel2 = -math.log(math.exp(1) / (math.exp(1) + 1))
    expected = (1 * ce_pixel1 + 3 * ce_pixel2) / (1 + 3)
    terms = loss.terms(logits, target)
    assert terms["ce"].item() == pytest.approx(expected, rel=1e-6)
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_unweighted_cross_entropy_is_the_plain_mean():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert WeightedCEDiceLoss(2).terms(logits, target)["ce"].item() == pytest.approx(expected, rel=1e-6)


def test_dice_term_of_uniform_prediction_by_hand():
    # Zero logits: p(foreground) = 1/2 on both pixels; one of the two pixels is foreground.
    # Foreground Dice = 2 * (1/2) / (1 + (1/2 + 1/2)) = 1/2, so the Dice loss is 1/2.
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    dice = WeightedCEDiceLoss(2, ce_weight=0.0).terms(logits, target)["dice"]
    assert dice.item() == pytest.approx(0.5, abs=1e-4)


def test_perfect_prediction_has_near_zero_dice_and_ce():
    labels = torch.tensor([[[0, 1, 2, 2], [0, 0, 1, 2]], [[2, 2, 1, 0], [1, 0, 0, 0]]])
    loss = WeightedCEDiceLoss(3, class_weights="auto")
    terms = loss.terms(perfect_logits(labels, 3), labels)
    assert terms["dice"].item() < 1e-4
    assert terms["ce"].item() < 1e-4


def test_wrong_prediction_costs_more_than_right_one():
    labels = torch.tensor([[[0, 1], [1, 0]]])
    loss = WeightedCEDiceLoss(2)
    assert loss(perfect_logits(1 - labels, 2), labels) > loss(perfect_logits(labels, 2), labels) + 1.0


def test_inverse_frequency_weights_by_hand():
    # Counts (3, 1, 0): N = 4 voxels, 2 classes present -> w0 = 4 / (2 * 3), w1 = 4 / (2 * 1), w2 = 0.
    target = torch.tensor([[0, 0], [0, 1]])
    torch.testing.assert_close(inverse_frequency_weights(target, 3), torch.tensor([2 / 3, 2.0, 0.0]))


def test_auto_weights_match_explicit_weights():
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, :3] = torch.tensor([0, 1, 2])  # every class present
    counts = torch.bincount(target.flatten(), minlength=3).float()
    by_hand = counts.sum() / (3 * counts)
    auto = WeightedCEDiceLoss(3, class_weights="auto")(logits, target)
    explicit = WeightedCEDiceLoss(3, class_weights=by_hand.tolist())(logits, target)
    torch.testing.assert_close(auto, explicit)


def test_mix_weights_scale_the_terms():
    logits = torch.randn(1, 2, 6, 6)
    target = torch.randint(0, 2, (1, 6, 6))
    terms = WeightedCEDiceLoss(2).terms(logits, target)
    mixed = WeightedCEDiceLoss(2, ce_weight=0.3, dice_weight=2.0)(logits, target)
    torch.testing.assert_close(mixed, 0.3 * terms["ce"] + 2.0 * terms["dice"])


@pytest.mark.parametrize("channel_axis", [False, True])
def test_accepts_3d_targets_with_or_without_channel_axis(channel_axis):
    labels = torch.randint(0, 4, (2, 3, 5, 6))
    target = labels.unsqueeze(1) if channel_axis else labels
    loss = WeightedCEDiceLoss(4, class_weights="auto")
    value = loss(torch.randn(2, 4, 3, 5, 6, requires_grad=True), target)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()


def test_gradients_flow_to_logits():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    WeightedCEDiceLoss(3)(logits, torch.randint(0, 3, (1, 4, 4))).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 1},
        {"num_classes": 3, "class_weights": [1.0, 2.0]},
        {"num_classes": 2, "class_weights": [1.0, -1.0]},
        {"num_classes": 2, "class_weights": "median"},
        {"num_classes": 2, "ce_weight": 0.0, "dice_weight": 0.0},
        {"num_classes": 2, "ce_weight": -1.0},
    ],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        WeightedCEDiceLoss(**kwargs)


def test_rejects_mismatched_inputs():
    loss = WeightedCEDiceLoss(3)
    with pytest.raises(ValueError, match="logits"):
        loss(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        loss(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 3))
    with pytest.raises(ValueError, match="target"):
        loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        loss(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 0.5))
