"""Degradation models for super-resolution, checked against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medsight.errors import MedsightError
from medsight.scan import Scan
from medsight.transforms.degrade import (
    DegradeParams,
    RandomDegrade,
    crop_to_multiple,
    degrade,
    from_planes,
    make_pair,
    to_planes,
    upsample_geometry,
)


def _affine(spacing=(0.5, 0.75, 2.0), origin=(10.0, -20.0, 30.0)):
    return Scan.affine_from_spacing(spacing, origin)


def test_box_slab_average_of_a_ramp_is_the_slab_centre():
    # value = slice index k along z; a box slab of 4 slices averages 4i..4i+3 -> 4i + 1.5
    z = np.arange(16, dtype=float)
    vol = np.broadcast_to(z, (3, 4, 16)).copy()
    lr = degrade(Scan.from_spatial(vol, _affine()), DegradeParams("thick", 4, "box"))
    assert lr.spatial_shape == (3, 4, 4)
    np.testing.assert_allclose(lr.array[0, 1, 2], [1.5, 5.5, 9.5, 13.5], atol=1e-6)


def test_triangular_slab_of_ramp_interior_and_border():
    # k=2 triangle weights 1 - |d|/2 at offsets d = -1.5, -0.5, 0.5, 1.5 around centre 2i + 0.5 ->
    # 0.25, 0.75, 0.75, 0.25 (sum 2). Slab 1 (slices 1..4): (0.25*1 + 0.75*2 + 0.75*3 + 0.25*4)/2 = 2.5.
    # Slab 0 has no slice -1: (0.75*0 + 0.75*1 + 0.25*2)/1.75 = 1.25/1.75.
    vol = np.broadcast_to(np.arange(8, dtype=float), (2, 2, 8)).copy()
    lr = degrade(Scan.from_spatial(vol), DegradeParams("thick", 2, "triangular"))
    np.testing.assert_allclose(lr.array[0, 0, 0, :2], [1.25 / 1.75, 2.5], atol=1e-6)


def test_low_resolution_affine_by_hand():
    hr = Scan.from_spatial(np.zeros((4, 6, 12)), _affine())
    lr = degrade(hr, DegradeParams("thick", 3, "box"))
    # z spacing 2 mm -> 6 mm; origin z: 30 + (3-1)/2 * 2 = 32; x, y untouched
    expected = np.diag([0.5, 0.75, 6.0, 1.0])
    expected[:3, 3] = [10.0, -20.0, 32.0]
    np.testing.assert_allclose(lr.affine, expected)
    lr2 = degrade(hr, DegradeParams("inplane", 2, "box"))
    expected = np.diag([1.0, 1.5, 2.0, 1.0])
    expected[:3, 3] = [10.25, -19.625, 30.0]  # + 0.5 * 0.5 and + 0.5 * 0.75
    np.testing.assert_allclose(lr2.affine, expected)
    np.testing.assert_allclose(upsample_geometry(lr.affine, 3, (2,)), hr.affine)
    np.testing.assert_allclose(upsample_geometry(lr2.affine, 2, (0, 1)), hr.affine)


def test_lr_voxel_sits_at_the_mean_world_position_of_its_block_oblique_affine():
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    hr = Scan.from_spatial(np.zeros((8, 8, 8)), Scan.affine_from_spacing((1.0, 2.0, 3.0), (5, 6, 7), rot))
    lr = degrade(hr, DegradeParams("thick", 4, "box", slice_axis=1))
    block = hr.voxel_to_world([[2, j, 5] for j in range(4, 8)]).mean(axis=0)
    np.testing.assert_allclose(lr.voxel_to_world([2, 1, 5]), block)


def test_kspace_truncation_of_a_low_frequency_cosine_is_exact():
    n, k, m = 32, 4, 3  # 3 cycles per 32 voxels, below the new Nyquist of 4 cycles
    j = np.arange(n)
    img = np.cos(2 * np.pi * m * j[:, None] / n) * np.cos(2 * np.pi * 2 * j[None, :] / n) + 5.0
    lr = degrade(Scan.from_spatial(img), DegradeParams("inplane", k, "kspace"))
    c = np.arange(n // k) * k + (k - 1) / 2  # LR samples at block centres
    expected = np.cos(2 * np.pi * m * c[:, None] / n) * np.cos(2 * np.pi * 2 * c[None, :] / n) + 5.0
    np.testing.assert_allclose(lr.array[0], expected, atol=1e-5)


@pytest.mark.parametrize("profile", ["gaussian", "box", "kspace"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_constant_stays_constant(profile, scale):
    img = np.full((2, 12, 24), 7.25)  # RGB-like 2-channel 2D picture
    lr = degrade(Scan(img), DegradeParams("inplane", scale, profile))
    assert lr.array.shape == (2, 12 // scale, 24 // scale)
    np.testing.assert_allclose(lr.array, 7.25, atol=1e-5)


def test_gaussian_sigma_is_fwhm_of_one_lr_voxel():
    # one bright HR row (7, the centre of block 2 at scale 3), constant along axis 1: LR voxel i gets the
    # weight exp(-d^2 / (2 s^2)) / norm with d = 7 - (3i + 1), s = 3 / 2.3548, and norm the sum of the
    # Gaussian over the integer offsets -5..5 inside its 4-sigma support (5.1 HR voxels).
    x = np.zeros((30, 3))
    x[7] = 1.0
    lr = degrade(Scan.from_spatial(x), DegradeParams("inplane", 3, "gaussian"))
    s = 3 / (2 * math.sqrt(2 * math.log(2)))
    norm = sum(math.exp(-0.5 * (d / s) ** 2) for d in range(-5, 6))
    col = lr.array[0, :, 0]
    np.testing.assert_allclose(col[2], 1.0 / norm, rtol=1e-6)
    # block 1 is centred on HR 4: its offset -5 (HR -1) does not exist, so it drops out of the norm
    norm1 = norm - math.exp(-0.5 * (5 / s) ** 2)
    np.testing.assert_allclose(col[1], math.exp(-0.5 * (3 / s) ** 2) / norm1, rtol=1e-6)
    np.testing.assert_allclose(col[4:], 0.0, atol=1e-12)  # offsets 6 and more are outside the support


def test_random_degrade_is_seeded():
    t = RandomDegrade("inplane", scales=(2, 3, 4), profiles=("gaussian", "kspace"), fwhm_jitter=0.2)
    a = [t.sample(np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    params = [t.sample(np.random.default_rng(s)) for s in range(20)]
    assert {p.scale for p in params} == {2, 3, 4}
    assert all(0.8 <= p.fwhm <= 1.2 for p in params)
    img = Scan.from_spatial(np.random.default_rng(0).random((24, 24)))
    np.testing.assert_array_equal(
        t(img, np.random.default_rng(5)).array, degrade(img, t.sample(np.random.default_rng(5))).array
    )


def test_crop_to_multiple_keeps_affine():
    scan = Scan.from_spatial(np.zeros((10, 11, 7)), _affine())
    out = crop_to_multiple(scan, 4, (0, 1))
    assert out.spatial_shape == (8, 8, 7)
    np.testing.assert_array_equal(out.affine, scan.affine)


@pytest.mark.parametrize(
    ("shape", "params", "needle"),
    [
        ((10, 12), DegradeParams("inplane", 4, "gaussian"), "does not divide"),
        ((12, 12), DegradeParams("inplane", 5, "gaussian"), "scale must be one of"),
        ((12, 12), DegradeParams("thick", 2, "box"), "needs a 3D scan"),
        ((4, 4, 8), DegradeParams("thick", 2, "kspace"), "profile must be one of"),
        ((4, 4, 8), DegradeParams("sideways", 2, "box"), "unknown degradation mode"),
    ],
)
def test_bad_input_is_one_clear_line(shape, params, needle):
    with pytest.raises(MedsightError, match=needle) as err:
        degrade(Scan.from_spatial(np.zeros(shape)), params)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["inplane", "thick"])
@pytest.mark.parametrize("slice_axis", [0, 1, -1])
def test_planes_round_trip(mode, slice_axis):
    vol = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    planes = to_planes(vol, mode, slice_axis)
    s = slice_axis % 3
    first, second = (a for a in range(3) if a != s)
    if mode == "inplane":  # one image per slice, rows/cols the in-plane axes
        assert planes.shape == (vol.shape[s + 1], 2, vol.shape[first + 1], vol.shape[second + 1])
    else:  # rows are the slice axis
        assert planes.shape == (vol.shape[first + 1], 2, vol.shape[s + 1], vol.shape[second + 1])
    np.testing.assert_array_equal(from_planes(planes, 3, mode, slice_axis), vol)
    pic = np.arange(3 * 6 * 7.0).reshape(3, 6, 7)
    assert to_planes(pic, "inplane").shape == (1, 3, 6, 7)
    np.testing.assert_array_equal(from_planes(to_planes(pic, "inplane"), 2, "inplane"), pic)


def test_thick_plane_rows_follow_the_slice_axis():
    vol = np.zeros((1, 4, 5, 6))
    vol[0, :, :, 2] = 1.0  # slice z = 2
    planes = to_planes(vol, "thick", -1)  # rows are z
    assert planes.shape == (4, 1, 6, 5)
    np.testing.assert_array_equal(planes[:, 0, 2], 1.0)
    assert planes.sum() == 20


def test_make_pair_crops_then_degrades():
    scan = Scan.from_spatial(np.ones((9, 10, 11)), _affine())
    lr, hr = make_pair(scan, DegradeParams("thick", 4, "box"))
    assert hr.spatial_shape == (9, 10, 8) and lr.spatial_shape == (9, 10, 2)
    np.testing.assert_array_equal(hr.affine, scan.affine)
    with pytest.raises(MedsightError, match="smaller than the scale"):
        make_pair(Scan.from_spatial(np.ones((9, 10, 3))), DegradeParams("thick", 4, "box"))


def test_in_dtype_of_rounds_and_clips_integers_and_keeps_floats_as_float32():
    from medsight.transforms.degrade import in_dtype_of

    out = in_dtype_of(np.array([-3.2, 0.4, 0.6, 254.5, 300.0]), np.uint8)
    assert out.dtype == np.uint8 and out.tolist() == [0, 0, 1, 254, 255]  # rint: 254.5 -> 254 (to even)
    floats = in_dtype_of(np.array([0.25, 1.5]), np.float64)
    assert floats.dtype == np.float32 and floats.tolist() == [0.25, 1.5]
