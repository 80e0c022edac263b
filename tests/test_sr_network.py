"""The super-resolution network: shapes, geometry of the upsampler, the semantic branch, bad options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsight.errors import MedsightError
from medsight.models.sr import build_sr_network
from medsight.scan import Scan
from medsight.transforms.degrade import DegradeParams, degrade


def _params(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(("channels", "scale"), [(1, 2), (1, 3), (3, 4)])
def test_inplane_shapes(channels, scale):
    net = build_sr_network(channels, scale, "inplane", "plain", features=16, blocks=2)
    assert net(torch.randn(2, channels, 10, 7)).shape == (2, channels, 10 * scale, 7 * scale)


def test_thick_upsamples_only_the_first_axis_in_sub_pixel_order():
    net = build_sr_network(1, 4, "thick", "plain", features=16, blocks=1)
    with torch.no_grad():  # the correction is then exactly the bias: sub-pixel s of every row holds s
        net.upsample.weight.zero_()
        net.upsample.bias.copy_(torch.arange(4.0))
    x = torch.zeros(1, 1, 5, 9)
    y = net(x)
    assert y.shape == (1, 1, 20, 9)
    np.testing.assert_allclose(y[0, 0, :, 3].detach().numpy(), np.tile([0.0, 1.0, 2.0, 3.0], 5))


@pytest.mark.parametrize("mode", ["inplane", "thick"])
def test_residual_interpolation_inverts_the_degradation_geometry_on_a_ramp(mode):
    # LR voxels are block centres; bilinear (align_corners=False) reproduces linear functions, so an
    # untrained correction-free network maps the degraded ramp back onto the HR ramp (away from borders).
    ramp = np.add.outer(np.arange(24.0), 0.5 * np.arange(24.0))
    if mode == "inplane":
        lr = degrade(Scan.from_spatial(ramp), DegradeParams("inplane", 2, "box")).array
    else:  # thick: the first image axis is the slice axis; the second stays
        # volume (2, 24, 24) with vol[x, y, z] = ramp[z, y]; the image (z, y) of one x is the ramp again
        vol = np.repeat(ramp[:, None, :], 2, axis=1).transpose(1, 2, 0)
        lr = degrade(Scan.from_spatial(vol), DegradeParams("thick", 2, "box")).array[:, 0].transpose(0, 2, 1)
    net = build_sr_network(1, 2, mode, "plain", features=8, blocks=1, interpolation="bilinear")
    with torch.no_grad():
        net.upsample.weight.zero_()
    y = net(torch.from_numpy(lr[None]).float())[0, 0].detach().numpy()
    np.testing.assert_allclose(y[3:-3, 3:-3], ramp[3:-3, 3:-3], atol=1e-4)


def test_semantic_branch_starts_as_the_plain_network_and_then_uses_the_map():
    torch.manual_seed(0)
    sem = build_sr_network(1, 2, "inplane", "semantic", features=16, blocks=3, semantic_channels=8).eval()
    plain = build_sr_network(1, 2, "inplane", "plain", features=16, blocks=3).eval()
    plain.load_state_dict({k: v for k, v in sem.state_dict().items() if not k.startswith("semantic.")})
    x, s = torch.randn(2, 1, 12, 12), torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(sem(x, s), plain(x))
    with torch.no_grad():
        for conv in sem.semantic.modulate:
            conv.weight.normal_(0, 0.1)
    out = sem(x, s)
    assert not torch.allclose(out, plain(x))
    assert not torch.allclose(out, sem(x, torch.randn(2, 8, 3, 3)))
    s.requires_grad_(True)
    sem(x, s).square().mean().backward()
    assert s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="semantic map"):
        sem(x)
    rebuilt = build_sr_network(**sem.config)
    rebuilt.load_state_dict(sem.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x, s), sem(x, s))


def test_parameter_budget_for_one_channel():
    plain = _params(build_sr_network(1, 2, "inplane", "plain"))
    semantic = _params(build_sr_network(1, 2, "inplane", "semantic"))
    assert 300_000 <= plain < semantic <= 700_000


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"scale": 5}, "inplane scale must be one of"),
        ({"mode": "sideways"}, "unknown super-resolution mode"),
        ({"method": "magic"}, "unknown super-resolution method"),
        ({"in_channels": 2}, "1 or 3 channels"),
        ({"blocks": 2, "fuse_at": (0, 2)}, "fuse_at indices"),
    ],
)
def test_bad_options_are_one_clear_line(kwargs, needle):
    with pytest.raises(MedsightError, match=needle):
        build_sr_network(**kwargs)


def test_semantic_sr_wrapper_frozen_and_fine_tuned_encoder():
    from medsight.models.caption import CaptionEncoder
    from medsight.models.sr import SemanticSR

    torch.manual_seed(0)
    sr = build_sr_network(1, 2, "inplane", "semantic", features=8, blocks=2, semantic_channels=16)
    with torch.no_grad():
        for conv in sr.semantic.modulate:
            conv.weight.normal_(0, 0.1)
    encoder = CaptionEncoder(1, width=8, feature_channels=16)
    x = torch.randn(2, 1, 12, 12)
    frozen = SemanticSR(sr, encoder, freeze_encoder=True)
    torch.testing.assert_close(frozen(x), sr(x, encoder(sr.interpolate(x))))
    frozen(x).mean().backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert sr.head.weight.grad is not None
    tuned = SemanticSR(sr, CaptionEncoder(1, width=8, feature_channels=16), freeze_encoder=False)
    tuned(x).square().mean().backward()
    assert all(p.grad is not None for p in tuned.encoder.parameters())
    plain = build_sr_network(1, 2, "inplane", "plain", features=8, blocks=2)
    assert SemanticSR(plain, encoder).encoder is None
    with pytest.raises(ValueError, match="caption encoder"):
        SemanticSR(sr, None)


def _ellipses(rng, n=48):
    yy, xx = np.mgrid[:n, :n]
    img = np.zeros((n, n))
    for _ in range(4):
        cy, cx, ry, rx = rng.uniform(8, n - 8, 2).tolist() + rng.uniform(3, 12, 2).tolist()
        img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = rng.uniform(0.3, 1.0)
    return img


@pytest.mark.slow
def test_plain_network_learns_to_beat_bicubic_on_phantoms(single_thread):
    # sharp-edged ellipses degraded x2 (gaussian PSF): a few hundred Adam steps of L1 must beat the
    # bicubic baseline on held-out phantoms by a clear margin (about +4 dB after 500 steps when written).
    rng = np.random.default_rng(0)

    def pairs(k):
        hr = [_ellipses(rng) for _ in range(k)]
        lr = [degrade(Scan.from_spatial(h), DegradeParams("inplane", 2, "gaussian")).array for h in hr]
        return torch.tensor(np.stack(lr)).float(), torch.tensor(np.stack(hr))[:, None].float()

    (x_train, y_train), (x_test, y_test) = pairs(64), pairs(16)
    torch.manual_seed(0)
    net = build_sr_network(1, 2, "inplane", "plain", features=16, blocks=2)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in range(500):
        idx = torch.randint(0, 64, (8,))
        loss = (net(x_train[idx]) - y_train[idx]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        gain = 10 * torch.log10(
            ((net.interpolate(x_test) - y_test) ** 2).mean() / ((net(x_test) - y_test) ** 2).mean()
        )
    assert gain > 2.0


@pytest.mark.parametrize(("mode", "scale"), [("thick", 4), ("inplane", 2)])
def test_structure_keeps_its_world_position_through_degrade_network_and_geometry(mode, scale):
    from medsight.transforms.degrade import from_planes, to_planes, upsample_geometry

    # a smooth blob on an oblique, anisotropic LAS-like grid; the LR scan goes through the network
    # (correction zeroed: bilinear residual only) and back onto the fine grid with upsample_geometry
    i, j, k = np.meshgrid(np.arange(16), np.arange(20), np.arange(24), indexing="ij")
    blob = np.exp(-(((i - 6.3) / 2.5) ** 2 + ((j - 11.0) / 3.0) ** 2 + ((k - 13.6) / 3.5) ** 2))
    directions = np.array([[-1.0, 0.0, 0.0], [0.0, 0.8, -0.6], [0.0, 0.6, 0.8]])
    hr = Scan.from_spatial(blob, Scan.affine_from_spacing((0.9, 1.1, 1.3), (40.0, -12.0, 7.0), directions))
    lr = degrade(hr, DegradeParams(mode, scale, "box"))
    net = build_sr_network(1, scale, mode, "plain", features=8, blocks=1, interpolation="bilinear").eval()
    with torch.no_grad():
        net.upsample.weight.zero_()
        out = net(torch.from_numpy(to_planes(lr.array, mode)).float()).numpy()
    axes = (2,) if mode == "thick" else (0, 1)
    sr = Scan(from_planes(out, 3, mode), upsample_geometry(lr.affine, scale, axes))
    assert sr.spatial_shape == hr.spatial_shape

    def centroid(scan):
        w = np.clip(scan.array[0], 0, None)
        return scan.voxel_to_world((np.argwhere(w >= 0) * w.reshape(-1, 1)).sum(axis=0) / w.sum())

    np.testing.assert_allclose(sr.affine, hr.affine)
    np.testing.assert_allclose(centroid(sr), centroid(hr), atol=0.05)


def test_set_temperature_reaches_every_dynamic_conv():
    from medsight.models.blocks import DynamicConv2d

    net = build_sr_network(1, 2, "inplane", "plain", features=8, blocks=3)
    net.set_temperature(1.5)
    temps = [m.temperature for m in net.modules() if isinstance(m, DynamicConv2d)]
    assert temps == [1.5, 1.5, 1.5]
    with pytest.raises(ValueError):
        net.set_temperature(0.0)
