"""The on-disk case cache and sampling from it (engine/cache.py), and segmentation training that
streams from it (tasks/segmentation.py)."""

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
    class_counts,
    class_locations,
    fit_preprocessing,
    patch_sampler,
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


def draw(cases, kind, patch, batch_size, seed=0, **options):
    """One batch from the cached cases, as the training loop draws it: a sampler and a seeded stream."""
    sampler = patch_sampler(cases, kind, patch, **options)
    sampler.rng = np.random.default_rng(seed)
    return sampler.batch(batch_size)


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
    sampler = patch_sampler(cases, "3d", (8, 8, 8), fg_fraction=fg_fraction)
    sampler.rng = np.random.default_rng(0)
    hits = np.concatenate([(sampler.batch(10)[1] > 0).reshape(10, -1).any(axis=1) for _ in range(100)])
    # A random 8^3 patch of 32^3 starts at 0..24 along each axis, 8 of which cover voxel 16; a
    # foreground-centred one always covers it.
    random_hit = (8 / 25) ** 3
    expected = fg_fraction + (1 - fg_fraction) * random_hit
    assert len(hits) == 1000
    assert abs(hits.mean() - expected) < 0.05  # 3 standard deviations of a 1000-sample mean


def test_batch_shapes(dataset, built):
    pre, _, cache = built
    cases = cache.build(dataset, dataset.case_ids)
    x, y = draw(cases, "3d", (16, 16, 16), 3)
    assert x.shape == (3, 2, 16, 16, 16) and x.dtype == np.float32
    assert y.shape == (3, 16, 16, 16) and y.dtype == np.int64 and set(np.unique(y)) <= {0, 1, 2}
    x, y = draw(cases, "2.5d", (16, 16), 2, slices=5, slice_axis=1)
    assert x.shape == (2, 2, 5, 16, 16) and y.shape == (2, 16, 16)
    x, y = draw(cases, "2d", (16, 16), 2, slice_axis=2)
    assert x.shape == (2, 2, 16, 16) and y.shape == (2, 16, 16)


def test_slice_wise_foreground_centres_follow_the_slice_axis(dataset, built):
    """With every sample centred on foreground, each 2D label crop must contain some: the stored
    (x, y, z) locations are permuted like the arrays when the slice axis moves last."""
    _, _, cache = built
    cases = cache.build(dataset, dataset.case_ids)
    for axis in (0, 1, 2):
        _, y = draw(cases, "2d", (4, 4), 20, slice_axis=axis, fg_fraction=1.0)
        assert (y > 0).reshape(20, -1).any(axis=1).all()


def test_class_counts_add_up_the_cases_without_reading_labels(dataset, built):
    _, _, cache = built
    cases = cache.build(dataset, dataset.case_ids)
    # The first two cases keep their grid: a 27- and an 8-voxel cube each; the third is resampled.
    resampled = np.asarray(cases[2].label)
    expected = [27 * 2 + (resampled == 1).sum(), 8 * 2 + (resampled == 2).sum()]
    for case in cases:
        (case.folder / "label.npy").unlink()  # the counts come from meta.json alone
    counts = class_counts(cases, 4)
    assert counts[1:3].tolist() == expected and counts[3] == 0
    assert counts.sum() == 2 * 12 * 10 * 8 + 12 * 10 * 12


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


# -- training streams from the cache ----------------------------------------------------------------
@pytest.mark.slow
def test_training_reuses_the_cache_and_gives_the_same_run_whatever_the_workers(tmp_path, monkeypatch):
    """The first run reads and caches every case; a second run on the same data reads none, samples
    its batches in two worker processes instead of the main one, and ends with the same weights."""
    from medsight.datasets.phantom import write_phantom_dataset
    from medsight.engine import checkpoint
    from medsight.tasks.segmentation import SegmentationConfig, SegmentationTask, train

    data = write_phantom_dataset(tmp_path / "data", 4, dim=3, seed=0)
    reads = []
    real_read = cache_module._read_pair
    monkeypatch.setattr(cache_module, "_read_pair", lambda d, cid: reads.append(cid) or real_read(d, cid))
    options = dict(
        method="unet3d", data=str(data), cache=str(tmp_path / "cache"), epochs=2, steps_per_epoch=2,
        batch_size=2, patch_size=[32, 32, 32], max_val_cases=1, progress=False,
    )  # fmt: skip
    first = train(SegmentationConfig(**options, out=str(tmp_path / "w0"), num_workers=0))
    assert len(reads) == 3 + 4  # the fit reads the 3 training cases, the cache all 4 cases once
    reads.clear()
    second = train(SegmentationConfig(**options, out=str(tmp_path / "w2"), num_workers=2))
    assert reads == []
    a, b = (checkpoint.load(s["last"]) for s in (first, second))
    assert [r["train_loss"] for r in a["training"]["history"]] == [
        r["train_loss"] for r in b["training"]["history"]
    ]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["data"]["val_ids"] == b["data"]["val_ids"] and len(a["data"]["train_ids"]) == 3

    task = SegmentationTask(SegmentationConfig(**options, out=str(tmp_path / "w3")))
    task.prepare()  # what training holds: case folders and a sampler mapping them, no arrays
    held = task.data.value
    assert all(isinstance(c, CachedCase) for c in held["train"] + held["val"]) and reads == []
    assert len(pickle.dumps([sampler for sampler, _ in held["samplers"]])) < 20_000


def test_a_sampling_process_keeps_a_bounded_set_of_files_mapped(tmp_path):
    paths = [tmp_path / f"{i}.npy" for i in range(3)]
    for i, path in enumerate(paths):
        np.save(path, np.full(100, i, np.float64))  # 800 bytes of data each
    maps = cache_module._Maps(limit=1600)
    for path in paths:
        maps(path)
    assert list(maps.maps) == paths[1:] and maps.size == 1600  # the least recently used went
    assert maps(paths[1])[0] == 1 and list(maps.maps) == [paths[2], paths[1]]
    assert maps(paths[0])[5] == 0 and list(maps.maps) == [paths[1], paths[0]]
