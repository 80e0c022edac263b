"""The on-disk case cache and the streaming patch dataset (engine/cache.py)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from medsight import io
from medsight.datasets import open_dataset
from medsight.engine import cache as cache_module
from medsight.engine.cache import (
    CachedCase,
    CaseCache,
    PatchDataset,
    class_locations,
    fit_preprocessing,
    make_loader,
)
from medsight.engine.preprocess import Preprocessing
from medsight.scan import Scan

SPACINGS = [(1.0, 1.0, 2.0), (1.0, 1.0, 2.0), (1.0, 1.0, 3.0)]  # the last case is resampled to 2 mm


def write_dataset(root, spacings=SPACINGS):
    """Two-channel cases with labels 2 (a 3x3x3 cube) and 5 (a 2x2x2 cube): a non-contiguous label set."""
    for i, spacing in enumerate(spacings):
        rng = np.random.default_rng(i)
        image = rng.normal(100, 20, (2, 12, 10, 8)).astype(np.float32)
        label = np.zeros((12, 10, 8), np.uint8)
        label[3:6, 3:6, 2:5] = 2
        label[8:10, 6:8, 4:6] = 5
        affine = Scan.affine_from_spacing(spacing)
        io.write(Scan(image, affine), root / "imagesTr" / f"case{i}.nii.gz")
        io.write(Scan.from_spatial(label, affine), root / "labelsTr" / f"case{i}.nii.gz")
    manifest = {
        "modality": {"0": "MRI", "1": "MRI"},
        "labels": {"0": "background", "2": "inner", "5": "outer"},
        "training": [
            {"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"}
            for i in range(len(spacings))
        ],
    }
    (root / "dataset.json").write_text(json.dumps(manifest))
    return open_dataset(root)


class Counting:
    """Wraps a dataset, counting the cases it reads."""

    def __init__(self, dataset):
        self.dataset, self.reads = dataset, 0

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def load_case(self, case):
        self.reads += 1
        return self.dataset.load_case(case)


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "data")


@pytest.fixture
def built(dataset, tmp_path):
    pre, values = fit_preprocessing(dataset, dataset.case_ids, slice_wise=False, root=tmp_path / "cache")
    return pre, values, CaseCache(tmp_path / "cache", pre, values, progress=False)


def test_streaming_fit_equals_the_in_memory_fit(dataset, tmp_path):
    pairs = [dataset.load_case(c) for c in dataset.cases]
    expected = Preprocessing.fit([i for i, _ in pairs], [lab for _, lab in pairs], "MRI", slice_wise=False)
    pre, values = fit_preprocessing(dataset, dataset.case_ids, slice_wise=False, root=tmp_path / "c")
    assert pre == expected
    assert pre.target_spacing == [1.0, 1.0, 2.0] and pre.in_channels == 2  # the median spacing
    assert values == [0, 2, 5]


def test_cache_round_trip_equals_preprocessing_applied_directly(dataset, built, tmp_path):
    pre, values, cache = built
    cases = cache.build(dataset, dataset.case_ids)
    assert [c.case_id for c in cases] == dataset.case_ids
    lut = np.array([0, 0, 1, 0, 0, 2])  # label value -> class index, worked out by hand for {0, 2, 5}
    for case in cases:
        image, label = dataset.load_case(dataset.case(case.case_id))
        expected = pre.image(image)
        assert isinstance(case.image, np.memmap) and case.image.dtype == np.float32
        np.testing.assert_array_equal(case.image, expected.array.astype(np.float32))
        np.testing.assert_allclose(case.affine, expected.affine)
        np.testing.assert_array_equal(case.label, lut[pre.resample(label, label=True).array[0]])
        assert case.label.dtype == np.uint8
        assert case.meta["shape"] == list(expected.array.shape[1:])
    first = cases[0]  # not resampled: the label cubes are where they were written
    assert first.label[4, 4, 3] == 1 and first.label[9, 7, 5] == 2
    assert (np.asarray(first.label) == 1).sum() == 27 and (np.asarray(first.label) == 2).sum() == 8
    assert first.meta["class_counts"] == [12 * 10 * 8 - 27 - 8, 27, 8]
    assert cases[2].image.shape == (2, 12, 10, 12)  # 8 slices of 3 mm on a 2 mm grid
    np.testing.assert_allclose(np.asarray(first.image).mean(axis=(1, 2, 3)), 0, atol=1e-5)  # z-scored
    image, label = first.load()
    assert not isinstance(image, np.memmap) and label.dtype == np.int64


def test_class_locations_are_a_sample_of_each_class():
    label = np.zeros((6, 6, 6), np.uint8)
    label[1, 2, 3] = label[4, 4, 4] = 1
    label[0:5, 0, 0] = 3
    locations, ranges = class_locations(label, seed=0, limit=3)
    assert ranges == {"1": [0, 2], "3": [2, 5]}
    assert locations[0:2].tolist() == [[1, 2, 3], [4, 4, 4]]
    assert all(label[tuple(v)] == 3 for v in locations[2:5]) and len({tuple(v) for v in locations[2:5]}) == 3


def test_second_build_reads_nothing(dataset, built, tmp_path):
    _, _, cache = built
    first = cache.build(dataset, dataset.case_ids)
    stamps = [os.stat(c.folder / "image.npy").st_mtime_ns for c in first]
    counting = Counting(dataset)
    again = cache.build(counting, dataset.case_ids)
    assert counting.reads == 0
    assert [c.folder for c in again] == [c.folder for c in first]
    assert [os.stat(c.folder / "image.npy").st_mtime_ns for c in again] == stamps
    fit_preprocessing(counting, dataset.case_ids, slice_wise=False, root=tmp_path / "cache")
    assert counting.reads == 0  # the fit is stored too


def test_changed_preprocessing_or_source_rebuilds(dataset, built, tmp_path):
    pre, values, cache = built
    cache.build(dataset, dataset.case_ids)
    counting = Counting(dataset)
    other = Preprocessing(**{**pre.to_dict(), "target_spacing": [1.0, 1.0, 3.0]})
    CaseCache(tmp_path / "cache", other, values, progress=False).build(counting, dataset.case_ids)
    assert counting.reads == 3

    old = cache.build(dataset, dataset.case_ids)[1].folder
    path = dataset.case("case1").images[0]
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    counting = Counting(dataset)
    new = cache.build(counting, dataset.case_ids)
    assert counting.reads == 1 and new[1].folder != old
    assert not old.exists()  # the stale entry is removed


def test_interrupted_write_leaves_no_case(dataset, built, monkeypatch):
    _, _, cache = built
    real_save = np.save

    def save_then_die(path, array):
        if str(path).endswith("label.npy"):
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(cache_module.np, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cache.build(dataset, dataset.case_ids)
    assert list(cache.folder.iterdir()) == []  # neither the case nor its temporary folder
    monkeypatch.setattr(cache_module.np, "save", real_save)

    # A builder killed outright leaves its temporary folder: never read as a case, removed once old.
    leftover = cache.folder / ".tmp-case0.0123-999-abc"
    leftover.mkdir()
    (leftover / "image.npy").write_bytes(b"half")
    os.utime(leftover, (0, 0))
    cases = cache.build(dataset, dataset.case_ids)
    assert not leftover.exists()
    assert cases[0].image.shape == (2, 12, 10, 8)


def test_a_case_written_meanwhile_by_another_builder_is_kept(dataset, built):
    _, _, cache = built
    entry = cache.entry(dataset, "case0")
    cache.build(dataset, ["case0"])
    stamp = os.stat(entry / "image.npy").st_mtime_ns
    cache.folder.mkdir(exist_ok=True)
    cache._write(dataset, "case0", entry)  # a second builder finishing the same case: its rename fails
    assert os.stat(entry / "image.npy").st_mtime_ns == stamp
    assert [p.name for p in cache.folder.iterdir()] == [entry.name]


def test_cached_case_pickles_as_its_folder(dataset, built):
    _, _, cache = built
    case = cache.build(dataset, ["case0"])[0]
    assert len(pickle.dumps(case)) < 1000  # not the arrays
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(case)).image, case.image)


def write_single_voxel_case(tmp_path):
    """A 32^3 volume whose only foreground voxel is (16, 16, 16)."""
    label = np.zeros((32, 32, 32), np.uint8)
    label[16, 16, 16] = 1
    affine = np.eye(4)
    image = np.random.default_rng(0).normal(size=(1, 32, 32, 32)).astype(np.float32)
    io.write(Scan(image, affine), tmp_path / "one" / "imagesTr" / "c.nii.gz")
    io.write(Scan.from_spatial(label, affine), tmp_path / "one" / "labelsTr" / "c.nii.gz")
    manifest = {
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "dot"},
        "training": [{"image": "./imagesTr/c.nii.gz", "label": "./labelsTr/c.nii.gz"}],
    }
    (tmp_path / "one" / "dataset.json").write_text(json.dumps(manifest))
    data = open_dataset(tmp_path / "one")
    pre, values = fit_preprocessing(data, data.case_ids, slice_wise=False, root=tmp_path / "c")
    return CaseCache(tmp_path / "c", pre, values, progress=False).build(data, data.case_ids)


@pytest.mark.parametrize("fg_fraction", [0.0, 0.5])
def test_foreground_oversampling_rate(tmp_path, fg_fraction):
    cases = write_single_voxel_case(tmp_path)
    data = PatchDataset(cases, "3d", (8, 8, 8), batch_size=10, steps=100, fg_fraction=fg_fraction)
    hits = np.concatenate([(y > 0).reshape(len(y), -1).any(axis=1) for _, y in data])
    # A random 8^3 patch of 32^3 starts at 0..24 along each axis, 8 of which cover voxel 16; a
    # foreground-centred one always covers it.
    random_hit = (8 / 25) ** 3
    expected = fg_fraction + (1 - fg_fraction) * random_hit
    assert len(hits) == 1000
    assert abs(hits.mean() - expected) < 0.05  # 3 standard deviations of a 1000-sample mean


def test_batch_shapes(dataset, built):
    pre, _, cache = built
    cases = cache.build(dataset, dataset.case_ids)
    x, y = PatchDataset(cases, "3d", (16, 16, 16), batch_size=3, steps=1).batch(0)
    assert x.shape == (3, 2, 16, 16, 16) and x.dtype == np.float32
    assert y.shape == (3, 16, 16, 16) and y.dtype == np.int64 and set(np.unique(y)) <= {0, 1, 2}
    stacks = PatchDataset(cases, "2.5d", (16, 16), slices=5, batch_size=2, steps=1, slice_axis=1)
    x, y = stacks.batch(0)
    assert x.shape == (2, 2, 5, 16, 16) and y.shape == (2, 16, 16)
    x, y = PatchDataset(cases, "2d", (16, 16), batch_size=2, steps=1, slice_axis=2).batch(0)
    assert x.shape == (2, 2, 16, 16) and y.shape == (2, 16, 16)


def test_slice_wise_foreground_centres_follow_the_slice_axis(dataset, built):
    """With every sample centred on foreground, each 2D label crop must contain some: the stored
    (x, y, z) locations are permuted like the arrays when the slice axis moves last."""
    _, _, cache = built
    cases = cache.build(dataset, dataset.case_ids)
    for axis in (0, 1, 2):
        data = PatchDataset(cases, "2d", (4, 4), batch_size=20, steps=1, slice_axis=axis, fg_fraction=1.0)
        _, y = data.batch(0)
        assert (y > 0).reshape(20, -1).any(axis=1).all()


def test_same_seed_same_batches_whatever_the_workers(dataset, built):
    _, _, cache = built
    cases = cache.build(dataset, dataset.case_ids)

    def batches(workers, seed=3, epoch=0):
        data = PatchDataset(
            cases, "3d", (8, 8, 8), batch_size=2, steps=5, seed=seed, augmentation="intensity"
        )
        data.set_epoch(epoch)
        return list(make_loader(data, workers))

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 5
    for (x0, y0), (x2, y2) in zip(serial, parallel, strict=True):
        assert isinstance(x0, torch.Tensor)
        torch.testing.assert_close(x0, x2, rtol=0, atol=0)
        torch.testing.assert_close(y0, y2, rtol=0, atol=0)
    assert not torch.equal(batches(0, epoch=1)[0][0], serial[0][0])
    assert not torch.equal(batches(0, seed=4)[0][0], serial[0][0])


def test_a_case_is_opened_by_its_folder(dataset, built):
    _, _, cache = built
    case = cache.build(dataset, ["case2"])[0]
    again = CachedCase("case2", case.folder)
    assert again.meta["case_id"] == "case2" and again.meta["locations"].keys() == {"1", "2"}
    label = np.asarray(again.label)
    for class_index in (1, 2):
        stored = again.locations(class_index)
        assert len(stored) == (label == class_index).sum()  # fewer than MAX_LOCATIONS: all of them
        assert (label[tuple(stored.T)] == class_index).all()
    assert len(again.locations(3)) == 0


def _build_as_rank(cache, dataset, rank):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    cache.build(dataset, dataset.case_ids)


def test_concurrent_builders_leave_one_intact_cache(dataset, built, tmp_path):
    import multiprocessing

    pre, values, cache = built
    context = multiprocessing.get_context("fork")
    builders = [context.Process(target=_build_as_rank, args=(cache, dataset, r)) for r in (0, 1, 0)]
    for b in builders:
        b.start()
    for b in builders:
        b.join(60)
    assert [b.exitcode for b in builders] == [0, 0, 0]
    alone = CaseCache(tmp_path / "alone", pre, values, progress=False).build(dataset, dataset.case_ids)
    shared = cache.build(dataset, dataset.case_ids)
    assert sorted(p.name for p in cache.folder.iterdir()) == sorted(c.folder.name for c in shared)
    for a, s in zip(alone, shared, strict=True):
        np.testing.assert_array_equal(a.image, s.image)
        np.testing.assert_array_equal(a.label, s.label)


def test_four_channel_phantom_keeps_channel_zero_and_adds_contrasts(tmp_path):
    from medsight.datasets.phantom import make_phantom_3d, write_phantom_dataset

    one, label, _ = make_phantom_3d(5, shape=(32, 32, 24), noise=0.0, bias=0.0)
    four, label4, _ = make_phantom_3d(5, shape=(32, 32, 24), noise=0.0, bias=0.0, channels=4)
    assert four.array.shape == (4, 32, 32, 24)
    np.testing.assert_array_equal(four.array[0], one.array[0])
    np.testing.assert_array_equal(label4.array, label.array)
    cyst, vessel = label.array[0] == 1, label.array[0] == 2
    # T1c: the cyst is dark and the vessel bright; T1: the vessel no longer bright; T2: the cyst bright.
    assert np.median(four.array[0][cyst]) < 300 < np.median(four.array[0][vessel])
    assert np.median(four.array[1][vessel]) < 600 and np.median(four.array[2][cyst]) > 700

    data = write_phantom_dataset(tmp_path / "p", 2, channels=4, shape=(24, 24, 24), compress=False)
    opened = open_dataset(data)
    assert [p.name for p in opened.case(opened.case_ids[0]).images] == ["phantom_000.nii"]
    image, _ = opened.load_case(opened.cases[0])
    assert image.array.shape == (4, 24, 24, 24) and opened.channel_names == ["T1c", "T1", "T2", "FLAIR"]
