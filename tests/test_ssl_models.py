"""Pretext network (models/ssl.py): heads, transfer into a registry U-Net; Models-Genesis corruptions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medsight.errors import MedsightError
from medsight.models.registry import build_model
from medsight.models.ssl import PretextUNet, load_transferable, pretext_loss
from medsight.transforms.genesis import genesis_corrupt, inpaint, local_shuffle, nonlinear_intensity, outpaint


def test_pretext_heads_have_the_documented_shapes():
    torch.manual_seed(0)
    net = PretextUNet(in_channels=1, n_views=2, position=True, restoration=True)
    out = net(torch.randn(3, 1, 35, 51))  # hippocampus-like odd size
    assert out["heatmap"].shape == (3, 2, 35, 51)
    assert out["restoration"].shape == (3, 1, 35, 51)
    assert out["position"].shape == (3,) and bool(((out["position"] > 0) & (out["position"] < 1)).all())
    only = PretextUNet(n_views=0, position=True)
    assert set(only(torch.randn(1, 1, 16, 16))) == {"position"}
    # the pooled bottleneck feeds the copy's own head, not the original's
    twin = copy.deepcopy(net)
    assert twin(torch.randn(2, 1, 24, 24))["position"].shape == (2,)
    with pytest.raises(ValueError):
        PretextUNet(n_views=0, position=False)


def test_transfer_loads_every_layer_but_the_last():
    torch.manual_seed(0)
    pretext = PretextUNet(in_channels=1, n_views=2)
    seg = build_model("unet2d", 1, 3)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    loaded, skipped = load_transferable(seg, pretext.transferable_state_dict())
    # MONAI's UNet is Sequential(down, skip, up): the last layer is the top up-block, net.model.2
    assert skipped == sorted(k for k in before if k.startswith("net.model.2."))
    assert loaded == sorted(k for k in before if not k.startswith("net.model.2."))
    after, source = seg.state_dict(), pretext.unet.state_dict()
    for k in loaded:
        assert torch.equal(after[k], source[k])
    for k in skipped:
        assert torch.equal(after[k], before[k])
    # the segmentation network now runs as before
    assert seg(torch.randn(1, 1, 35, 51)).shape == (1, 3, 35, 51)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 2},  # first conv shape differs
        {"channels": (8, 16, 32, 64)},  # widths differ
        {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2)},  # one level deeper: names differ
    ],
)
def test_transfer_refuses_an_incompatible_network_in_one_line(kwargs):
    state = PretextUNet(in_channels=1, n_views=2).transferable_state_dict()
    in_channels = kwargs.pop("in_channels", 1)
    seg = build_model("unet2d", in_channels, 2, **kwargs)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    with pytest.raises(MedsightError) as err:
        load_transferable(seg, state)
    assert "\n" not in str(err.value) and "do not fit" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in seg.state_dict().items())  # nothing half-loaded


def test_transfer_refuses_weights_that_miss_an_inner_layer():
    state = PretextUNet().transferable_state_dict()
    state.pop("net.model.0.conv.unit0.conv.weight")
    with pytest.raises(MedsightError, match="besides the last"):
        load_transferable(build_model("unet2d", 1, 2), state)
    with pytest.raises(MedsightError):
        load_transferable(build_model("unet3d", 1, 2), PretextUNet().transferable_state_dict())


@pytest.mark.slow
def test_a_few_steps_lower_the_heatmap_and_position_loss():
    torch.manual_seed(0)
    net = PretextUNet(n_views=1, position=True, channels=(8, 16, 32), strides=(2, 2))
    x = torch.randn(4, 1, 32, 32)
    rows = torch.arange(32.0)[None, :, None].expand(4, 32, 32)
    heat = torch.exp(-((rows - torch.tensor([8.0, 12, 20, 24])[:, None, None]) ** 2) / 8)[:, None]
    pos = torch.tensor([0.0, 0.3, 0.6, 1.0])
    opt = torch.optim.Adam(net.parameters(), 1e-2)

    def loss():
        out = net(x)
        return torch.nn.functional.mse_loss(out["heatmap"], heat) + torch.nn.functional.mse_loss(
            out["position"], pos
        )

    first = loss().item()
    for _ in range(30):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert loss().item() < 0.5 * first


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (1, 40, 30)).astype(np.float32)


def test_genesis_corruptions_are_seeded_and_keep_the_shape():
    image = _image()
    a = genesis_corrupt(image, np.random.default_rng(5))
    b = genesis_corrupt(image, np.random.default_rng(5))
    assert a.shape == image.shape and a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, image)
    with pytest.raises(ValueError):
        genesis_corrupt(image[0], np.random.default_rng(0))


def test_nonlinear_intensity_is_monotonic():
    image = _image()
    for seed in range(6):
        out = nonlinear_intensity(image, np.random.default_rng(seed))
        order = np.argsort(image.ravel())
        steps = np.diff(out.ravel()[order])
        assert (steps >= -1e-6).all() or (steps <= 1e-6).all()
        assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6


def test_local_shuffle_only_moves_pixels_within_small_windows():
    image = _image()
    out = local_shuffle(image, np.random.default_rng(0), n_blocks=20)
    assert np.array_equal(np.sort(out.ravel()), np.sort(image.ravel())) and not np.array_equal(out, image)
    # windows are at most 4 x 3 pixels (10 % of 40 x 30): no pixel travels further than that
    moved = np.argwhere(out[0] != image[0])
    for r, c in moved[:50]:
        window = image[0, max(0, r - 12) : r + 13, max(0, c - 12) : c + 13]
        assert out[0, r, c] in window


def test_outpaint_keeps_one_box_and_inpaint_most_of_the_image():
    image = _image()
    out = outpaint(image, np.random.default_rng(1))
    kept = np.argwhere(out[0] == image[0])
    (r0, c0), (r1, c1) = kept.min(axis=0), kept.max(axis=0)
    assert r1 - r0 + 1 >= 20 and c1 - c0 + 1 >= 15  # at least half of each side
    assert (out[0, r0 : r1 + 1, c0 : c1 + 1] == image[0, r0 : r1 + 1, c0 : c1 + 1]).all()
    painted = inpaint(image, np.random.default_rng(1))
    changed = (painted != image).mean()
    assert 0 < changed < 0.6


def test_pretext_loss_weights_the_mse_of_each_head_with_a_target():
    out = {"heatmap": torch.zeros(2, 2, 4, 4), "position": torch.tensor([0.5, 0.5])}
    targets = {"heatmap": torch.full((2, 2, 4, 4), 0.5), "position": torch.tensor([0.0, 1.0])}
    total, parts = pretext_loss(out, targets)
    assert np.isclose(parts["heatmap"], 0.25) and np.isclose(parts["position"], 0.25)
    assert np.isclose(float(total), 0.5)
    total, _ = pretext_loss(out, targets, {"position": 2.0})
    assert np.isclose(float(total), 0.75)
    only, parts = pretext_loss(out, {"position": targets["position"]})  # heads without a target are skipped
    assert set(parts) == {"position"} and np.isclose(float(only), 0.25)
    with pytest.raises(ValueError):
        pretext_loss(out, {"restoration": torch.zeros(1)})
