"""Training inputs: augmentation (labels stay labels, image and label move together, stacks move as
one) and class-balanced foreground sampling."""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import Compose

from medsight.engine.augment import Augmenter


def _square_batch(batch: int = 8, size: int = 32):
    y = np.zeros((batch, size, size), np.int64)
    y[:, 8:20, 10:24] = 1
    y[:, 12:16, 14:18] = 2
    return y


def _geometry_only(kind: str, patch) -> Augmenter:
    aug = Augmenter(kind, "spatial", patch)
    aug.spatial.prob = 1.0
    aug.intensity = Compose([])  # isolate the spatial part
    return aug


def test_image_and_label_move_together_and_labels_stay_integer():
    y = _square_batch()
    x = y[:, None].astype(np.float32)  # the image is the label map itself
    xa, ya = _geometry_only("2d", (32, 32))(x, y, np.random.default_rng(0))
    assert xa.shape == x.shape and ya.shape == y.shape
    assert set(np.unique(ya)) <= {0, 1, 2}
    assert not np.array_equal(ya, y)  # prob 1: every sample moved
    # bilinear image vs nearest label: they agree away from the edges of each region
    agree = np.isclose(np.rint(xa[:, 0]), ya)
    assert agree.mean() > 0.95


def test_every_slice_of_a_stack_gets_the_same_transform():
    y = _square_batch(4)
    x = np.repeat(y[:, None, None].astype(np.float32), 5, axis=2)  # (B, C=1, k=5, H, W), identical slices
    xa, _ = _geometry_only("2.5d", (32, 32))(x, y, np.random.default_rng(1))
    assert xa.shape == x.shape
    for k in range(1, 5):
        np.testing.assert_array_equal(xa[:, :, k], xa[:, :, 0])


def test_3d_patches_keep_shape_and_labels():
    y = np.zeros((2, 16, 20, 12), np.int64)
    y[:, 4:12, 5:15, 3:9] = 1
    xa, ya = _geometry_only("3d", (16, 20, 12))(y[:, None].astype(np.float32), y, np.random.default_rng(2))
    assert xa.shape == (2, 1, 16, 20, 12) and ya.shape == y.shape
    assert set(np.unique(ya)) <= {0, 1}
    assert ya.sum() > 0


def test_same_generator_state_gives_the_same_batch():
    y = _square_batch(4)
    x = np.random.default_rng(3).normal(size=(4, 1, 32, 32)).astype(np.float32)
    aug = Augmenter("2d", "spatial", (32, 32))
    first = aug(x, y, np.random.default_rng(7))
    second = aug(x, y, np.random.default_rng(7))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_level_none_is_the_identity_and_unknown_levels_are_refused():
    y = _square_batch(2)
    x = y[:, None].astype(np.float32)
    xa, ya = Augmenter("2d", "none")(x, y, np.random.default_rng(0))
    assert xa is x and ya is y
    with pytest.raises(ValueError, match="augmentation level"):
        Augmenter("2d", "elastic-only")


def test_foreground_samples_are_balanced_over_classes():
    from medsight.engine.sampling import PatchSampler

    label = np.zeros((40, 40, 40), np.int64)
    label[5:35, 5:35, 5:35] = 1  # 27,000 voxels
    label[1:3, 1:3, 1:3] = 2  # 8 voxels
    sampler = PatchSampler(
        [np.zeros((1, 40, 40, 40), np.float32)], [label], "3d", (16, 16, 16), 1,
        np.random.default_rng(0), fg_fraction=1.0,
    )  # fmt: skip
    centres = [sampler._centre(0) for _ in range(400)]
    on_small = np.mean([label[tuple(c)] == 2 for c in centres])
    # drawn by voxel count the small class would get 8 / 27,008 of the centres; by class, half
    assert 0.4 < on_small < 0.6
