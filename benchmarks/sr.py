"""Super-resolution benchmark (issue 25): interpolation, plain, semantic and semantic-shuffled side by side.

    OMP_NUM_THREADS=1 python benchmarks/sr.py --settings hippocampus/inplane-x2,hippocampus/thick-x4
    OMP_NUM_THREADS=1 python benchmarks/sr.py --settings monuseg/inplane-x4,brats/inplane-x4
    python benchmarks/sr.py --quick            # smoke run on a 3D phantom (about a minute)

Settings: hippocampus in-plane x2 and thick x4 (the 160/40 split of benchmarks/segmentation.py,
``split_dataset`` with seed 0), MoNuSeg x4 (RGB tiles, their own Train/Val folders and real
sentences), BraTS FLAIR in-plane x4 (three cases train, one validates: an MSD-layout view of symlinks
made in the runs folder). Every configuration trains through ``medsight.tasks.sr.train`` with an
``SRConfig`` (the object `medsight sr train` builds from its options) and is scored through
``SRPredictor`` (what `medsight sr predict` runs) on the held-out cases at their original
intensities: PSNR/SSIM over the image and inside the foreground (``psnr_fg``/``ssim_fg``: the
labels > 0, the brain mask for BraTS). Budgets are steps, not minutes, so configurations compare
fairly. Task-based (hippocampus thick x4): a segmentation network trained on the high-resolution
training scans (`medsight train`'s API, a short budget) segments the interpolated and super-resolved
validation scans; mean Dice against the true labels, the high-resolution Dice as the ceiling.

Results merge into ``benchmarks/results/sr.json`` (``sr-quick.json`` for --quick); two processes
with different ``--settings`` may run at once (the file is updated under a lock).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CONFIGS = ("interpolation", "plain", "semantic", "semantic-shuffled")
SETTINGS = {
    # name: (dataset, mode, scale, sr epochs, steps per epoch, caption epochs, caption steps, crop)
    "hippocampus/inplane-x2": ("hippocampus", "inplane", 2, 150, 40, 4, 30, 32),
    "hippocampus/thick-x4": ("hippocampus", "thick", 4, 150, 40, 4, 30, 32),
    "monuseg/inplane-x4": ("monuseg", "inplane", 4, 30, 30, 3, 30, 64),
    "brats/inplane-x4": ("brats", "inplane", 4, 100, 30, 2, 30, 64),
}
QUICK = {"phantom/inplane-x2": ("phantom", "inplane", 2, 2, 10, 2, 10, 32)}


@contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` (a file in the runs folder) while the results file is updated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def brats_view(runs: Path, shared: Path) -> Path:
    """FLAIR + tumour labels of the four BraTS cases as an MSD dataset of symlinks (3 train, 1 val)."""
    out = runs / "brats-flair"
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    cases = sorted(p for p in (shared / "brats2015").glob("*/*") if p.is_dir())
    for case in cases:
        for sub, name in (("imagesTr", "Flair_subtrMeanDivStd"), ("labelsTr", "OTMultiClass")):
            link = out / sub / f"{case.name}.nii.gz"
            if not link.exists():
                link.symlink_to(case / f"{name}.nii.gz")
    labels = {"0": "background", "1": "necrosis", "2": "oedema", "3": "non-enhancing", "4": "enhancing"}
    entries = [
        {"image": f"./imagesTr/{c.name}.nii.gz", "label": f"./labelsTr/{c.name}.nii.gz"} for c in cases
    ]
    data = {"name": "brats-flair", "modality": {"0": "FLAIR"}, "labels": labels, "training": entries}
    data.update(numTraining=len(entries), test=[])
    (out / "dataset.json").write_text(json.dumps(data, indent=1))
    return out


def dataset_of(name: str, runs: Path, shared: Path) -> Path:
    if name == "phantom":
        from medsight.datasets.phantom import write_phantom_dataset

        return write_phantom_dataset(runs / "phantom", 5, dim=3, seed=0, overwrite=True)
    if name == "brats":
        return brats_view(runs, shared)
    return shared / name


def foreground(dataset, case, image, label) -> np.ndarray:
    from medsight import io

    mask = case.images[0].resolve().parent / "brainmask.nii.gz"
    if mask.exists():
        return io.read(mask).array[0] > 0
    return label.array[0] > 0


def val_pairs(data: Path, mode: str, scale: int, val_fraction: float):
    """Held-out (low, high, foreground, label) at original intensities, cropped to a multiple of the scale."""
    from medsight.datasets import open_dataset, split_dataset
    from medsight.transforms import degrade as dg
    from medsight.transforms.degrade import DegradeParams

    dataset = open_dataset(data)
    _, val_ids = split_dataset(dataset, val_fraction, 0)
    profile = "gaussian" if mode == "inplane" else "box"
    out = []
    for cid in val_ids:
        case = dataset.case(cid)
        image, label = dataset.load_case(case)
        params = DegradeParams(mode, scale, profile, 1.0, 2)
        low, high = dg.make_pair(image.with_array(image.array.astype(np.float32)), params)
        axes = dg.decimated_axes(image.ndim, mode, 2)
        fg = dg.crop_to_multiple(image.with_array(foreground(dataset, case, image, label)[None]), scale, axes)
        lab = dg.crop_to_multiple(label, scale, axes)
        out.append((cid, low, high, fg.array[0], lab.array[0]))
    return out


def scores(pred, high, fg) -> dict:
    from medsight.evaluate import image_metrics, masked_image_metrics

    channel = 0 if high.channels > 1 else None
    p = pred.array.astype(np.float64) if channel == 0 else pred.array[0].astype(np.float64)
    r = high.array.astype(np.float64) if channel == 0 else high.array[0].astype(np.float64)
    data_range = float(r.max() - r.min())
    return {
        **image_metrics(p, r, data_range=data_range, channel_axis=channel),
        **masked_image_metrics(p, r, fg, data_range=data_range, channel_axis=channel),
    }


def summarise(rows: list[dict], seconds: list[float], **extra) -> dict:
    keys = ("psnr", "ssim", "psnr_fg", "ssim_fg")
    return {
        **{k: float(np.mean([r[k] for r in rows])) for k in keys},
        "seconds_per_volume": float(statistics.median(seconds)),
        **extra,
    }


def evaluate_interpolation(pairs, mode, scale) -> tuple[dict, dict]:
    from medsight.tasks.sr import interpolate_scan

    best, outputs = None, {}
    for method in ("bilinear", "bicubic"):
        rows, seconds, preds = [], [], {}
        for cid, low, high, fg, _ in pairs:
            t0 = time.perf_counter()
            pred = interpolate_scan(low, scale, mode, 2, method)
            seconds.append(time.perf_counter() - t0)
            rows.append(scores(pred, high, fg))
            preds[cid] = pred
        result = summarise(rows, seconds, params=0, interpolation=method)
        if best is None or result["psnr"] > best["psnr"]:
            best, outputs = result, preds
    return best, outputs


def evaluate_model(checkpoint: str, pairs) -> tuple[dict, dict]:
    from medsight.models.summary import count_parameters
    from medsight.tasks.sr import SRPredictor

    predictor = SRPredictor(checkpoint, device="cpu")
    rows, seconds, preds = [], [], {}
    for cid, low, high, fg, _ in pairs:
        t0 = time.perf_counter()
        pred = predictor.predict(low)
        seconds.append(time.perf_counter() - t0)
        rows.append(scores(pred, high, fg))
        preds[cid] = pred
    caption = predictor.payload.get("caption") or {}
    extra = {"params": count_parameters(predictor.model), "gflops_per_volume": gflops(predictor, pairs[0][1])}
    if caption:
        extra["caption"] = {k: caption[k] for k in ("sentences", "shuffled", "scores")}
    return summarise(rows, seconds, **extra), preds


def gflops(predictor, low) -> float:
    """FLOPs of super-resolving one validation volume (every plane through the network) / 1e9."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        predictor.predict(low)
    return counter.get_total_flops() / 1e9


def budget_of(setting: tuple, args) -> tuple[int, int, int, int]:
    """(SR epochs, steps per epoch, caption epochs, caption steps): the setting's, or the overrides."""
    _, _, _, epochs, steps, cap_epochs, cap_steps, _ = setting
    return (
        args.epochs or epochs,
        args.steps_per_epoch or steps,
        args.caption_epochs or cap_epochs,
        args.steps_per_epoch or cap_steps,
    )


def train_config(config: str, data: Path, setting: tuple, runs: Path, args) -> tuple[str, dict]:
    from medsight.tasks.sr import SRConfig, train

    _, mode, scale, *_, crop = setting
    epochs, steps, cap_epochs, cap_steps = budget_of(setting, args)
    cfg = SRConfig(
        data=str(data), out=str(runs / config), mode=mode, scale=scale,
        method="plain" if config == "plain" else "semantic", shuffle_sentences=config == "semantic-shuffled",
        epochs=epochs, steps_per_epoch=steps, caption_epochs=cap_epochs, caption_steps=cap_steps,
        crop=crop, batch_size=args.batch_size, seed=0, overwrite=True, progress=not args.quiet,
        val_fraction=args.val_fraction(data), device="cpu",
    )  # fmt: skip
    t0 = time.perf_counter()
    summary = train(cfg)
    budget = {
        "epochs": epochs, "steps_per_epoch": steps, "batch_size": args.batch_size, "crop": crop,
        "caption_epochs": cap_epochs if config != "plain" else 0, "caption_steps": cap_steps,
        "epochs_run": summary["epochs_run"], "train_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    return summary["best"], budget


def task_dice(data: Path, outputs: dict, pairs, runs: Path, args) -> dict:
    """Segmentation network trained on HR scans, applied to HR / interpolated / super-resolved scans."""
    from medsight.engine.checkpoint import load as load_checkpoint
    from medsight.engine.infer import Predictor
    from medsight.tasks.segmentation import SegmentationConfig
    from medsight.tasks.segmentation import train as train_seg

    if args.seg_checkpoint:
        checkpoint, budget = args.seg_checkpoint, {"checkpoint": str(args.seg_checkpoint)}
    else:
        cfg = SegmentationConfig(
            method="context25d", data=str(data), out=str(runs / "segmentation"), epochs=args.seg_epochs,
            steps_per_epoch=args.seg_steps, seed=0, split_seed=0, overwrite=True, progress=not args.quiet,
            max_val_cases=8, device="cpu",
        )  # fmt: skip
        checkpoint = train_seg(cfg)["best"]
        budget = {"method": "context25d", "epochs": args.seg_epochs, "steps": args.seg_steps}
    predictor, payload = Predictor(checkpoint, device="cpu"), load_checkpoint(checkpoint)
    # a network that saw a validation scan would flatter every configuration
    seen = set(payload["data"]["train_ids"]) & {cid for cid, *_ in pairs}
    if seen:
        raise SystemExit(f"{checkpoint} was trained on super-resolution validation cases: {sorted(seen)}")
    budget.update(method=payload["model"]["name"], epochs_run=payload["training"]["epoch"])
    classes = [v for v in predictor.labels if v]

    def dice(scans: dict) -> float:
        from medsight.tasks.segmentation import dice_per_class

        values = []
        for cid, _, _, _, label in pairs:
            mask = predictor.predict(scans[cid])[0].array[0]
            values.append(np.mean(dice_per_class(mask, label, len(classes) + 1)))
        return float(np.mean(values))

    out = {name: dice(scans) for name, scans in outputs.items()}
    out["high-resolution"] = dice({cid: high for cid, _, high, _, _ in pairs})
    out["segmentation_budget"] = budget
    return out


def run_setting(name: str, setting: tuple, args) -> dict:
    runs = args.runs / name.replace("/", "-")
    data = dataset_of(setting[0], args.runs, args.shared)
    pairs = val_pairs(data, setting[1], setting[2], args.val_fraction(data))
    results, outputs = {}, {}
    results["interpolation"], outputs["interpolation"] = evaluate_interpolation(pairs, setting[1], setting[2])
    for config in CONFIGS[1:]:
        checkpoint, budget = train_config(config, data, setting, runs, args)
        results[config], outputs[config] = evaluate_model(checkpoint, pairs)
        results[config]["budget"] = budget
        print(f"{name} {config}: PSNR {results[config]['psnr']:.2f} dB", flush=True)
    if name == args.task_setting:
        dice = task_dice(data, outputs, pairs, runs, args)
        for config in CONFIGS:
            results[config]["task_dice"] = dice[config]
        results["high-resolution"] = {"task_dice": dice["high-resolution"]}
        results["segmentation_budget"] = dice["segmentation_budget"]
    results["val_ids"] = [cid for cid, *_ in pairs]
    figure(name, pairs, outputs, args)
    return results


def figure(name: str, pairs, outputs: dict, args) -> None:
    from medsight.report.sr import comparison_png

    cid, low, high, fg, _ = pairs[0]
    panels = {c: outputs[c][cid] for c in CONFIGS if c in outputs}
    path = args.figures / f"sr-{name.replace('/', '-')}.png"
    comparison_png(low, panels, high, path, mask=fg, title=f"{name}: {cid}")


def table(results: dict) -> str:
    lines = [
        "| setting | configuration | PSNR | SSIM | PSNR fg | SSIM fg | task Dice | s/volume | params | GFLOPs/volume "
        "| budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, configs in results.get("results", {}).items():
        for config in CONFIGS:
            r = configs.get(config)
            if r is None:
                continue
            b = r.get("budget")
            budget = (
                f"{b['epochs_run']}x{b['steps_per_epoch']} steps"
                + (f" + caption {b['caption_epochs']}x{b['caption_steps']}" if b["caption_epochs"] else "")
                if b
                else r.get("interpolation", "")
            )
            dice = f"{r['task_dice']:.3f}" if "task_dice" in r else "-"
            flops = f"{r['gflops_per_volume']:.2f}" if "gflops_per_volume" in r else "-"
            lines.append(
                f"| {setting} | {config} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['psnr_fg']:.2f} | "
                f"{r['ssim_fg']:.4f} | {dice} | {r['seconds_per_volume']:.3f} | {r['params']:,} | {flops} | {budget} |"
            )
        if "high-resolution" in configs:
            lines.append(
                f"| {setting} | high-resolution (ceiling) | - | - | - | - | "
                f"{configs['high-resolution']['task_dice']:.3f} | - | - | - | - |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "benchmark-sr")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=None, help="SR epochs (default: each setting's)")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="SR and caption steps per epoch")
    parser.add_argument("--caption-epochs", type=int, default=None, help="default: each setting's")
    parser.add_argument(
        "--seg-checkpoint",
        type=Path,
        default=None,
        help="task-based score: a segmentation model trained on the high-resolution training scans "
        "(e.g. benchmarks/segmentation.py's context25d best.pt); default: train one for --seg-epochs",
    )
    parser.add_argument("--seg-epochs", type=int, default=5)
    parser.add_argument("--seg-steps", type=int, default=30)
    parser.add_argument("--task-setting", default="hippocampus/thick-x4")
    parser.add_argument("--quick", action="store_true", help="a 3D phantom, tiny budgets")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    settings = SETTINGS
    name = "sr"
    if args.quick:
        settings, name = QUICK, "sr-quick"
        args.settings, args.task_setting = ",".join(QUICK), "phantom/inplane-x2"
        args.seg_epochs, args.seg_steps, args.batch_size = 1, 5, 8
    # BraTS: 3 train, 1 validates; elsewhere the segmentation benchmark's 80/20 (or the layout's split)
    args.val_fraction = lambda data: 0.25 if data.name == "brats-flair" else 0.2
    args.figures = args.out / "figures"
    args.figures.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    for setting in args.settings.split(","):
        result = run_setting(setting, settings[setting], args)
        with locked(args.runs / f"{name}.lock"):
            results = json.loads(path.read_text()) if path.exists() else {}
            results.setdefault("results", {})[setting] = result
            results["notes"] = NOTES
            path.write_text(json.dumps(results, indent=1) + "\n")
    results = json.loads(path.read_text())
    (args.out / f"{name}.md").write_text(table(results))
    write_page(results, args.out, name)
    return results


def write_page(results: dict, out: Path, name: str) -> Path:
    """``<out>/figures/<name>.html``: the table and every setting's comparison figure."""
    from medsight.report.sr import figures_page

    figures = out / "figures"
    sections = {s: figures / f"sr-{s.replace('/', '-')}.png" for s in results.get("results", {})}
    sections = {s: p for s, p in sections.items() if p.exists()}
    return figures_page(figures / f"{name}.html", "Super-resolution benchmark", sections, table(results))


NOTES = (
    "Each configuration's training budget (optimiser steps, below the issue's 20 min per configuration on a "
    "shared 2-core CPU) is in its entry. PSNR/SSIM at the original intensities, data range of the "
    "reference; foreground = labels > 0 (hippocampus, MoNuSeg nuclei) or the brain mask (BraTS)."
)


if __name__ == "__main__":
    main()
