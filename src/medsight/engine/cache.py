"""Training data that streams from disk: each case preprocessed once into memory-mapped arrays.

As nnU-Net does, every case is read, preprocessed (:class:`~medsight.engine.preprocess.Preprocessing`)
and written once into a cache folder: ``image.npy`` (float32, channel-first), ``label.npy`` (class
indices, uint8 or int16), ``locations.npy`` (a sample of at most :data:`MAX_LOCATIONS` foreground voxel
coordinates per class, nnU-Net's ``class_locations``, so the sampler never scans a volume) and
``meta.json`` (working-grid shape and affine, voxels per class, source files). Training then maps
the arrays (``np.load(mmap_mode="r")``) and reads only the patches it samples, in DataLoader worker
processes, so memory stays flat in the number of cases.

How a trainer uses it (tasks/segmentation.py does this inside the training loop)::

    from medsight.engine.cache import CaseCache, fit_preprocessing, patch_sampler

    pre, values = fit_preprocessing(dataset, train_ids, slice_wise=kind != "3d")  # one case at a time
    cache = CaseCache(None, pre, values)  # None: $MEDSIGHT_CACHE, else ~/.cache/medsight
    train_cases = cache.build(dataset, train_ids)  # reuses what an earlier run wrote
    val_cases = cache.build(dataset, val_ids)
    sampler = patch_sampler(train_cases, kind, patch, slices, slice_axis=pre.slice_axis)
    sampler.rng = np.random.default_rng([seed, rank, epoch, step])  # one stream per batch
    x, y = sampler.batch(batch_size)  # reads only the sampled windows of the memory-mapped cases
    for case in val_cases:  # validation holds one case in memory at a time
        image, label = case.load()

Cache layout: ``<root>/v<version>-<hash of the preprocessing and classes>/<case id>.<key>/``, where the
key hashes the preprocessing, the classes, the case's source files (paths, sizes, modification times)
and the format version: changing any of them builds the case anew (and removes its stale entry).
A case is written into a temporary sibling folder and renamed into place, so an interrupted build
leaves no partial case, and builders running at once (DDP ranks, which start at different cases)
never see each other's half-written files: the first rename wins, the others discard their copy.

Batches are drawn by :func:`patch_sampler` (a :class:`~medsight.engine.sampling.PatchSampler` with
foreground oversampling from the stored class locations) in the training loop's DataLoader workers,
each batch from its own random stream (engine/loop.py), so the batches are the same whatever the
number of workers, and a resumed run draws what an unbroken one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from medsight.engine.preprocess import Preprocessing
from medsight.errors import MedsightError

FORMAT_VERSION = 1
MAX_LOCATIONS = 10_000  # foreground voxels kept per class and case (nnU-Net keeps 10 000 per case)
MAPPED_BYTES = 256 * 2**20  # cached files a sampling process keeps mapped (see _Maps)
STALE_TEMP_SECONDS = 3600  # a temporary folder this old belongs to a builder that was killed


def default_root() -> Path:
    """``$MEDSIGHT_CACHE``, else ``$XDG_CACHE_HOME/medsight``, else ``~/.cache/medsight``."""
    if os.environ.get("MEDSIGHT_CACHE"):
        return Path(os.environ["MEDSIGHT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medsight"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_signature(case) -> list[list]:
    """The files a case is read from, with sizes and modification times: a change re-keys the case."""
    paths = [*case.images, *([case.label] if case.label is not None else [])]
    out = []
    for path in paths:
        if not Path(path).exists():  # e.g. a DICOM study lacking one of the series
            raise MedsightError("no such file or folder", path)
        stat = Path(path).stat()
        out.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def label_lookup(values: list[int]) -> np.ndarray:
    """Stored label value -> class index (0..K-1), so non-contiguous label sets train too."""
    lut = np.zeros(max(values) + 1, np.int64)
    lut[values] = np.arange(len(values))
    return lut


def _read_pair(dataset, case_id: str):
    """(image, label) of a case; 2D ones as one-slice volumes, so one code path trains both."""
    from medsight.engine.preprocess import as_volume

    image, label = dataset.load_case(dataset.case(case_id))
    if label is None:
        raise MedsightError(f"case '{case_id}' has no label", dataset.root)
    if image.ndim != dataset.dim:
        raise MedsightError(f"is {image.ndim}D in a {dataset.dim}D dataset", image.path)
    return as_volume(image), as_volume(label)


def fit_preprocessing(
    dataset,
    ids: list[str],
    slice_wise: bool,
    slice_axis: int | None = None,
    root: str | Path | None = None,
    progress: bool = True,
    spacing: list[float] | None = None,
) -> tuple[Preprocessing, list[int]]:
    """Fit the preprocessing on the cases ``ids``, reading one case at a time; returns it with the
    sorted label values (the dataset's declared ones, else those found, with 0). The result is
    stored under ``root`` (default :func:`default_root`), keyed like the cases, so a second run
    with the same files reads nothing."""
    from tqdm import tqdm

    root = Path(root) if root is not None else default_root()
    key = _digest(
        {
            "version": FORMAT_VERSION,
            "sources": [source_signature(dataset.case(cid)) for cid in ids],
            "modality": dataset.modality,
            "labels": dataset.labels,
            "mapping": dataset.label_mapping,
            "slice_wise": slice_wise,
            "slice_axis": slice_axis,
            "spacing": spacing,
            "dim": dataset.dim,
        }
    )
    stored = root / "fits" / f"{key}.json"
    if stored.exists():
        saved = json.loads(stored.read_text())
        return Preprocessing.from_dict(saved["preprocessing"]), saved["values"]
    found: set[int] = {0}

    def pairs():
        for cid in tqdm(ids, desc="fitting preprocessing", disable=not progress, leave=False):
            image, label = _read_pair(dataset, cid)
            if not dataset.labels:
                found.update(int(v) for v in np.unique(label.array))
            yield image, label

    pre = Preprocessing.fit_stream(
        pairs(), dataset.modality, slice_wise, slice_axis, ct_samples=MAX_LOCATIONS, spacing=spacing
    )
    pre.dim = dataset.dim
    values = sorted(dataset.labels) if dataset.labels else sorted(found)
    from medsight.io import write_text

    stored.parent.mkdir(parents=True, exist_ok=True)
    write_text(stored, json.dumps({"preprocessing": pre.to_dict(), "values": values}), overwrite=True)
    return pre, values


@dataclass
class CachedCase:
    """One cached case. ``image`` (C, *spatial) and ``label`` (*spatial) map the files anew on each
    access (keep the array while you use it); unmapped, their pages leave the process, so a long
    run does not accumulate the dataset in its resident memory. Pickles as its folder."""

    case_id: str
    folder: Path

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.folder / "meta.json").read_text())

    @property
    def image(self) -> np.ndarray:
        return np.load(self.folder / "image.npy", mmap_mode="r")

    @property
    def label(self) -> np.ndarray:
        return np.load(self.folder / "label.npy", mmap_mode="r")

    @property
    def affine(self) -> np.ndarray:
        """The affine of the preprocessed (working) grid."""
        return np.array(self.meta["affine"])

    def locations(self, class_index: int) -> np.ndarray:
        """The stored sample of voxel coordinates (N, 3) of one class (empty when absent)."""
        start, stop = self.meta["locations"].get(str(class_index), (0, 0))
        return np.load(self.folder / "locations.npy", mmap_mode="r")[start:stop]

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image float32, label int64) read into memory: what validation holds, one case at a time."""
        return np.array(self.image), np.array(self.label, dtype=np.int64)


class CaseCache:
    """Preprocessed cases on disk for one preprocessing and one class list (``values``: the label
    values in class order, as :func:`fit_preprocessing` returns them; None stores the label values
    as they are)."""

    def __init__(
        self,
        root: str | Path | None,
        pre: Preprocessing,
        values: list[int] | None = None,
        progress: bool = True,
    ):
        self.pre, self.values, self.progress = pre, values, progress
        self.settings = {"version": FORMAT_VERSION, "preprocessing": pre.to_dict(), "values": values}
        base = Path(root) if root is not None else default_root()
        self.folder = base / f"v{FORMAT_VERSION}-{_digest(self.settings)}"

    def entry(self, dataset, case_id: str) -> Path:
        """The folder that holds (or will hold) this case as its files are now."""
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", case_id)
        key = _digest({**self.settings, "sources": source_signature(dataset.case(case_id))})
        return self.folder / f"{safe}.{key}"

    def build(self, dataset, ids: list[str]) -> list[CachedCase]:
        """Write the cases of ``ids`` not cached yet; return all of them, in the order of ``ids``."""
        from tqdm import tqdm

        self.folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        entries = [self.entry(dataset, cid) for cid in ids]
        # Concurrent builders (DDP ranks) start at different cases, so they mostly share the work.
        rank, world = int(os.environ.get("RANK", "0")), max(int(os.environ.get("WORLD_SIZE", "1")), 1)
        first = rank * len(ids) // world
        order = list(range(first, len(ids))) + list(range(first))
        missing = [i for i in order if not (entries[i] / "meta.json").exists()]
        for i in tqdm(missing, desc="caching cases", disable=not self.progress, leave=False):
            if not (entries[i] / "meta.json").exists():  # another builder may have written it meanwhile
                self._write(dataset, ids[i], entries[i])
        return [CachedCase(cid, entry) for cid, entry in zip(ids, entries, strict=True)]

    def _write(self, dataset, case_id: str, entry: Path) -> None:
        image, label = _read_pair(dataset, case_id)
        if image.channels != self.pre.in_channels:
            raise MedsightError(
                f"has {image.channels} channel(s); the training images have {self.pre.in_channels}",
                image.path,
            )
        work = self.pre.image(image)
        classes = self._classes(self.pre.resample(label, label=True).array[0], image.path)
        tmp = self.folder / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            np.save(tmp / "image.npy", work.array.astype(np.float32, copy=False))
            np.save(tmp / "label.npy", classes)
            locations, ranges = class_locations(classes, seed=int(_digest(case_id)[:8], 16))
            np.save(tmp / "locations.npy", locations)
            meta = {
                "case_id": case_id,
                "shape": list(classes.shape),
                "channels": int(work.array.shape[0]),
                "affine": np.asarray(work.affine).tolist(),
                "locations": ranges,
                "class_counts": np.bincount(classes.ravel()).tolist(),  # for class weights, unscanned
                "sources": source_signature(dataset.case(case_id)),
                "version": FORMAT_VERSION,
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, entry)
            except OSError:  # another builder renamed its copy first: theirs is as good as ours
                if not (entry / "meta.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._remove_stale_entries(entry)

    def _classes(self, raw: np.ndarray, path) -> np.ndarray:
        if self.values is None:
            if raw.min() < 0 or raw.max() > np.iinfo(np.int16).max:
                raise MedsightError(f"label values {raw.min()}..{raw.max()} are not class indices", path)
            return raw.astype(np.uint8 if raw.max() < 256 else np.int16)
        lut = label_lookup(self.values)
        if raw.min() < 0 or raw.max() >= len(lut) or (lut[raw] == 0).sum() != (raw == 0).sum():
            raise MedsightError(
                f"label values {np.unique(raw).tolist()} outside the classes {self.values}", path
            )
        return lut[raw].astype(np.uint8 if len(self.values) <= 256 else np.int16)

    def _remove_stale_entries(self, entry: Path) -> None:
        """Entries of the same case written from files that have changed since."""
        safe = entry.name.rsplit(".", 1)[0]
        for other in self.folder.glob(f"{safe}.*"):
            if other != entry and other.name.rsplit(".", 1)[0] == safe:
                shutil.rmtree(other, ignore_errors=True)

    def _remove_stale_temporaries(self) -> None:
        now = time.time()
        for tmp in self.folder.glob(".tmp-*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                    shutil.rmtree(tmp, ignore_errors=True)
            except FileNotFoundError:  # its builder finished meanwhile
                pass


def class_locations(label: np.ndarray, seed: int, limit: int = MAX_LOCATIONS) -> tuple[np.ndarray, dict]:
    """At most ``limit`` voxel coordinates per foreground class, drawn at random (seeded), as one
    (N, 3) array sorted by class, with each class's row range: ``{"1": [start, stop], ...}``."""
    rng = np.random.default_rng(seed)
    parts, ranges, start = [], {}, 0
    for value in np.unique(label):
        if value == 0:
            continue
        voxels = np.argwhere(label == value)
        if len(voxels) > limit:
            voxels = voxels[np.sort(rng.choice(len(voxels), limit, replace=False))]
        parts.append(voxels.astype(np.int32))
        ranges[str(int(value))] = [start, start + len(voxels)]
        start += len(voxels)
    locations = np.concatenate(parts) if parts else np.zeros((0, label.ndim), np.int32)
    return locations, ranges


# -- sampling ------------------------------------------------------------------------------------
class _Maps:
    """The .npy files a process has mapped for sampling, kept open (most recently used first) up to
    ``limit`` bytes of file: opening a map costs more than reading a small patch from it, and keeping
    every case mapped would let the pages a run has touched accumulate in its resident memory."""

    def __init__(self, limit: int):
        self.limit, self.maps, self.size = limit, OrderedDict(), 0

    def __call__(self, path: Path) -> np.ndarray:
        array = self.maps.pop(path, None)
        if array is None:
            array = np.asarray(np.load(path, mmap_mode="r"))  # a plain view: memmap slicing is slower
            self.size += array.nbytes
        self.maps[path] = array
        while self.size > self.limit and len(self.maps) > 1:
            self.size -= self.maps.popitem(last=False)[1].nbytes
        return array


_mapped = _Maps(MAPPED_BYTES)  # one per process: forked DataLoader workers start from the parent's


class _Arrays(Sequence):
    """The cases' images or labels, mapped on access, in the sampler's axis order."""

    def __init__(self, cases: list[CachedCase], what: str, slice_axis: int | None):
        self.cases, self.what, self.slice_axis = cases, what, slice_axis

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, v):
        from medsight.engine.sampling import to_working

        array = _mapped(self.cases[v].folder / f"{self.what}.npy")
        if self.slice_axis is None:
            return array
        return (
            to_working(array, self.slice_axis)
            if self.what == "image"
            else to_working(array[None], self.slice_axis)[0]
        )


class _Locations(Sequence):
    """One class's stored voxel sample of one case, read a row at a time, axes permuted like the arrays."""

    def __init__(self, case: CachedCase, value: str, order: list[int]):
        self.case, self.order = case, order
        self.start, self.stop = case.meta["locations"][value]

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i):
        row = _mapped(self.case.folder / "locations.npy")[self.start + int(i)]
        return np.asarray(row)[self.order]


def patch_sampler(
    cases: list[CachedCase],
    kind: str,
    patch: tuple[int, ...],
    slices: int = 1,
    fg_fraction: float = 0.33,
    mirror_axes=(),
    slice_axis: int = 2,
    transpose: bool = False,
):
    """A :class:`~medsight.engine.sampling.PatchSampler` over cached cases: it maps each case's files
    for the sample it draws and takes foreground centres from the stored class locations, so it
    never holds or scans a whole volume. Set its ``rng`` before each batch (the training loop seeds
    one stream per batch: :class:`medsight.engine.loop.MedsightTask`). Pickles as the case folders."""
    from medsight.engine.sampling import PatchSampler

    if not cases:
        raise MedsightError("no cases to sample from")
    slice_wise = kind != "3d"
    axes = [a for a in range(3) if a != slice_axis] + [slice_axis] if slice_wise else [0, 1, 2]
    locations = [[_Locations(case, value, axes) for value in case.meta["locations"]] for case in cases]
    return PatchSampler(
        _Arrays(cases, "image", slice_axis if slice_wise else None),
        _Arrays(cases, "label", slice_axis if slice_wise else None),
        kind,
        tuple(patch),
        slices,
        rng=None,
        fg_fraction=fg_fraction,
        mirror_axes=mirror_axes,
        slice_axis=slice_axis,
        class_locations=locations,
        transpose=transpose,
    )


def class_counts(cases: list[CachedCase], n_classes: int) -> np.ndarray:
    """Voxels per class over the cases, from their stored meta (no label is read)."""
    total = np.zeros(n_classes, np.int64)
    for case in cases:
        counts = case.meta["class_counts"]
        total[: len(counts)] += counts
    return total
