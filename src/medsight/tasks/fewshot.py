"""Few-shot segmentation as a task of the training loop: self-supervised episodic training (no labels).

Training reads only images, from any dataset layout medsight knows, a plain folder of scans, or
single files; every 2D image or every slice of a volume (along ``slice_axis``) becomes a training
slice (:mod:`medsight.transforms.slices`: normalised per scan, resized to ``size x size``). Episodes
come from superpixel pseudo-labels (:class:`medsight.transforms.EpisodeSampler`). ``fewshot-shared``
trains the three heads together on one encoder: each episode is embedded once and the heads' losses
are summed, so the encoder gets the whole budget instead of a third of it.

Validation is self-supervised too: ``val_fraction`` of the images (a seeded split of the cases) never
train; ``val_episodes`` superpixel episodes drawn once from them with a fixed seed are segmented after
every epoch, and ``val_score`` is the mean Dice of the query predictions (over the heads). Everything
else (devices, best/last, resume, early stop, weight average, time budget) is the loop's
(:mod:`medsight.engine.loop`). The checkpoint records the head(s), the model arguments, the intensity
normalisation, the slice axis and the working size; :mod:`medsight.tasks.fewshot_predict` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.engine.loop import LoopConfig, MedsightTask, Shared, fit, world
from medsight.errors import MedsightError
from medsight.scan import Scan

METHODS: dict[str, str] = {
    "fewshot-prototype": "prototype",
    "fewshot-local-prototype": "local-prototype",
    "fewshot-conditional": "conditional",
    "fewshot-shared": "all",  # the three heads trained together on one shared encoder
}
MIN_BODY_SHARE = 0.1  # slices with less non-background than this are skipped in training
EPISODES = 8  # episodes per step unless --batch-size says otherwise
VALIDATION_STREAM = 7919  # seeds the validation episodes apart from the training batches' streams


@dataclass(kw_only=True)
class FewShotConfig(LoopConfig):
    data: str | list[str] = ""  # dataset folder(s) in any layout, plain folder(s) of scans, or scan files
    out: str = "runs/fewshot"
    method: str = "fewshot-local-prototype"
    epochs: int = 100  # 100 x 1000 steps: the 100,000-step budget of the trainer before the loop
    steps_per_epoch: int = 1000
    lr: float = 1e-3
    batch_size: int | None = None  # episodes per step (default EPISODES)
    layout: str | None = None
    layout_options: dict[str, Any] = field(default_factory=dict)
    channels: list[int] | None = None  # image channels to use (default: all)
    slice_axis: int = 2  # spatial axis volumes are sliced along
    size: int = 64  # working size: every slice is resized to size x size
    val_fraction: float = 0.1  # share of the images held out for the validation episodes
    val_episodes: int = 64
    include_ids: list[str] | None = None  # only these cases (default: all)
    exclude_ids: list[str] = field(default_factory=list)  # e.g. the evaluation cases
    superpixel_scale: float = 100.0
    superpixel_sigma: float = 0.8
    superpixel_min_size: int = 20  # pixels at working size
    align_weight: float | None = None  # PANet alignment loss weight; default 1 for prototype, else 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)


# -- data --------------------------------------------------------------------------------------------
def _scan_files(folder: Path) -> list[Path]:
    from medsight.io import FORMATS, suffix_of

    readable = {s for fmt in FORMATS.values() for s in fmt.suffixes}
    return sorted(p for p in folder.iterdir() if p.is_file() and suffix_of(p) in readable)


def iter_images(source: str | Path, layout: str | None = None, layout_options: dict | None = None):
    """``(case_id, image Scan)`` for every image of ``source``; labels are never read."""
    from medsight import io
    from medsight.datasets import open_dataset

    path = Path(source)
    if not path.exists():
        raise MedsightError("no such file or folder", path)
    if path.is_file():
        yield path.name, io.read(path)
        return
    try:
        dataset = open_dataset(path, layout, **(layout_options or {}))
    except MedsightError:
        if layout is not None:
            raise
        dataset = None
    if dataset is not None:
        for case in dataset.cases:
            yield case.case_id, dataset.read_image(case)
        return
    files = _scan_files(path)
    if not files:
        raise MedsightError("no dataset layout and no scan files (NIfTI, PNG, NRRD, NumPy...) here", path)
    for file in files:
        yield file.name, io.read(file)


def select_channels(scan: Scan, channels: list[int] | None) -> np.ndarray:
    if channels is None:
        return scan.array
    if max(channels) >= scan.channels:
        raise MedsightError(
            f"has {scan.channels} channel(s); channel {max(channels)} was asked for", scan.path
        )
    return scan.array[list(channels)]


def training_slices(scan: Scan, channels: list[int] | None, slice_axis: int, size: int):
    """Normalised working-size slices ``(S, C, size, size)`` and body masks ``(S, size, size)``."""
    from medsight.transforms import body_mask
    from medsight.transforms.slices import normalise_intensity, resize, to_slices

    array = select_channels(scan, channels)
    body = to_slices(body_mask(array)[None].astype(np.float32), slice_axis)
    slices = to_slices(normalise_intensity(array), slice_axis)
    keep = body.reshape(len(body), -1).mean(1) >= MIN_BODY_SHARE
    if not keep.any():
        return None, None
    images = resize(slices[keep], (size, size)).numpy()
    bodies = resize(body[keep], (size, size)).numpy()[:, 0] > 0.5
    return images, bodies


@dataclass
class TrainingSlices:
    """Working-size slices of every usable image, read once (several runs on the same sources can
    share them, as the benchmark's one-model-per-head runs do)."""

    slices: np.ndarray  # (S, C, size, size), normalised
    bodies: np.ndarray  # (S, size, size) bool
    case_ids: list[str]
    sources: list[str]
    counts: list[int]  # slices of each case, in case_ids order

    def rows(self, cases: list[int]) -> np.ndarray:
        """Slice indices of the given cases (positions in ``case_ids``)."""
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        return np.concatenate([np.arange(starts[c], starts[c + 1]) for c in cases])


def read_training_slices(cfg: FewShotConfig) -> TrainingSlices:
    """Slice and normalise every image of ``cfg.data`` (labels are never opened)."""
    from tqdm import tqdm

    sources = [cfg.data] if isinstance(cfg.data, str | Path) else list(cfg.data)
    images, bodies, case_ids, channel_counts = [], [], [], set()
    excluded = set(cfg.exclude_ids)
    for source in sources:
        found = iter_images(source, cfg.layout, cfg.layout_options)
        for case_id, scan in tqdm(found, desc="reading images", disable=not cfg.progress, leave=False):
            if case_id in excluded or (cfg.include_ids is not None and case_id not in cfg.include_ids):
                continue
            slices, body = training_slices(scan, cfg.channels, cfg.slice_axis, cfg.size)
            if slices is None:
                continue
            channel_counts.add(slices.shape[1])
            if len(channel_counts) > 1:
                raise MedsightError(
                    f"images have different channel counts {sorted(channel_counts)}; choose channels",
                    scan.path,
                )
            images.append(slices)
            bodies.append(body)
            case_ids.append(case_id)
    if not images:
        raise MedsightError("no usable training images (all excluded, empty or background)", sources[0])
    return TrainingSlices(
        np.concatenate(images), np.concatenate(bodies), case_ids, [str(s) for s in sources],
        [len(s) for s in images],
    )  # fmt: skip


def split_cases(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, validation) case positions. A single image validates on its own slices: there is
    nothing to hold out, and the score still follows training."""
    from medsight.datasets.splits import train_val_split

    train, val = train_val_split([f"{i:07d}" for i in range(n)], val_fraction, seed)
    train_cases = [int(i) for i in train]
    return train_cases, [int(i) for i in val] or train_cases


# -- the task ----------------------------------------------------------------------------------------
class FewShotTask(MedsightTask):
    name = "fewshot"
    config_class = FewShotConfig
    score_name = "validation episode Dice"
    resume_ignores = {"data"}

    def __init__(self, cfg: FewShotConfig, data: TrainingSlices | None = None):
        """``data``: slices already read by :func:`read_training_slices` with the same data settings
        (default: read them in :meth:`prepare`)."""
        from medsight.models.fewshot import HEADS

        super().__init__(cfg)
        if cfg.method not in METHODS:
            raise MedsightError(f"unknown few-shot method '{cfg.method}'; choose one of {', '.join(METHODS)}")
        if cfg.val_episodes < 1:
            raise MedsightError(f"val_episodes must be at least 1, not {cfg.val_episodes}")
        self.heads = list(HEADS) if METHODS[cfg.method] == "all" else [METHODS[cfg.method]]
        self.episodes = cfg.batch_size or EPISODES
        self.align_weights = {
            h: cfg.align_weight if cfg.align_weight is not None else (1.0 if h == "prototype" else 0.0)
            for h in self.heads
        }
        self._given = Shared(data)

    @classmethod
    def methods(cls) -> list[str]:
        return list(METHODS)

    def model_name(self) -> str:
        return self.cfg.method

    def prepare(self) -> None:
        from medsight.models.fewshot import shared_heads
        from medsight.transforms import EpisodeSampler

        cfg = self.cfg
        data = self._given.value
        if data is None:
            data = read_training_slices(cfg)
        elif data.slices.shape[-2:] != (cfg.size, cfg.size):
            raise MedsightError(
                f"pre-read slices are {data.slices.shape[-2:]}, not the configured size {cfg.size}"
            )
        train_cases, val_cases = split_cases(len(data.case_ids), cfg.val_fraction, cfg.seed)
        train_rows, val_rows = data.rows(train_cases), data.rows(val_cases)
        options = (cfg.superpixel_scale, cfg.superpixel_sigma, cfg.superpixel_min_size)
        sampler = EpisodeSampler(
            data.slices[train_rows], data.bodies[train_rows], np.random.default_rng(cfg.seed), *options
        )
        held_out = EpisodeSampler(
            data.slices[val_rows], data.bodies[val_rows],
            np.random.default_rng([cfg.seed, VALIDATION_STREAM]), *options,
        )  # fmt: skip
        episodes = [torch.from_numpy(a) for a in held_out.batch(cfg.val_episodes)]
        val = [
            tuple(a[i : i + self.episodes] for a in episodes)
            for i in range(0, cfg.val_episodes, self.episodes)
        ]
        self.model_kwargs = {"in_channels": int(data.slices.shape[1]), **cfg.model_kwargs}
        torch.manual_seed(cfg.seed)
        nets = shared_heads(self.heads, self.model_kwargs)
        # one head: the plain FewShotNet (its state_dict is what FewShotPredictor loads for one head)
        self.model = nets if len(self.heads) > 1 else nets[self.heads[0]]
        self.data = Shared({
            "sampler": sampler, "val": val, "sources": data.sources,
            "train_ids": [data.case_ids[c] for c in train_cases], "val_ids": [data.case_ids[c] for c in val_cases],
            "slices": len(train_rows), "val_slices": len(val_rows),
        })  # fmt: skip
        if world()[0] == 0 and cfg.progress:
            print(
                f"{cfg.method}: {len(train_cases)} images ({len(train_rows)} slices) train, "
                f"{len(val_cases)} give {cfg.val_episodes} validation episodes; {self.episodes} episodes per step"
            )

    def nets(self) -> dict:
        """Head -> network; the heads of ``fewshot-shared`` share one encoder."""
        return self.model if isinstance(self.model, torch.nn.ModuleDict) else {self.heads[0]: self.model}

    def make_batch(self, rng: np.random.Generator):
        sampler = self.data.value["sampler"]
        sampler.rng = rng
        return tuple(torch.from_numpy(a) for a in sampler.batch(self.episodes))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._parts: list[tuple[float, float]] = []

    def training_step(self, batch, batch_idx):
        from medsight.models.fewshot import episode_losses

        losses = episode_losses(self.nets(), batch, self.align_weights)
        self._parts.append((float(losses["segmentation"].detach()), float(losses["alignment"].detach())))
        return losses["loss"]

    def val_dataloader(self):
        return self.cases_loader(self.data.value["val"])

    def on_validation_epoch_start(self) -> None:
        self._dice: dict[str, list[float]] = {h: [] for h in self.heads}

    def validation_step(self, batch, batch_idx) -> None:
        from medsight.models.fewshot import episode_dice

        for head, dice in episode_dice(self.nets(), batch).items():
            self._dice[head].extend(dice.float().cpu().tolist())

    def on_validation_epoch_end(self) -> None:
        per_head = {h: float(np.mean(d)) for h, d in self._dice.items()}
        score = float(np.mean(list(per_head.values())))
        metrics = {"val_episode_dice": score}
        if len(per_head) > 1:
            metrics |= {f"val_dice_{h}": d for h, d in per_head.items()}
        parts = getattr(self, "_parts", None) or [(float("nan"), float("nan"))]
        seg, align = np.mean(parts, axis=0)
        metrics |= {"train_segmentation_loss": float(seg), "train_alignment_loss": float(align)}
        self.record_epoch(score, metrics)

    def checkpoint_payload(self) -> dict[str, Any]:
        from medsight.transforms.slices import NORMALISATION

        cfg, data = self.cfg, self.data.value
        single = len(self.heads) == 1
        return {
            "model": {
                "name": cfg.method, "kind": "fewshot-2d", "heads": list(self.heads), "kwargs": self.model_kwargs,
                **({"head": self.heads[0]} if single else {}),
            },
            "labels": {0: "background", 1: "foreground"},
            "preprocessing": {
                "normalisation": NORMALISATION, "channels": cfg.channels,
                "in_channels": self.model_kwargs["in_channels"], "slice_axis": cfg.slice_axis,
                "size": [cfg.size, cfg.size],
            },
            "episodes_per_step": self.episodes,
            "align_weights": self.align_weights,
            "data": {
                "sources": data["sources"], "case_ids": data["train_ids"], "val_ids": data["val_ids"],
                "slices": data["slices"], "val_slices": data["val_slices"], "val_episodes": cfg.val_episodes,
            },
        }  # fmt: skip

    def summary_of(self, payload: dict[str, Any]) -> dict[str, Any]:
        model, data = payload["model"], payload["data"]
        return {
            "method": model["name"], "head": model.get("head"), "heads": model["heads"],
            "scans": len(data["case_ids"]), "slices": data["slices"], "case_ids": data["case_ids"],
            "val_ids": data["val_ids"], "episodes_per_step": payload["episodes_per_step"],
        }  # fmt: skip


def train(cfg: FewShotConfig, data: TrainingSlices | None = None) -> dict[str, Any]:
    """Train through the loop (what ``medsight train --method fewshot-*`` runs); returns the summary:
    best validation episode Dice, epochs, steps, episodes, the training and validation images,
    ``best``/``last`` checkpoint paths."""
    task = FewShotTask(cfg, data)
    summary = fit(task, cfg)
    summary["steps"] = summary["epochs_run"] * cfg.steps_per_epoch
    summary["episodes"] = summary["steps"] * summary["episodes_per_step"]
    return summary


def predictor(path, **options):
    from medsight.tasks.fewshot_predict import FewShotPredictor

    return FewShotPredictor(path, **options)
