"""Few-shot segmentation: self-supervised episodic training (no labels) and support-set inference.

Training (:func:`train_fewshot`) reads only images, from any dataset layout medsight knows, a plain
folder of scans, or single files; every 2D image or every slice of a volume (along
``slice_axis``) becomes a training slice. Episodes come from superpixel pseudo-labels
(:class:`medsight.transforms.EpisodeSampler`). ``fewshot-shared`` trains the three heads together
on one encoder: each episode is embedded once and the heads' losses are summed, so the encoder gets
the whole budget instead of a third of it. The checkpoint records the head(s), the model
arguments, the intensity normalisation, the slice axis and the working size.

Preprocessing, identical at training and inference: each scan is normalised per channel over the
whole scan (clip to its 0.5-99.5 percentiles, then z-score: ``Preprocessing.normalise``), cut into
slices along ``slice_axis`` and each slice resized to ``size x size`` (bilinear); predictions are
resized back to the slice's own shape, so masks come out in the query's geometry.

Inference (:class:`FewShotPredictor`):

- 2D images: every support (image, mask) is one shot.
- Volumes, chunk protocol (Roy et al. 2020, SSL-ALPNet; they use 3 chunks, medsight's default is
  ``DEFAULT_CHUNKS`` = 12: on hippocampus cases outside the benchmark's queries, 1-shot Dice rose by
  1.7-7.3 points from 3 to 12 chunks and levelled off beyond): the support's labelled slice range
  ``[s0, s1]`` (``n = s1 - s0 + 1`` slices) is split into ``chunks`` equal chunks, chunk ``c``
  represented by its centre slice ``s0 + floor((c + 1/2) n / chunks)`` (the nearest labelled
  slice if that one happens to be empty). The query range is the same fraction of the query's
  slice axis as the support range is of the support's (``floor(s0 / N_s * N_q)`` to
  ``ceil((s1 + 1) / N_s * N_q) - 1``; published protocols take it from the query's own labels,
  which a user does not have; pass ``query_range`` to do that). Query slice ``q`` belongs to chunk
  ``floor((q - q0) chunks / n_q)`` and is segmented with that chunk's support slice. Slices
  outside the query range are background.
- ``neighbours`` (default ``DEFAULT_NEIGHBOURS`` = 1): chunk ``c`` is segmented with the support
  slices of chunks ``c - neighbours .. c + neighbours`` (those that exist), their foreground
  probabilities averaged. The chunk boundaries are only a guess at which support slice matches a
  query slice (the two scans differ in position and extent); the neighbours hedge that guess.
  ``neighbours=0`` is the published protocol.
- k shots (``combine``): ``"ensemble"`` (default) segments the query once per shot and averages the
  foreground probabilities; ``"average"`` averages the prototypes or conditioning weights of the
  shots into one (PANet, Roy et al.). With 5 shots the ensemble was better for the prototype head on
  hippocampus in the benchmark, by up to 7.8 Dice points (see the README).
- ``largest_component``: keep only the largest connected piece of the mask (26-connectivity in 3D),
  for structures known to be in one piece.
- Slice propagation inside one volume: the slices with a non-empty mask are the annotated ones;
  every other slice is segmented with the nearest annotated slice as support. Walking away from
  the annotations, once a slice comes out empty the slices beyond it stay empty
  (``stop_at_empty``): a structure does not reappear after a gap.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsight.errors import MedsightError
from medsight.scan import Scan, align_to, fill_non_finite

METHODS: dict[str, str] = {
    "fewshot-prototype": "prototype",
    "fewshot-local-prototype": "local-prototype",
    "fewshot-conditional": "conditional",
    "fewshot-shared": "all",  # the three heads trained together on one shared encoder
}
NORMALISATION = {"name": "percentile-zscore", "clip_percentiles": [0.5, 99.5], "per": "scan and channel"}
DEFAULT_CHUNKS = 12
DEFAULT_NEIGHBOURS = 1
COMBINE = ("ensemble", "average")
MIN_BODY_SHARE = 0.1  # slices with less non-background than this are skipped in training


# -- preprocessing shared by training and inference ------------------------------------------------
def normalise_intensity(array: np.ndarray) -> np.ndarray:
    """Per channel, over the whole scan: clip to the 0.5-99.5 percentiles, then z-score."""
    from medsight.engine.preprocess import Preprocessing

    return Preprocessing(target_spacing=None).normalise(array)


def to_slices(array: np.ndarray, slice_axis: int) -> np.ndarray:
    """``(C, X, Y[, Z])`` -> ``(S, C, H, W)``: a 2D image is one slice; a volume is cut along ``slice_axis``."""
    if array.ndim == 3:
        return array[None]
    return np.moveaxis(array, 1 + slice_axis, 0)


def from_slices(slices: np.ndarray, slice_axis: int, ndim: int) -> np.ndarray:
    """Inverse of :func:`to_slices` for ``(S, H, W)`` masks -> spatial ``(X, Y[, Z])``."""
    return slices[0] if ndim == 2 else np.moveaxis(slices, 0, slice_axis)


def resize(batch: np.ndarray, size: tuple[int, int]):
    """``(N, C, H, W)`` float array -> torch tensor ``(N, C, *size)`` (bilinear, antialiased when shrinking)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


# -- chunk protocol ------------------------------------------------------------------------------
def chunk_centres(lo: int, hi: int, chunks: int) -> list[int]:
    """Centre slice of each of ``chunks`` equal chunks of ``lo..hi`` (inclusive)."""
    n = hi - lo + 1
    return [lo + (2 * c + 1) * n // (2 * chunks) for c in range(chunks)]


def chunk_of(index: int, lo: int, hi: int, chunks: int) -> int:
    """Which chunk of ``lo..hi`` slice ``index`` falls in."""
    return (index - lo) * chunks // (hi - lo + 1)


def matching_range(support_range: tuple[int, int], support_slices: int, query_slices: int) -> tuple[int, int]:
    """The query slices at the same fraction of the slice axis as ``support_range`` of the support's."""
    lo = math.floor(support_range[0] / support_slices * query_slices)
    hi = math.ceil((support_range[1] + 1) / support_slices * query_slices) - 1
    return max(0, lo), min(query_slices - 1, max(hi, lo))


def chunk_plan(
    support_range: tuple[int, int], query_range: tuple[int, int], chunks: int = 3
) -> dict[int, int]:
    """Query slice -> support slice for one support volume under the chunk protocol."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    centres = chunk_centres(*support_range, chunks)
    q0, q1 = query_range
    return {q: centres[chunk_of(q, q0, q1, chunks)] for q in range(q0, q1 + 1)}


# -- training --------------------------------------------------------------------------------------
@dataclass
class FewShotConfig:
    data: str | list[str]  # dataset folder(s) in any layout, plain folder(s) of scans, or scan files
    out: str
    method: str = "fewshot-local-prototype"
    layout: str | None = None
    layout_options: dict[str, Any] = field(default_factory=dict)
    channels: list[int] | None = None  # image channels to use (default: all)
    slice_axis: int = 2  # spatial axis volumes are sliced along
    size: int = 64  # working size: every slice is resized to size x size
    batch_size: int = 8  # episodes per step
    lr: float = 1e-3
    max_steps: int = 100_000
    time_limit_minutes: float | None = None
    seed: int = 0
    include_ids: list[str] | None = None  # only these cases (default: all)
    exclude_ids: list[str] = field(default_factory=list)  # e.g. the evaluation cases
    superpixel_scale: float = 100.0
    superpixel_sigma: float = 0.8
    superpixel_min_size: int = 20  # pixels at working size
    align_weight: float | None = None  # PANet alignment loss weight; default 1 for prototype, else 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    log_every: int = 25
    overwrite: bool = False
    progress: bool = True


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

    array = select_channels(scan, channels)
    body = to_slices(body_mask(array)[None].astype(np.float32), slice_axis)
    slices = to_slices(normalise_intensity(array), slice_axis)
    keep = body.reshape(len(body), -1).mean(1) >= MIN_BODY_SHARE
    if not keep.any():
        return None, None
    images = resize(slices[keep], (size, size)).numpy()
    bodies = resize(body[keep], (size, size)).numpy()[:, 0] > 0.5
    return images, bodies


def _segmentation_loss(logits, target):
    """Cross-entropy plus soft Dice of the foreground (per episode, averaged)."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, target)
    p = logits.softmax(1)[:, 1]
    g = (target == 1).to(p.dtype)
    inter = (p * g).sum(dim=(1, 2))
    dice = (2 * inter + 1) / (p.sum(dim=(1, 2)) + g.sum(dim=(1, 2)) + 1)
    return ce + (1 - dice).mean()


@dataclass
class TrainingSlices:
    """Working-size training slices of every usable image, read once (they can be shared by the
    training of several heads on the same sources)."""

    slices: np.ndarray  # (S, C, size, size), normalised
    bodies: np.ndarray  # (S, size, size) bool
    case_ids: list[str]
    sources: list[str]


def read_training_slices(cfg: FewShotConfig) -> TrainingSlices:
    """Slice and normalise every image of ``cfg.data`` (labels are never opened)."""
    from tqdm import tqdm

    sources = [cfg.data] if isinstance(cfg.data, str | Path) else list(cfg.data)
    chunks_img, chunks_body, case_ids, channel_counts = [], [], [], set()
    excluded = set(cfg.exclude_ids)
    for source in sources:
        for case_id, scan in tqdm(
            iter_images(source, cfg.layout, cfg.layout_options),
            desc="reading images",
            disable=not cfg.progress,
            leave=False,
        ):
            if case_id in excluded or (cfg.include_ids is not None and case_id not in cfg.include_ids):
                continue
            images, bodies = training_slices(scan, cfg.channels, cfg.slice_axis, cfg.size)
            if images is None:
                continue
            channel_counts.add(images.shape[1])
            if len(channel_counts) > 1:
                raise MedsightError(
                    f"images have different channel counts {sorted(channel_counts)}; choose channels",
                    scan.path,
                )
            chunks_img.append(images)
            chunks_body.append(bodies)
            case_ids.append(case_id)
    if not chunks_img:
        raise MedsightError("no usable training images (all excluded, empty or background)", sources[0])
    return TrainingSlices(
        np.concatenate(chunks_img), np.concatenate(chunks_body), case_ids, [str(s) for s in sources]
    )


def shared_heads(heads, model_kwargs: dict):
    """One :class:`FewShotNet` per head, all holding the same encoder module (``ModuleDict``)."""
    from torch import nn

    from medsight.models.fewshot import FewShotNet

    nets = nn.ModuleDict({h: FewShotNet(head=h, **model_kwargs) for h in heads})
    for h in heads[1:]:
        nets[h].encoder = nets[heads[0]].encoder
    return nets


def train_fewshot(cfg: FewShotConfig, data: TrainingSlices | None = None) -> dict[str, Any]:
    """Self-supervised episodic training; writes ``model.pt``, ``metrics.csv`` and ``summary.json``
    into ``cfg.out`` and returns the summary. ``data``: slices already read by
    :func:`read_training_slices` with the same data settings (default: read them here)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from medsight.engine import checkpoint
    from medsight.engine.train import adamw
    from medsight.io import check_run_folder, write_text
    from medsight.losses import require_finite_loss
    from medsight.models.fewshot import HEADS
    from medsight.transforms import EpisodeSampler

    if cfg.method not in METHODS:
        raise MedsightError(f"unknown few-shot method '{cfg.method}'; choose one of {', '.join(METHODS)}")
    heads = HEADS if METHODS[cfg.method] == "all" else (METHODS[cfg.method],)
    out = check_run_folder(cfg.out)
    ckpt_path = out / "model.pt"
    if ckpt_path.exists() and not cfg.overwrite:
        raise MedsightError("holds a trained model already; pass --overwrite to replace it", out)
    start = time.perf_counter()
    if data is None:
        data = read_training_slices(cfg)
    elif data.slices.shape[-2:] != (cfg.size, cfg.size):
        raise MedsightError(
            f"pre-read slices are {data.slices.shape[-2:]}, not the configured size {cfg.size}"
        )
    slices, bodies, case_ids = data.slices, data.bodies, data.case_ids
    in_channels = int(slices.shape[1])

    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    sampler = EpisodeSampler(
        slices, bodies, rng, cfg.superpixel_scale, cfg.superpixel_sigma, cfg.superpixel_min_size
    )
    model_kwargs = {"in_channels": in_channels, **cfg.model_kwargs}
    nets = shared_heads(heads, model_kwargs)
    optimiser = adamw(nets.parameters(), cfg.lr)  # shared weights once
    align_weights = {
        h: cfg.align_weight if cfg.align_weight is not None else (1.0 if h == "prototype" else 0.0)
        for h in heads
    }
    budget = 60 * cfg.time_limit_minutes if cfg.time_limit_minutes else None
    train_start = time.perf_counter()
    history: list[dict[str, Any]] = []
    window: list[tuple[float, float, float]] = []
    size = (cfg.size, cfg.size)

    def progress_fraction(step: int) -> float:
        elapsed = time.perf_counter() - train_start
        return max(step / cfg.max_steps, elapsed / budget if budget else 0.0)

    bar = tqdm(total=cfg.max_steps, desc=cfg.method, disable=not cfg.progress, leave=False)
    step = 0
    nets.train()
    while step < cfg.max_steps and progress_fraction(step) < 1.0:
        lr = cfg.lr * (1 - min(progress_fraction(step), 0.99)) ** 0.9
        for group in optimiser.param_groups:
            group["lr"] = lr
        s_img, s_mask, q_img, q_mask = (torch.from_numpy(a) for a in sampler.batch(cfg.batch_size))
        b = s_img.shape[0]
        feats = nets[heads[0]].embed(torch.cat([s_img, q_img]))  # the encoder runs once for every head
        s_feats, q_feats = feats[:b], feats[b:]
        seg, align, loss = torch.zeros(()), torch.zeros(()), torch.zeros(())
        for h in heads:
            model = nets[h]
            logits = model.segment_features(
                q_feats, model.condition_from_features(s_feats, s_mask, b, 1), size
            )
            head_seg = _segmentation_loss(logits, q_mask)
            head_align = torch.zeros(())
            if align_weights[h] > 0:
                predicted = logits.argmax(1).detach()
                found = predicted.flatten(1).any(1)
                if found.any():
                    back_cond = model.condition_from_features(
                        q_feats[found], predicted[found], int(found.sum()), 1
                    )
                    back = model.segment_features(s_feats[found], back_cond, size)
                    head_align = F.cross_entropy(back, s_mask[found].long())
            loss = loss + head_seg + align_weights[h] * head_align
            seg, align = seg + head_seg / len(heads), align + head_align / len(heads)
        require_finite_loss(loss, 0, step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        window.append((float(loss.detach()), float(seg.detach()), float(align.detach())))
        bar.update(1)
        if step % cfg.log_every == 0:
            mean = np.mean(window, axis=0)
            window.clear()
            history.append({
                "step": step, "episodes": step * cfg.batch_size, "loss": round(float(mean[0]), 5),
                "segmentation_loss": round(float(mean[1]), 5), "alignment_loss": round(float(mean[2]), 5),
                "lr": lr, "seconds": round(time.perf_counter() - start, 1),
            })  # fmt: skip
            bar.set_postfix(loss=f"{mean[0]:.3f}")
    bar.close()
    if window:
        mean = np.mean(window, axis=0)
        history.append({
            "step": step, "episodes": step * cfg.batch_size, "loss": round(float(mean[0]), 5),
            "segmentation_loss": round(float(mean[1]), 5), "alignment_loss": round(float(mean[2]), 5),
            "lr": lr, "seconds": round(time.perf_counter() - start, 1),
        })  # fmt: skip

    config = asdict(cfg)
    config["data"] = data.sources
    single = len(heads) == 1
    payload = {
        "model": {
            "name": cfg.method,
            "kind": "fewshot-2d",
            "heads": list(heads),
            "kwargs": model_kwargs,
            **({"head": heads[0]} if single else {}),
        },
        "labels": {0: "background", 1: "foreground"},
        "preprocessing": {
            "normalisation": NORMALISATION,
            "channels": cfg.channels,
            "in_channels": in_channels,
            "slice_axis": cfg.slice_axis,
            "size": [cfg.size, cfg.size],
        },
        # one head: the plain FewShotNet's weights; several: every head's, the encoder under each
        "state_dict": nets[heads[0]].state_dict() if single else nets.state_dict(),
        "training": {"config": config, "steps": step, "history": history, "align_weights": align_weights},
        "data": {"sources": config["data"], "case_ids": case_ids, "slices": int(len(slices))},
    }
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save(ckpt_path, payload)
    import pandas as pd

    write_text(out / "metrics.csv", pd.DataFrame(history).to_csv(index=False), overwrite=True)
    summary = {
        "method": cfg.method,
        "head": heads[0] if single else None,
        "heads": list(heads),
        "checkpoint": str(ckpt_path),
        "steps": step,
        "episodes": step * cfg.batch_size,
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "scans": len(case_ids),
        "slices": int(len(slices)),
        "case_ids": case_ids,
    }
    write_text(out / "summary.json", json.dumps(summary, indent=2), overwrite=True)
    return summary


# -- inference -------------------------------------------------------------------------------------
def _binary_mask(image: Scan, mask: Scan) -> np.ndarray:
    """Spatial boolean mask of a support pair, checked against its image."""
    arr = align_to(
        mask, image, "mask", f"image {Path(image.path).name}" if image.path else "image", True
    ).array
    if arr.shape[0] > 1 and not all(np.array_equal(arr[0], arr[c]) for c in range(1, arr.shape[0])):
        raise MedsightError(f"mask has {arr.shape[0]} differing channels; expected one mask", mask.path)
    binary = arr[0] > 0
    if not binary.any():
        raise MedsightError("support mask is empty: mark the structure to segment", mask.path)
    return binary


@dataclass
class PreparedSupport:
    """A support set embedded once by :meth:`FewShotPredictor.prepare`."""

    ndim: int
    channels: int
    conditions: list[list[dict]]  # per chunk (a single one for 2D images): one per shot, or one averaged
    ranges: list[tuple[int, int, int]]  # per shot: labelled slice range lo, hi and slice count
    chunks: int
    paths: list


class FewShotPredictor:
    """Segment with a checkpoint from :func:`train_fewshot`; no training at query time."""

    def __init__(self, ckpt_path: str | Path, batch: int = 64, head: str | None = None):
        """``head``: which head of a ``fewshot-shared`` checkpoint to use (default: local-prototype)."""
        import torch

        from medsight.engine import checkpoint
        from medsight.models.fewshot import FewShotNet

        self.path = Path(ckpt_path)
        payload = checkpoint.load(self.path)
        if payload["model"].get("kind") != "fewshot-2d":
            raise MedsightError(
                f"is a '{payload['model']['name']}' checkpoint, not a few-shot one (train with fewshot-*)",
                self.path,
            )
        self.method = payload["model"]["name"]
        heads = payload["model"].get("heads") or [payload["model"]["head"]]
        kwargs = {k: v for k, v in payload["model"]["kwargs"].items() if k != "head"}
        if len(heads) == 1:
            if head not in (None, heads[0]):
                raise MedsightError(f"holds the '{heads[0]}' head only, not '{head}'", self.path)
            self.head = heads[0]
            self.model = FewShotNet(head=self.head, **kwargs)
            checkpoint.load_weights(self.model, payload, self.path)
        else:
            self.head = head or ("local-prototype" if "local-prototype" in heads else heads[0])
            if self.head not in heads:
                raise MedsightError(f"has no '{self.head}' head; it holds {', '.join(heads)}", self.path)
            nets = shared_heads(heads, kwargs)
            checkpoint.load_weights(nets, payload, self.path)
            self.model = nets[self.head]
        pre = payload["preprocessing"]
        self.size = tuple(pre["size"])
        self.slice_axis = int(pre["slice_axis"])
        self.in_channels = int(pre["in_channels"])
        self.channels = pre.get("channels")
        self.batch = int(batch)
        self.model.eval()
        self._torch = torch

    # -- input handling ------------------------------------------------------------------------
    def _image_array(self, scan: Scan) -> np.ndarray:
        """The channels the model reads; RGB/RGBA turns grey for a one-channel model."""
        array = fill_non_finite(scan).array
        if self.channels is not None and scan.channels > max(self.channels):
            array = array[list(self.channels)]
        elif array.shape[0] != self.in_channels:
            if self.in_channels == 1 and array.shape[0] in (3, 4):
                array = array[:3].astype(np.float32).mean(0, keepdims=True)
            else:
                raise MedsightError(
                    f"has {scan.channels} channel(s); this model reads {self.in_channels}", scan.path
                )
        return array

    def _working_slices(self, scan: Scan, only=None):
        """Normalised slices at working size, ``(S, C, h, w)`` tensor; ``only``: just these slice
        indices (the normalisation statistics are still those of the whole scan)."""
        slices = to_slices(normalise_intensity(self._image_array(scan)), self.slice_axis)
        return resize(slices if only is None else slices[list(only)], self.size)

    def _working_masks(self, masks: np.ndarray):
        """``(S, H, W)`` boolean -> soft masks at working size ``(S, h, w)``."""
        return resize(masks[:, None].astype(np.float32), self.size)[:, 0].clamp(0, 1)

    def _check_query(self, prepared: PreparedSupport, query: Scan) -> None:
        name = Path(prepared.paths[0]).name if prepared.paths and prepared.paths[0] else "the support"
        if prepared.channels != query.channels:
            raise MedsightError(
                f"query has {query.channels} channel(s) but support image {name} has {prepared.channels}",
                query.path,
            )
        if prepared.ndim != query.ndim:
            raise MedsightError(
                f"query is {query.ndim}D but support image {name} is {prepared.ndim}D", query.path
            )

    def _probabilities(self, queries, conditions: list[dict]):
        """Foreground probability ``(Q, h, w)`` of working-size queries, averaged over
        ``conditions`` (shots, neighbouring chunks); each query is embedded once for all of them."""
        torch = self._torch
        out = []
        with torch.no_grad():
            for start in range(0, len(queries), self.batch):
                batch = queries[start : start + self.batch]
                feats = self.model.embed(batch)
                out.append(
                    sum(
                        self.model.segment_features(feats, cond, batch.shape[-2:]).softmax(1)[:, 1]
                        for cond in conditions
                    )
                    / len(conditions)
                )
        return torch.cat(out)

    def _condition(self, images, masks):
        with self._torch.no_grad():
            return self.model.condition(images[None], masks[None])

    def _restore(self, probabilities, shape: tuple[int, int]) -> np.ndarray:
        """Working-size foreground probabilities ``(Q, h, w)`` -> boolean masks ``(Q, H, W)``."""
        import torch.nn.functional as F

        full = F.interpolate(probabilities[:, None], size=shape, mode="bilinear", align_corners=False)[:, 0]
        return full.numpy() > 0.5

    def _as_scan(self, query: Scan, mask: np.ndarray, largest_component: bool = False) -> Scan:
        if largest_component:
            from medsight.engine.infer import largest_components

            mask = largest_components(mask.astype(np.uint8)) > 0
        return Scan(mask[None].astype(np.uint8), query.affine.copy(), {"fewshot": self.method}, query.path)

    # -- public --------------------------------------------------------------------------------
    def prepare(
        self, support: list[tuple[Scan, Scan]], chunks: int = DEFAULT_CHUNKS, combine: str = "ensemble"
    ) -> PreparedSupport:
        """Embed a support set once; :meth:`segment` then serves any number of queries with it.

        Under the chunk protocol a chunk's conditioning depends on the support alone (its centre
        slices), so the whole support side is query-independent."""
        if not support:
            raise MedsightError("no support given: pass at least one (image, mask) pair")
        if chunks < 1:
            raise MedsightError(f"chunks must be >= 1, got {chunks}")
        if combine not in COMBINE:
            raise MedsightError(f"unknown k-shot combination '{combine}'; choose one of {', '.join(COMBINE)}")
        masks = [_binary_mask(image, mask) for image, mask in support]
        ndims, channels = {image.ndim for image, _ in support}, {image.channels for image, _ in support}
        if len(ndims) > 1 or len(channels) > 1:
            raise MedsightError(
                "support images differ in dimensionality or channel count", support[0][0].path
            )
        ndim, n_channels = ndims.pop(), channels.pop()
        paths = [image.path for image, _ in support]

        def conditions(images, shot_masks) -> list[dict]:
            if combine == "average":
                return [self._condition(images, shot_masks)]
            return [self._condition(images[i : i + 1], shot_masks[i : i + 1]) for i in range(len(images))]

        if ndim == 2:
            images = self._torch.cat([self._working_slices(image) for image, _ in support])
            cond = conditions(images, self._working_masks(np.stack(masks)))
            return PreparedSupport(ndim, n_channels, [cond], [], 1, paths)

        axis = self.slice_axis
        ranges, shots = [], []
        for (image, _), mask in zip(support, masks, strict=True):
            mask_slices = to_slices(mask[None], axis)[:, 0]
            labelled = np.flatnonzero(mask_slices.reshape(len(mask_slices), -1).any(1))
            lo, hi = int(labelled[0]), int(labelled[-1])
            # the nearest labelled slice if a chunk centre happens to be empty
            centres = [int(labelled[np.argmin(np.abs(labelled - c))]) for c in chunk_centres(lo, hi, chunks)]
            ranges.append((lo, hi, image.spatial_shape[axis]))
            # only the centre slices are resized: supports of any in-plane shape stack as shots
            shots.append((self._working_slices(image, centres), self._working_masks(mask_slices[centres])))
        per_chunk = [
            conditions(
                self._torch.stack([slices[c] for slices, _ in shots]),
                self._torch.stack([masks[c] for _, masks in shots]),
            )
            for c in range(chunks)
        ]
        return PreparedSupport(ndim, n_channels, per_chunk, ranges, chunks, paths)

    def segment(
        self,
        support: list[tuple[Scan, Scan]] | PreparedSupport,
        query: Scan,
        chunks: int = DEFAULT_CHUNKS,
        query_range: tuple[int, int] | None = None,
        combine: str = "ensemble",
        largest_component: bool = False,
        neighbours: int = DEFAULT_NEIGHBOURS,
    ) -> Scan:
        """Mask (uint8 0/1) of the support's structure in ``query``, with the query's affine.

        ``support``: (image, mask) pairs, or a :meth:`prepare`-d support (then ``chunks`` and
        ``combine`` are the ones it was prepared with)."""
        if neighbours < 0:
            raise MedsightError(f"neighbours must be >= 0, got {neighbours}")
        prepared = support if isinstance(support, PreparedSupport) else self.prepare(support, chunks, combine)
        self._check_query(prepared, query)
        if query.ndim == 2:
            probabilities = self._probabilities(self._working_slices(query), prepared.conditions[0])
            return self._as_scan(
                query, self._restore(probabilities, query.spatial_shape)[0], largest_component
            )

        axis = self.slice_axis
        n_query = query.spatial_shape[axis]
        if query_range is None:
            fractions = [matching_range((lo, hi), n, n_query) for lo, hi, n in prepared.ranges]
            q0 = int(round(np.mean([f[0] for f in fractions])))
            q1 = int(round(np.mean([f[1] for f in fractions])))
        else:
            q0, q1 = (int(v) for v in query_range)
            if not 0 <= q0 <= q1 < n_query:
                raise MedsightError(f"query_range {query_range} outside slices 0..{n_query - 1}", query.path)
        in_plane = tuple(n for a, n in enumerate(query.spatial_shape) if a != axis)
        out = np.zeros((n_query, *in_plane), dtype=bool)
        queries = self._working_slices(query, range(q0, q1 + 1))  # slices outside the range stay background
        for c in range(prepared.chunks):
            members = [q for q in range(q0, q1 + 1) if chunk_of(q, q0, q1, prepared.chunks) == c]
            if members:
                nearby = prepared.conditions[max(0, c - neighbours) : c + neighbours + 1]
                conds = [cond for chunk in nearby for cond in chunk]
                out[members] = self._restore(
                    self._probabilities(queries[[q - q0 for q in members]], conds), in_plane
                )
        return self._as_scan(query, from_slices(out, axis, 3), largest_component)

    def propagate(
        self, volume: Scan, mask: Scan, stop_at_empty: bool = True, largest_component: bool = False
    ) -> Scan:
        """Complete a partly annotated volume: slices with a non-empty mask are the supports."""
        binary = _binary_mask(volume, mask)
        if volume.ndim != 3:
            raise MedsightError("slice propagation needs a volume, not a 2D image", volume.path)
        axis = self.slice_axis
        mask_slices = to_slices(binary[None], axis)[:, 0]
        annotated = np.flatnonzero(mask_slices.reshape(len(mask_slices), -1).any(1))
        slices = self._working_slices(volume)
        n = len(mask_slices)
        nearest = {
            q: int(annotated[np.argmin(np.abs(annotated - q))]) for q in range(n) if q not in set(annotated)
        }
        out = mask_slices.copy()
        working_masks = self._working_masks(mask_slices[annotated])
        for k, s in enumerate(annotated):
            members = [q for q, src in nearest.items() if src == s]
            if not members:
                continue
            cond = self._condition(slices[s : s + 1], working_masks[k : k + 1])
            out[members] = self._restore(self._probabilities(slices[members], [cond]), mask_slices.shape[1:])
        if stop_at_empty:
            # nearest first, so the neighbour towards the support is settled before q
            for q in sorted(nearest, key=lambda q: abs(q - nearest[q])):
                towards_support = q - 1 if q > nearest[q] else q + 1
                if towards_support in nearest and not out[towards_support].any():
                    out[q] = False
        return self._as_scan(volume, from_slices(out, axis, 3), largest_component)
