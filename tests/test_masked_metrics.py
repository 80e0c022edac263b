"""Foreground-masked PSNR/SSIM against scikit-image computed here, independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medsight.evaluate import masked_image_metrics


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    ref = rng.random(shape)
    return ref + 0.1 * rng.standard_normal(shape), ref


def _ssim_map(ref, pred, data_range, channel_axis=None):
    return structural_similarity(
        ref,
        pred,
        data_range=data_range,
        channel_axis=channel_axis,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        full=True,
    )


def test_psnr_fg_is_psnr_of_the_masked_voxels():
    pred, ref = _pair((32, 40))
    mask = np.zeros((32, 40), bool)
    mask[8:20, 10:30] = True
    pred[~mask] += 5.0  # errors outside the mask must not count
    out = masked_image_metrics(pred, ref, mask, data_range=2.0)
    assert out["psnr_fg"] == pytest.approx(peak_signal_noise_ratio(ref[mask], pred[mask], data_range=2.0))


def test_ssim_fg_full_mask_equals_scikit_image_and_partial_mask_is_the_map_mean():
    pred, ref = _pair((24, 30, 28), seed=1)
    full = masked_image_metrics(pred, ref, np.ones(ref.shape, bool), data_range=1.0)
    assert full["ssim_fg"] == pytest.approx(_ssim_map(ref, pred, 1.0)[0], rel=1e-12)
    mask = np.zeros(ref.shape, bool)
    mask[6:14, 8:20, 10:16] = True  # well inside the 5-voxel border
    part = masked_image_metrics(pred, ref, mask, data_range=1.0)
    assert part["ssim_fg"] == pytest.approx(_ssim_map(ref, pred, 1.0)[1][mask].mean(), rel=1e-12)


def test_rgb_channel_axis_and_identical_images():
    pred, ref = _pair((3, 20, 20), seed=2)
    mask = np.ones((20, 20), bool)
    out = masked_image_metrics(pred, ref, mask, data_range=1.0, channel_axis=0)
    rp, rr = np.moveaxis(pred, 0, -1), np.moveaxis(ref, 0, -1)
    assert out["ssim_fg"] == pytest.approx(_ssim_map(rr, rp, 1.0, channel_axis=-1)[0], rel=1e-12)
    assert out["psnr_fg"] == pytest.approx(peak_signal_noise_ratio(ref, pred, data_range=1.0))
    assert masked_image_metrics(ref, ref, mask, 1.0, channel_axis=0) == {
        "psnr_fg": math.inf,
        "ssim_fg": pytest.approx(1.0),
    }


def test_bad_masks():
    pred, ref = _pair((20, 20))
    border = np.zeros((20, 20), bool)
    border[0:3] = True
    with pytest.raises(ValueError, match="empty"):
        masked_image_metrics(pred, ref, border, data_range=1.0)
    with pytest.raises(ValueError, match="mask shape"):
        masked_image_metrics(pred, ref, np.ones((20, 21), bool), data_range=1.0)
    with pytest.raises(ValueError, match="data_range"):
        masked_image_metrics(pred, ref, np.ones((20, 20), bool), data_range=0.0)
