"""Networks: shapes, slice-axis collapse, argument checks, block structure, parameters and FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsight.errors import MedsightError
from medsight.models import (
    ASPP,
    MODELS,
    Context25D,
    DepthwiseSeparableConv2d,
    SqueezeExcite,
    UnknownModelError,
    build_model,
    build_model_from_config,
    count_parameters,
    flops,
    flops_per_volume,
    model_config,
    pad_to_multiple,
)
from medsight.models.context25d import slice_reduction_schedule

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


# ---------------------------------------------------------------- Context25D


@pytest.mark.parametrize("slices", [1, 3, 5, 7])
@pytest.mark.parametrize(("height", "width"), [(35, 51), (32, 32), (17, 9)])
def test_context25d_output_is_centre_slice_logits(slices, height, width):
    model = Context25D(in_channels=2, num_classes=3, slices=slices)
    out = model(torch.randn(2, 2, slices, height, width))
    assert out.shape == (2, 3, height, width)


def test_context25d_bigger_stack_and_more_levels():
    model = Context25D(in_channels=1, num_classes=4, slices=9, features=(8, 16, 32, 64, 64))
    assert model(torch.randn(1, 1, 9, 40, 33)).shape == (1, 4, 40, 33)


@pytest.mark.parametrize(
    ("slices", "levels", "expected"),
    [(1, 3, [0, 0, 0]), (3, 3, [1, 0, 0]), (5, 3, [1, 1, 0]), (7, 3, [1, 1, 1]), (9, 3, [2, 1, 1])],
)
def test_slice_reduction_schedule(slices, levels, expected):
    assert slice_reduction_schedule(slices, levels) == expected


@pytest.mark.parametrize("slices", [3, 5, 7])
def test_context25d_slice_axis_is_gone_before_the_bottleneck(slices):
    model = Context25D(num_classes=2, slices=slices)
    depths = []
    hooks = [
        block.register_forward_hook(lambda m, i, o: depths.append(o.shape[2])) for block in model.encoder
    ]
    model(torch.randn(1, 1, slices, 24, 24))
    for hook in hooks:
        hook.remove()
    # Each level removes 2r slices (r from the schedule); the last encoder level has one slice.
    expected, depth = [], slices
    for reduce in slice_reduction_schedule(slices, 3):
        depth -= 2 * reduce
        expected.append(depth)
    assert depths == expected
    assert depths[-1] == 1


def test_context25d_reads_every_slice_of_the_stack():
    model = Context25D(num_classes=2, slices=5).eval()
    stack = torch.randn(1, 1, 5, 20, 20, requires_grad=True)
    model(stack)[0, 1].sum().backward()
    per_slice = stack.grad.abs().sum(dim=(0, 1, 3, 4))
    assert bool((per_slice > 0).all()), per_slice


@pytest.mark.parametrize(
    "kwargs",
    [
        {"slices": 4},
        {"slices": 0},
        {"slices": -3},
        {"num_classes": 1},
        {"in_channels": 0},
        {"features": (16,)},
        {"aspp_rates": ()},
        {"aspp_rates": (0, 2)},
    ],
)
def test_context25d_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Context25D(**{"num_classes": 2, **kwargs})


def test_context25d_error_messages_name_the_problem():
    with pytest.raises(ValueError, match="odd"):
        Context25D(num_classes=2, slices=4)
    with pytest.raises(ValueError, match="num_classes"):
        Context25D(num_classes=1)


def test_context25d_rejects_wrong_input_shape():
    model = Context25D(in_channels=1, num_classes=2, slices=5)
    with pytest.raises(ValueError, match=r"\(B, 1, 5, H, W\)"):
        model(torch.randn(1, 1, 3, 16, 16))
    with pytest.raises(ValueError):
        model(torch.randn(1, 5, 16, 16))


def test_context25d_is_light():
    assert count_parameters(Context25D(num_classes=3)) < 1_000_000


def test_context25d_residual_variant_runs_and_grows():
    plain, residual = Context25D(num_classes=3), Context25D(num_classes=3, residual=True)
    assert residual(torch.randn(1, 1, 5, 19, 23)).shape == (1, 3, 19, 23)
    assert count_parameters(residual) > count_parameters(plain)


def test_context25d_overfits_one_tiny_batch():
    from medsight.losses import WeightedCEDiceLoss

    torch.manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(20.0), indexing="ij")
    images, labels = [], []
    for cy, cx, radius in [(8, 8, 5), (14, 11, 6), (12, 6, 4), (16, 14, 5)]:
        disk = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).float()
        # A disk that shrinks away from the centre slice, plus noise.
        stack = torch.stack([disk * (1 - 0.2 * abs(s - 2)) for s in range(5)]) + 0.1 * torch.randn(5, 24, 20)
        images.append(stack.unsqueeze(0))
        labels.append(disk.long())
    x, y = torch.stack(images), torch.stack(labels)
    model = Context25D(num_classes=2, slices=5, features=(8, 16, 32, 64))
    loss_fn = WeightedCEDiceLoss(2, class_weights="auto")
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = loss_fn(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- baselines and registry


def test_unet2d_any_size():
    model = build_model("unet2d", 2, 3)
    assert model(torch.randn(1, 2, 35, 51)).shape == (1, 3, 35, 51)


def test_unet3d_any_size():
    model = build_model("unet3d", 1, 3, channels=(4, 8, 16), strides=(2, 2))
    assert model(torch.randn(1, 1, 11, 17, 9)).shape == (1, 3, 11, 17, 9)


def test_baselines_validate_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("unet3d", 1, 1)
    with pytest.raises(ValueError, match="stride"):
        build_model("unet2d", 1, 2, channels=(8, 16, 32), strides=(2,))


def test_registry_entries_and_input_kinds():
    assert {name: spec.input_kind for name, spec in MODELS.items()} == {
        "unet2d": "2d",
        "context25d": "2.5d",
        "unet3d": "3d",
        "lvit": "2d",
    }
    assert MODELS["context25d"].slices({"slices": 7}) == 7
    assert MODELS["context25d"].slices({}) == 5


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModelError, match="context25d, lvit, unet2d, unet3d") as info:
        build_model("vnet", 1, 2)
    assert isinstance(info.value, MedsightError) and isinstance(info.value, ValueError)


def test_unknown_argument_is_named():
    with pytest.raises(UnknownModelError, match="slicez"):
        build_model("context25d", 1, 2, slicez=5)


def test_model_rebuilds_from_config_with_same_outputs():
    config = model_config("context25d", 1, 3, slices=3, features=[8, 16, 32])
    original = build_model_from_config(config).eval()
    rebuilt = build_model_from_config(dict(config))
    rebuilt.load_state_dict(original.state_dict())
    rebuilt.eval()
    x = torch.randn(1, 1, 3, 21, 13)
    torch.testing.assert_close(rebuilt(x), original(x))


# ---------------------------------------------------------------- blocks


def test_aspp_shape_and_dilations():
    aspp = ASPP(8, 12, rates=(1, 2, 5))
    assert aspp(torch.randn(2, 8, 17, 13)).shape == (2, 12, 17, 13)
    convs = [next(m for m in branch.modules() if isinstance(m, nn.Conv2d)) for branch in aspp.branches]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (3, 3)]
    assert [c.dilation for c in convs] == [(1, 1), (2, 2), (5, 5)]


@pytest.mark.parametrize("separable", [False, True])
def test_aspp_dilated_branch_sees_exactly_rate_pixels_away(separable):
    rate = 4
    aspp = ASPP(1, 2, rates=(rate,), separable=separable)
    conv = next(m for m in aspp.branches[0].modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight.fill_(1.0)
    impulse = torch.zeros(1, 1, 15, 15)
    impulse[0, 0, 7, 7] = 1.0
    response = conv(impulse)[0, 0]
    # A 3x3 kernel with dilation r touches the 9 points (7 + r*i, 7 + r*j), i, j in {-1, 0, 1}.
    expected = torch.zeros(15, 15)
    for dy in (-rate, 0, rate):
        for dx in (-rate, 0, rate):
            expected[7 + dy, 7 + dx] = 1.0
    torch.testing.assert_close(response, expected)


def test_aspp_separable_branches_are_depthwise():
    aspp = ASPP(16, 32, rates=(1, 6), separable=True, branch_ch=8)
    dilated = aspp.branches[1]
    assert isinstance(dilated, DepthwiseSeparableConv2d)
    assert dilated.depthwise.groups == 16 and dilated.depthwise.dilation == (6, 6)
    assert aspp(torch.randn(1, 16, 9, 9)).shape == (1, 32, 9, 9)


def test_depthwise_separable_structure_and_parameters():
    block = DepthwiseSeparableConv2d(8, 16)
    assert block.depthwise.groups == 8
    assert block.depthwise.kernel_size == (3, 3) and block.pointwise.kernel_size == (1, 1)
    # depthwise 8 * 3 * 3 + pointwise 8 * 16 + instance-norm scale and shift 2 * 16 (no conv biases)
    assert count_parameters(block) == 72 + 128 + 32
    assert block(torch.randn(2, 8, 11, 7)).shape == (2, 16, 11, 7)


def test_squeeze_excite_shapes_and_values():
    se = SqueezeExcite(8, reduction=4)
    assert se.fc1.out_features == 2
    x = torch.randn(2, 8, 5, 6)
    assert se(x).shape == x.shape
    assert se(torch.randn(2, 8, 3, 4, 5)).shape == (2, 8, 3, 4, 5)
    with torch.no_grad():
        se.fc2.weight.zero_()
        se.fc2.bias.zero_()
    torch.testing.assert_close(se(x), 0.5 * x)  # sigmoid(0) = 1/2 on every channel
    weights = torch.tensor([[1.0] * 4 + [0.0] * 4, [0.0] * 8])
    out = se(x, weights=weights)
    torch.testing.assert_close(out[0, :4], x[0, :4])
    assert bool((out[0, 4:] == 0).all()) and bool((out[1] == 0).all())


def test_pad_to_multiple_pads_at_the_end_and_crops_back():
    x = torch.randn(1, 2, 35, 51)
    padded, crop = pad_to_multiple(x, 8)
    assert padded.shape == (1, 2, 40, 56)
    torch.testing.assert_close(padded[crop], x)
    assert bool((padded[..., 35:, :] == 0).all()) and bool((padded[..., :, 51:] == 0).all())
    same, _ = pad_to_multiple(torch.randn(1, 1, 16, 8), 8)
    assert same.shape == (1, 1, 16, 8)


# ---------------------------------------------------------------- parameters and FLOPs


def test_count_parameters_by_hand():
    conv = nn.Conv2d(3, 8, 3)  # 8 * 3 * 3 * 3 weights + 8 biases
    assert count_parameters(conv) == 224
    conv.bias.requires_grad_(False)
    assert count_parameters(conv) == 216
    assert count_parameters(conv, trainable_only=False) == 224


def test_flops_of_one_conv_by_hand():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    height, width = 10, 12
    assert flops(conv, (1, 3, height, width)) == 2 * 3 * 8 * 3 * 3 * height * width
    assert flops(conv, (2, 3, height, width)) == 2 * 2 * 3 * 8 * 3 * 3 * height * width


def test_flops_restores_training_mode():
    model = Context25D(num_classes=2)
    model.train()
    flops(model, (1, 1, 5, 16, 16))
    assert model.training


def test_flops_per_volume_counts_one_forward_per_slice_for_2d():
    model = build_model("unet2d", 1, 2, channels=(4, 8), strides=(2,))
    assert flops_per_volume("unet2d", model, (7, 16, 12)) == 7 * flops(model, (1, 1, 16, 12))


def test_summary_gives_one_forward_per_slice_and_the_volume_total():
    from medsight.models.summary import model_summary

    model = build_model("context25d", 1, 3)
    facts = model_summary("context25d", model, (36, 52, 40))  # 36 slices of 52 x 40
    assert facts["gflops_per_slice"] == flops(model, (1, 1, 5, 52, 40)) / 1e9
    assert facts["gflops_per_volume"] == pytest.approx(36 * facts["gflops_per_slice"])


def test_context25d_is_at_least_three_times_cheaper_than_unet3d_per_volume():
    volume = (36, 52, 36)  # a hippocampus crop, slices along the first axis
    context = build_model("context25d", 1, 3)
    unet = build_model("unet3d", 1, 3)
    assert 3 * flops_per_volume("context25d", context, volume) <= flops_per_volume("unet3d", unet, volume)
