"""Metrics tables: segmentation overlap and surface distances, and image quality.

Segmentation metrics come from MONAI (``monai.metrics``: ``compute_dice``, ``compute_iou``, and the
surface distances behind ``compute_hausdorff_distance`` / ``compute_average_surface_distance`` /
``compute_surface_dice``) on one-hot masks, one label at a time, with the voxel spacing of the
reference so that distances are in millimetres:

- ``dice``, ``iou``: overlap.
- ``hd95_mm``: 95th percentile of the symmetric surface distances (MONAI's percentile Hausdorff).
- ``assd_mm``: average symmetric surface distance.
- ``nsd``: normalised surface Dice (Seidlitz et al. 2022): the fraction of both boundaries lying
  within ``tolerance_mm`` of the other boundary.
- ``ref_voxels``, ``pred_voxels``, ``overlap_voxels``: voxel counts.

Empty masks (MONAI would return NaN for some of these and inf for others; medsight never calls the
distance functions on an empty mask and applies these conventions instead):

=====================  =====  =====  =====  ========  ========
case                   dice   iou    nsd    hd95_mm   assd_mm
=====================  =====  =====  =====  ========  ========
both empty             1      1      1      0         0
only one empty         0      0      0      NaN       NaN
=====================  =====  =====  =====  ========  ========

A NaN distance means "undefined" (there is no surface to measure from): it is written as ``NaN`` in
``metrics.csv`` and ``null`` in ``summary.json``, left out of means, standard deviations and
medians, and counted in each summary row's ``n_nan``. Summaries use the
population standard deviation (ddof=0).

Image quality (``kind="image"``): ``psnr`` (dB) and ``ssim`` from scikit-image. ``data_range`` is
the reference's max - min unless given. SSIM uses the settings of Wang et al. 2004 (Gaussian window,
sigma 1.5, population covariance), so images need at least 11 pixels along every axis. PSNR of two
identical images is +inf: it is counted in ``n_inf``, left out of the mean and written as ``null``.
With a folder of foreground masks (``mask_dir``, paired by case id like the references), also
``psnr_fg``/``ssim_fg`` inside the mask (:func:`masked_image_metrics`, the same data range).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsight.errors import MedsightError
from medsight.scan import align_to

SEG_METRICS = ("dice", "iou", "hd95_mm", "assd_mm", "nsd")
COUNT_COLUMNS = ("ref_voxels", "pred_voxels", "overlap_voxels")
IMAGE_METRICS = ("psnr", "ssim")
MASKED_IMAGE_METRICS = ("psnr_fg", "ssim_fg")
SSIM_SIGMA = 1.5


# -- segmentation -----------------------------------------------------------------------------
def _one_label_tensor(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float64))[None, None]


def _surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float):
    """HD95, ASSD and NSD (mm) for two non-empty binary masks, from one pass of MONAI's surface distances.

    ``compute_hausdorff_distance``, ``compute_average_surface_distance`` and ``compute_surface_dice``
    each recompute the same edges and distance transforms; this takes them once from
    ``get_edge_surface_distance`` and reduces them the way those three functions do (a test checks
    the results agree), which makes a multi-label 240x240x155 case about three times faster.
    """
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    with warnings.catch_warnings():
        # MONAI 1.5 warns about its own internal use of a deprecated argument; nothing for us to act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
        _, (pred_to_ref, ref_to_pred), _ = get_edge_surface_distance(
            torch.from_numpy(np.ascontiguousarray(pred)),
            torch.from_numpy(np.ascontiguousarray(ref)),
            spacing=[float(s) for s in spacing],  # MONAI wants one element type
            symmetric=True,
        )
    both = torch.cat([pred_to_ref, ref_to_pred]).double()
    hd95 = max(torch.quantile(d.double(), 0.95).item() for d in (pred_to_ref, ref_to_pred))
    nsd = (both <= float(tolerance_mm)).double().mean().item()
    return float(hd95), float(both.mean().item()), float(nsd)


def segmentation_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    labels: dict[int, str] | None = None,
    tolerance_mm: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Per-label metrics for two integer label maps of the same spatial shape (2D or 3D, no channel axis).

    ``labels`` maps label value to name (default: every non-zero value in ``ref``, named by its
    value); ``spacing`` is the voxel size in mm per axis (default 1). See the module docstring for
    the metrics and the empty-mask conventions.
    """
    from monai.metrics import compute_dice, compute_iou

    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if ref.ndim not in (2, 3):
        raise ValueError(f"label maps must be 2D or 3D spatial arrays, got shape {ref.shape}")
    spacing = [1.0] * ref.ndim if spacing is None else [float(s) for s in spacing]
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {spacing} does not match a {ref.ndim}D label map")
    if labels is None:
        labels = {int(v): str(int(v)) for v in np.unique(ref) if v != 0}

    results: dict[str, dict[str, float]] = {}
    for value, name in labels.items():
        p, r = pred == value, ref == value
        n_pred, n_ref, n_overlap = int(p.sum()), int(r.sum()), int((p & r).sum())
        row: dict[str, float] = {}
        if n_pred == 0 and n_ref == 0:
            row.update(dice=1.0, iou=1.0, hd95_mm=0.0, assd_mm=0.0, nsd=1.0)
        elif n_pred == 0 or n_ref == 0:
            row.update(dice=0.0, iou=0.0, hd95_mm=math.nan, assd_mm=math.nan, nsd=0.0)
        else:
            pt, rt = _one_label_tensor(p), _one_label_tensor(r)
            row["dice"] = float(compute_dice(pt, rt, include_background=True).item())
            row["iou"] = float(compute_iou(pt, rt, include_background=True).item())
            row["hd95_mm"], row["assd_mm"], row["nsd"] = _surface_metrics(p, r, spacing, tolerance_mm)
        row.update(ref_voxels=n_ref, pred_voxels=n_pred, overlap_voxels=n_overlap)
        results[name] = row
    return results


# -- image quality ----------------------------------------------------------------------------
def image_metrics(
    pred: np.ndarray, ref: np.ndarray, data_range: float | None = None, channel_axis: int | None = None
) -> dict[str, float]:
    """PSNR (dB) and SSIM of ``pred`` against ``ref`` (2D or 3D; ``channel_axis`` for multi-channel)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if data_range is None:
        data_range = float(ref.max() - ref.min())
    if not data_range > 0:
        raise ValueError("the reference is constant; pass data_range explicitly")
    channel = None if channel_axis is None else channel_axis % ref.ndim
    spatial = [n for axis, n in enumerate(ref.shape) if axis != channel]
    window = 2 * int(3.5 * SSIM_SIGMA + 0.5) + 1  # the Gaussian window scikit-image builds (truncate 3.5)
    if min(spatial) < window:
        raise ValueError(f"SSIM needs at least {window} pixels along every axis, got shape {ref.shape}")
    with np.errstate(divide="ignore"):  # identical images: PSNR is +inf, not a warning
        psnr = float(peak_signal_noise_ratio(ref, pred, data_range=data_range))
    ssim = float(
        structural_similarity(
            ref,
            pred,
            data_range=data_range,
            channel_axis=channel_axis,
            gaussian_weights=True,
            sigma=SSIM_SIGMA,
            use_sample_covariance=False,
        )
    )
    return {"psnr": psnr, "ssim": ssim}


def masked_image_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    data_range: float,
    channel_axis: int | None = None,
) -> dict[str, float]:
    """``psnr_fg`` (dB) and ``ssim_fg`` of ``pred`` against ``ref`` inside a foreground ``mask``.

    ``mask`` has the spatial shape (no channel axis); ``data_range`` is required, because the
    foreground's own range says nothing about the scale of the errors. PSNR uses the mean squared
    error over the mask's voxels (and all channels). SSIM is scikit-image's SSIM map (the same
    Gaussian-window settings as :func:`image_metrics`) averaged over the mask, after the map's border
    of ``(window - 1) / 2`` voxels is dropped as scikit-image drops it for its mean, so an all-True
    mask gives exactly :func:`image_metrics`'s SSIM.
    """
    from skimage.metrics import structural_similarity

    pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    channel = None if channel_axis is None else channel_axis % ref.ndim
    p = pred if channel is None else np.moveaxis(pred, channel, -1)
    r = ref if channel is None else np.moveaxis(ref, channel, -1)
    spatial = r.shape if channel is None else r.shape[:-1]
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != spatial:
        raise ValueError(f"mask shape {mask.shape} differs from the spatial shape {spatial}")
    pad = int(3.5 * SSIM_SIGMA + 0.5)  # half the Gaussian window scikit-image builds
    inner = np.zeros_like(mask)
    inner[tuple(slice(pad, n - pad) for n in spatial)] = True
    inner &= mask
    if not inner.any():
        raise ValueError(f"the foreground mask is empty (or lies within {pad} voxels of the border)")
    mse = float(np.mean((r[mask] - p[mask]) ** 2))
    psnr = math.inf if mse == 0 else float(10 * np.log10(data_range**2 / mse))
    _, ssim_map = structural_similarity(
        r,
        p,
        data_range=data_range,
        channel_axis=None if channel is None else -1,
        gaussian_weights=True,
        sigma=SSIM_SIGMA,
        use_sample_covariance=False,
        full=True,
    )
    if channel is not None:
        ssim_map = ssim_map.mean(axis=-1)
    return {"psnr_fg": psnr, "ssim_fg": float(ssim_map[inner].mean())}


# -- folders ----------------------------------------------------------------------------------
def _case_files(folder: Path) -> dict[str, Path]:
    """Case id -> file (or DICOM folder) for every readable entry of ``folder``."""
    from medsight.io import FORMATS, case_name, suffix_of

    if not folder.is_dir():
        raise MedsightError("not a folder", folder)
    known = {s for fmt in FORMATS.values() for s in fmt.suffixes}
    cases: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if not any(p.is_file() for p in entry.iterdir()):
                continue
            case = entry.name
        elif suffix_of(entry) in known:
            case = case_name(entry)
        else:
            continue
        if case in cases:
            raise MedsightError(f"two files for case '{case}': {cases[case].name} and {entry.name}", folder)
        cases[case] = entry
    if not cases:
        raise MedsightError("no readable scans in this folder", folder)
    return cases


def _label_names_from_dataset_json(ref_dir: Path) -> dict[int, str]:
    """Label names from an MSD or nnU-Net ``dataset.json`` beside or above the reference folder."""
    for candidate in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json"):
        if not candidate.is_file():
            continue
        try:
            raw = json.loads(candidate.read_text()).get("labels", {})
            names: dict[int, str] = {}
            for key, value in raw.items():
                if isinstance(value, int | str) and str(key).lstrip("-").isdigit():
                    names[int(key)] = str(value)  # MSD: {"1": "Anterior"}
                elif isinstance(value, int):
                    names[value] = str(key)  # nnU-Net v2: {"Anterior": 1}
            return names
        except (ValueError, AttributeError):
            return {}
    return {}


def _spatial_labels(scan, path: Path) -> np.ndarray:
    if scan.channels != 1:
        raise MedsightError(f"a label map must have one channel, this one has {scan.channels}", path)
    arr = scan.array[0]
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise MedsightError("a label map must hold integer values", path)
        arr = arr.astype(np.int64)
    return arr


@dataclass
class EvaluationResult:
    """Per-case rows and their summary.

    ``cases``: one row per (case, label) with the metrics and voxel counts. ``summary``: one row per
    (label, metric) with mean, std, median (NaN and inf left out), n (finite values), n_nan, n_inf.
    """

    cases: Any  # pandas.DataFrame
    kind: str = "seg"
    labels: dict[int, str] = field(default_factory=dict)
    tolerance_mm: float | None = None
    pred_dir: Path | None = None
    ref_dir: Path | None = None
    files: dict[str, dict[str, Path]] = field(default_factory=dict)  # case -> {"pred": ..., "ref": ...}
    ignored_predictions: list[str] = field(default_factory=list)

    @property
    def metric_names(self) -> tuple[str, ...]:
        if self.kind == "seg":
            return SEG_METRICS
        masked = all(m in self.cases.columns for m in MASKED_IMAGE_METRICS)
        return IMAGE_METRICS + (MASKED_IMAGE_METRICS if masked else ())

    @property
    def summary(self):
        import pandas as pd

        rows = []
        for label, group in self.cases.groupby("label", sort=False):
            for metric in self.metric_names:
                values = group[metric].to_numpy(dtype=float)
                finite = values[np.isfinite(values)]
                rows.append(
                    {
                        "label": label,
                        "metric": metric,
                        "mean": float(finite.mean()) if finite.size else math.nan,
                        "std": float(finite.std()) if finite.size else math.nan,
                        "median": float(np.median(finite)) if finite.size else math.nan,
                        "n": int(finite.size),
                        "n_nan": int(np.isnan(values).sum()),
                        "n_inf": int(np.isinf(values).sum()),
                    }
                )
        return pd.DataFrame(rows, columns=["label", "metric", "mean", "std", "median", "n", "n_nan", "n_inf"])

    def case_scores(self, metric: str | None = None):
        """One score per case (mean over labels, NaN-aware), for ranking best and worst cases."""
        metric = metric or ("dice" if self.kind == "seg" else "ssim")
        return self.cases.groupby("case", sort=False)[metric].mean()

    def summary_dict(self) -> dict[str, Any]:
        def clean(x):
            return x if isinstance(x, int) or math.isfinite(x) else None

        table: dict[str, dict[str, dict[str, Any]]] = {}
        for row in self.summary.to_dict("records"):
            table.setdefault(row["label"], {})[row["metric"]] = {
                k: clean(row[k]) for k in ("mean", "std", "median", "n", "n_nan", "n_inf")
            }
        out: dict[str, Any] = {
            "kind": self.kind,
            "n_cases": int(self.cases["case"].nunique()),
            "pred_dir": str(self.pred_dir) if self.pred_dir else None,
            "ref_dir": str(self.ref_dir) if self.ref_dir else None,
        }
        if self.kind == "seg":
            out["labels"] = {str(k): v for k, v in self.labels.items()}
            out["tolerance_mm"] = self.tolerance_mm
            out["conventions"] = (
                "both masks empty: dice=iou=nsd=1, hd95=assd=0; only one empty: dice=iou=nsd=0, "
                "hd95=assd=null (undefined, counted in n_nan, left out of mean/std/median); std is ddof=0"
            )
        else:
            out["conventions"] = (
                "psnr of identical images is +inf: counted in n_inf, left out of mean/std/median"
            )
        out["ignored_predictions"] = self.ignored_predictions
        out["summary"] = table
        return out

    def summary_markdown(self) -> str:
        def fmt(x: float) -> str:
            return "n/a" if not math.isfinite(x) else f"{x:.4f}"

        lines = [
            "| label | metric | mean | std | median | n | NaN | inf |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in self.summary.to_dict("records"):
            lines.append(
                f"| {row['label']} | {row['metric']} | {fmt(row['mean'])} | {fmt(row['std'])} | "
                f"{fmt(row['median'])} | {row['n']} | {row['n_nan']} | {row['n_inf']} |"
            )
        head = f"# Evaluation ({self.kind}), {self.cases['case'].nunique()} cases\n\n"
        if self.kind == "seg":
            head += (
                f"Distances in mm; NSD tolerance {self.tolerance_mm} mm. NaN: undefined (one mask empty).\n\n"
            )
        return head + "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
        """Write ``metrics.csv``, ``summary.json`` and ``summary.md`` (each atomically)."""
        from medsight.io import atomic_path, check_writable, write_text

        out_dir = Path(out_dir)
        paths = {name: out_dir / name for name in ("metrics.csv", "summary.json", "summary.md")}
        for path in paths.values():  # refuse before writing anything, so a refusal leaves no mix
            check_writable(path, overwrite)
        with atomic_path(paths["metrics.csv"], overwrite) as tmp:
            self.cases.to_csv(tmp, index=False, na_rep="NaN", float_format="%.6g")
        write_text(paths["summary.json"], json.dumps(self.summary_dict(), indent=2) + "\n", overwrite)
        write_text(paths["summary.md"], self.summary_markdown(), overwrite)
        return paths


def _image_case_metrics(pred, ref, pred_path: Path, mask=None) -> dict[str, float]:
    channel_axis = 0 if ref.channels > 1 else None
    p = pred.array if channel_axis == 0 else pred.array[0]
    r = ref.array if channel_axis == 0 else ref.array[0]
    try:
        out = image_metrics(p, r, channel_axis=channel_axis)
        if mask is not None:
            if mask.spatial_shape != ref.spatial_shape:
                raise ValueError(
                    f"mask shape {list(mask.spatial_shape)} differs from {list(ref.spatial_shape)}"
                )
            data_range = float(np.max(r) - np.min(r))
            out |= masked_image_metrics(p, r, mask.array[0] > 0, data_range, channel_axis=channel_axis)
        return out
    except ValueError as err:
        raise MedsightError(str(err), pred_path) from err


def _require_pairs(refs: dict, preds: dict, masks: dict, pred_dir: Path, mask_dir) -> None:
    """Refuse a reference case without a prediction, or (with ``mask_dir``) without a foreground mask."""
    no_mask = [c for c in refs if mask_dir is not None and c not in masks]
    if no_mask:
        raise MedsightError(f"no foreground mask for case(s): {', '.join(no_mask[:10])}", mask_dir)
    missing = [c for c in refs if c not in preds]
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise MedsightError(f"no prediction for {len(missing)} reference case(s): {shown}", pred_dir)


def _labels_of_references(refs: dict[str, Path], ref_dir: Path, progress: bool) -> dict[int, str]:
    """Every non-zero value in the references, named from a ``dataset.json`` when there is one (a first
    pass over the references; their volumes are not kept in memory)."""
    from tqdm import tqdm

    from medsight import io

    values: set[int] = set()
    for ref_path in tqdm(refs.values(), desc="find labels", disable=not progress, unit="case"):
        values.update(int(v) for v in np.unique(_spatial_labels(io.read(ref_path), ref_path)) if v != 0)
    names = _label_names_from_dataset_json(ref_dir)
    return {v: names.get(v, str(v)) for v in sorted(values)}


def _case_rows(case: str, pred_path: Path, ref_path: Path, mask_path, kind: str, labels, tolerance_mm: float):
    """The table rows of one case: one per label (``seg``) or one for the image (``image``)."""
    from medsight import io

    ref, pred = io.read(ref_path), io.read(pred_path)
    pred = align_to(pred, ref, "prediction", "reference", cover=True)
    if kind == "image":
        if pred.channels != ref.channels:
            raise MedsightError(f"{pred.channels} channels, the reference has {ref.channels}", pred_path)
        mask = io.read(mask_path) if mask_path is not None else None
        return [{"case": case, "label": "image", **_image_case_metrics(pred, ref, pred_path, mask)}]
    per_label = segmentation_metrics(
        _spatial_labels(pred, pred_path), _spatial_labels(ref, ref_path), ref.spacing, labels, tolerance_mm
    )
    return [
        {"case": case, "label": name, "label_value": value, **per_label[name]}
        for value, name in labels.items()
    ]


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    labels: dict[int, str] | None = None,
    tolerance_mm: float = 1.0,
    progress: bool = True,
    kind: str = "seg",
    mask_dir: str | Path | None = None,
) -> EvaluationResult:
    """Evaluate every reference case against the prediction with the same case id.

    Case id = file name without its format suffix (a DICOM folder: its name). Every reference needs a
    prediction (missing ones raise a MedsightError listing them); extra predictions are ignored with a
    warning. Each pair must share shape and geometry. Spacing comes from the reference. ``labels``
    defaults to every non-zero value found in the references, named from a ``dataset.json`` beside or
    above ``ref_dir`` when there is one.
    """
    import pandas as pd
    from tqdm import tqdm

    if kind not in ("seg", "image"):
        raise MedsightError(f"kind must be 'seg' or 'image', got '{kind}'")
    if mask_dir is not None and kind != "image":
        raise MedsightError("foreground masks (--mask) go with --kind image")
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds, refs = _case_files(pred_dir), _case_files(ref_dir)
    masks = _case_files(Path(mask_dir)) if mask_dir is not None else {}
    _require_pairs(refs, preds, masks, pred_dir, mask_dir)
    extra = sorted(c for c in preds if c not in refs)
    if extra:
        warnings.warn(
            f"{pred_dir}: ignoring {len(extra)} prediction(s) without a reference: {', '.join(extra[:10])}",
            stacklevel=2,
        )
    if kind == "seg" and labels is None:
        labels = _labels_of_references(refs, ref_dir, progress)
    if kind == "seg" and not labels:
        raise MedsightError("the references hold no non-zero label; nothing to evaluate", ref_dir)

    rows = []
    files = {}
    for case, ref_path in tqdm(refs.items(), desc="evaluate", disable=not progress, unit="case"):
        rows += _case_rows(case, preds[case], ref_path, masks.get(case), kind, labels, tolerance_mm)
        files[case] = {"pred": preds[case], "ref": ref_path}

    columns = ["case", "label"] + (
        ["label_value", *SEG_METRICS, *COUNT_COLUMNS]
        if kind == "seg"
        else list(IMAGE_METRICS) + (list(MASKED_IMAGE_METRICS) if masks else [])
    )
    return EvaluationResult(
        cases=pd.DataFrame(rows, columns=columns),
        kind=kind,
        labels=dict(labels or {}),
        tolerance_mm=tolerance_mm if kind == "seg" else None,
        pred_dir=pred_dir,
        ref_dir=ref_dir,
        files=files,
        ignored_predictions=extra,
    )
