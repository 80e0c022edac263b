"""Fingerprint of a dataset: what is there, and what is wrong with it.

Every case is read file by file so that a problem is pinned to the file that has it; one bad
case is recorded and skipped, never fatal. Label values are reported *raw* (as stored, e.g.
0/255), while the check against declared classes applies the layout's ``label_mapping`` first.

Intensity mean and std are exact (running sums over all finite voxels); the 0.5/99.5
percentiles come from up to ``sample_per_case`` voxels drawn per case and channel with a fixed
seed (exact when cases are smaller than that).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from medsight.datasets.base import Case, Dataset
from medsight.errors import MedsightError
from medsight.scan import Scan, align_to

MAX_UNIQUE_SHAPES = 10


class _ChannelStats:
    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.low = np.inf
        self.high = -np.inf
        self.samples: list[np.ndarray] = []

    def add(self, values: np.ndarray, rng: np.random.Generator, sample_size: int) -> None:
        if values.size == 0:
            return
        values64 = values.astype(np.float64, copy=False)
        self.count += values.size
        self.total += float(values64.sum())
        self.total_sq += float(np.square(values64).sum())
        self.low = min(self.low, float(values64.min()))
        self.high = max(self.high, float(values64.max()))
        if values.size > sample_size:
            values64 = values64[rng.integers(0, values.size, sample_size)]
        self.samples.append(values64)

    def summary(self, name: str) -> dict[str, Any]:
        if self.count == 0:
            return {"channel": name, "voxels": 0}
        mean = self.total / self.count
        std = float(np.sqrt(max(self.total_sq / self.count - mean * mean, 0.0)))
        p_low, p_high = np.percentile(np.concatenate(self.samples), [0.5, 99.5])
        return {
            "channel": name,
            "voxels": self.count,
            "mean": mean,
            "std": std,
            "min": self.low,
            "max": self.high,
            "p0_5": float(p_low),
            "p99_5": float(p_high),
        }


def _number(value: Any) -> int | float:
    value = float(value)
    return int(value) if np.isfinite(value) and value == round(value) else value


def _value_counts(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() < 65536:
        counts = np.bincount(arr.ravel().astype(np.int64))
        values = np.flatnonzero(counts)
        return values, counts[values]
    return np.unique(arr, return_counts=True)


def _range_summary(rows: list[tuple[float, ...]], digits: int = 4) -> dict[str, list[float]]:
    table = np.asarray(rows, dtype=float)
    return {
        "min": [round(float(v), digits) for v in table.min(axis=0)],
        "median": [round(float(v), digits) for v in np.median(table, axis=0)],
        "max": [round(float(v), digits) for v in table.max(axis=0)],
    }


class _Inspector:
    def __init__(self, dataset: Dataset, sample_per_case: int, seed: int) -> None:
        self.dataset = dataset
        self.sample_per_case = sample_per_case
        self.rng = np.random.default_rng(seed)
        self.problems: list[dict[str, str | None]] = []
        self.shapes: list[tuple[int, ...]] = []
        self.spacings: list[tuple[float, ...]] = []
        self.channel_stats: list[_ChannelStats] = []
        self.label_voxels: Counter = Counter()
        self.label_cases: Counter = Counter()
        self.empty_labels = 0
        self.channel_counts: Counter = Counter()

    def problem(self, case: Case, file: Path | None, message: str) -> None:
        self.problems.append({"case": case.case_id, "file": str(file) if file else None, "problem": message})

    def channel_name(self, index: int) -> str:
        names = self.dataset.channel_names
        return names[index] if index < len(names) else f"ch{index}"

    # -- one case -----------------------------------------------------------------------
    def inspect_case(self, case: Case) -> None:
        image = self.read_image(case)
        label = self.read_label(case)
        if image is not None:
            self.image_checks(case, image)
        if label is not None:
            self.label_checks(case, label, image)

    def read_image(self, case: Case) -> Scan | None:
        from medsight import io

        if not case.images:
            self.problem(case, None, "missing image: the case lists no image file")
            return None
        scans = []
        for path in case.images:
            if not path.exists():
                self.problem(case, path, "missing image")
                continue
            try:
                scans.append((path, io.read(path)))
            except MedsightError as err:
                self.problem(case, path, f"unreadable: {err.message}")
        if len(scans) != len(case.images):
            return None
        first_path, first = scans[0]
        for path, scan in scans[1:]:
            if not first.same_geometry(scan):
                self.problem(
                    case,
                    path,
                    f"channel geometry mismatch with {first_path.name}: shape {list(scan.spatial_shape)} "
                    f"vs {list(first.spatial_shape)} or affine differs",
                )
                return None
        if len(scans) == 1:
            return first
        return Scan(np.concatenate([s.array for _, s in scans], axis=0), first.affine, path=first_path)

    def read_label(self, case: Case) -> Scan | None:
        if case.label is None:
            if self.dataset.expects_labels and case.split != "test":
                self.problem(case, None, "missing label file: the case has no label")
            return None
        if not case.label.exists():
            self.problem(case, case.label, "missing label file")
            return None
        try:
            return self.dataset.read_label(case, raw=True)
        except MedsightError as err:
            self.problem(case, case.label, f"unreadable: {err.message}")
            return None

    def image_checks(self, case: Case, image: Scan) -> None:
        self.shapes.append(image.spatial_shape)
        self.spacings.append(image.spacing)
        self.channel_counts[image.channels] += 1
        declared = len(self.dataset.channel_names)
        if declared and image.channels != declared:
            self.problem(
                case, case.images[0], f"{image.channels} channels but the layout declares {declared}"
            )
        while len(self.channel_stats) < image.channels:
            self.channel_stats.append(_ChannelStats())
        for index in range(image.channels):
            channel = image.array[index]
            file = case.images[index] if len(case.images) == image.channels else case.images[0]
            finite_mask = np.isfinite(channel)
            non_finite = int(channel.size - finite_mask.sum())
            finite = channel[finite_mask] if non_finite else channel.ravel()
            if non_finite:
                self.problem(
                    case, file, f"{non_finite} NaN/inf intensities in channel {self.channel_name(index)}"
                )
            if finite.size and finite.min() == finite.max():
                self.problem(
                    case,
                    file,
                    f"constant (empty) image: channel {self.channel_name(index)} is {_number(finite.min())}",
                )
            self.channel_stats[index].add(finite, self.rng, self.sample_per_case)

    def label_checks(self, case: Case, label: Scan, image: Scan | None) -> None:
        if image is not None:
            try:  # the rule training applies: resampled onto the image when they overlap, else refused
                align_to(label, image, "label", "image", cover=True)
            except MedsightError as err:
                kind = "shape" if label.spatial_shape != image.spatial_shape else "geometry"
                self.problem(case, case.label, f"image/label {kind} mismatch: {err.message}")
        values, counts = _value_counts(label.array)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            key = _number(value)
            self.label_voxels[key] += int(count)
            self.label_cases[key] += 1
        if values.size == 1 and values[0] == 0:
            self.empty_labels += 1
        integral = np.isfinite(values) & (values == np.round(values))
        if not integral.all():
            examples = ", ".join(str(_number(v)) for v in values[~integral][:5])
            self.problem(case, case.label, f"non-integer label values ({examples})")
        declared = self.dataset.labels
        if declared:
            mapping = self.dataset.label_mapping
            outside = [_number(v) for v in values[integral] if mapping.get(int(v), int(v)) not in declared]
            if outside:
                self.problem(
                    case,
                    case.label,
                    f"label values outside the declared classes {sorted(declared)}: {outside[:10]}",
                )

    # -- the whole dataset ---------------------------------------------------------------
    def summary(self, cases: list[Case]) -> dict[str, Any]:
        ds = self.dataset
        per_split = Counter(c.split or "unsplit" for c in ds.cases)
        shapes: dict[str, Any] = {}
        if self.shapes:
            if len({len(s) for s in self.shapes}) == 1:
                shapes = _range_summary(self.shapes, digits=0)
                shapes = {k: [int(v) for v in vals] for k, vals in shapes.items()}
            unique = Counter(self.shapes)
            if len(unique) <= MAX_UNIQUE_SHAPES:
                shapes["unique"] = [{"shape": list(s), "cases": n} for s, n in sorted(unique.items())]
        with_text = sum(1 for c in ds.cases if c.text)
        return {
            "root": str(ds.root),
            "layout": ds.layout,
            "dim": ds.dim,
            "modality": ds.modality,
            "cases": len(ds.cases),
            "cases_per_split": dict(sorted(per_split.items())),
            "cases_inspected": len(cases),
            "channels": list(ds.channel_names),
            "channel_counts_found": {str(k): v for k, v in sorted(self.channel_counts.items())},
            "shapes": shapes,
            "spacings": _range_summary(self.spacings) if self.spacings else {},
            "declared_labels": {str(k): v for k, v in sorted(ds.labels.items())},
            "label_mapping": {str(k): v for k, v in sorted(ds.label_mapping.items())},
            "label_values": [
                {"value": v, "voxels": self.label_voxels[v], "cases": self.label_cases[v]}
                for v in sorted(self.label_voxels)
            ],
            "label_voxels": int(sum(self.label_voxels.values())),
            "cases_with_empty_label": self.empty_labels,
            "intensity": [stats.summary(self.channel_name(i)) for i, stats in enumerate(self.channel_stats)],
            "texts": {"with_text": with_text, "without_text": len(ds.cases) - with_text},
            "problems": self.problems,
        }


def fingerprint(
    dataset: Dataset,
    max_cases: int | None = None,
    progress: bool = True,
    sample_per_case: int = 100_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Summary and integrity problems of ``dataset`` (the first ``max_cases`` cases are read;
    case counts, splits and texts always cover every case)."""
    if not dataset.cases:
        raise MedsightError(f"no cases found ({dataset.layout} layout)", dataset.root)
    if max_cases is not None and max_cases < 1:
        raise MedsightError(f"max_cases must be at least 1, got {max_cases}")
    cases = dataset.cases[:max_cases] if max_cases else dataset.cases
    inspector = _Inspector(dataset, sample_per_case, seed)
    from rich.console import Console
    from rich.progress import track

    for case in track(
        cases,
        description=f"inspecting {len(cases)} cases",
        disable=not progress,
        console=Console(stderr=True),
        transient=True,
    ):
        inspector.inspect_case(case)
    return inspector.summary(cases)
