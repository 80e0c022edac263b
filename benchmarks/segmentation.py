"""Segmentation benchmark: unet2d vs context25d vs unet3d under one wall-clock training budget.

    python benchmarks/segmentation.py                       # hippocampus + BraTS from ../shared/data
    python benchmarks/segmentation.py --quick               # smoke run on a phantom (seconds)

Trains each method on the hippocampus training split (seeded 80/20 split of the 200 cases), segments
every validation volume, and reports per-class Dice and HD95 (mm), training time, median inference
time per volume, peak resident memory during inference, parameters and GFLOPs per volume. Then it
times inference of each architecture on one full-size BraTS volume (240x240x155) for speed and
memory (weights do not change the cost, so the hippocampus-trained network is reused on one channel).
Writes benchmarks/results/segmentation.json and segmentation.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def peak_rss_reset() -> None:
    """Reset the kernel's resident-memory high-water mark (VmHWM) for this process."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_method(method: str, data: Path, out: Path, args, seed: int | None = None) -> dict:
    from medsight.datasets import open_dataset
    from medsight.engine.infer import Predictor
    from medsight.engine.train import TrainConfig, train
    from medsight.evaluate import segmentation_metrics
    from medsight.models.summary import count_parameters, flops_per_volume

    cfg = TrainConfig(
        method=method, data=str(data), out=str(out / f"{method}-seed{args.seed if seed is None else seed}"),
        epochs=args.epochs, iters_per_epoch=args.iters, batch_size=args.batch_size if method != "unet3d" else 2,
        seed=args.seed if seed is None else seed, split_seed=args.seed, patience=args.epochs,
        time_limit_minutes=args.minutes, max_val_cases=args.val_cases_per_epoch, overwrite=True,
        augmentation=args.augmentation, class_weights=args.class_weights,
        progress=not args.quiet,
    )  # fmt: skip
    summary = train(cfg)
    dataset = open_dataset(data)
    predictor = Predictor(summary["best"])
    names = {v: n for v, n in predictor.labels.items() if v}
    from medsight.datasets import split_dataset

    val_ids = split_dataset(dataset, cfg.val_fraction, cfg.split_seed)[
        1
    ]  # all of it, not the per-epoch subset
    rows, times = [], []
    peak_rss_reset()
    for cid in val_ids:
        image, label = dataset.load_case(dataset.case(cid))
        t0 = time.perf_counter()
        mask, _ = predictor.predict(image)
        times.append(time.perf_counter() - t0)
        rows.append(segmentation_metrics(mask.array[0], label.array[0], image.spacing, names))
    peak = peak_rss_mb()
    dice = {n: float(np.mean([r[n]["dice"] for r in rows])) for n in names.values()}
    hd95 = {n: float(np.nanmean([r[n]["hd95_mm"] for r in rows])) for n in names.values()}
    shape = np.median(
        [dataset.load_case(dataset.case(c))[0].spatial_shape for c in val_ids[:10]], axis=0
    ).astype(int)
    kind = predictor.kind
    volume = (shape[2], shape[0], shape[1])  # flops helpers slide along the first axis
    return {
        "mean_dice": float(np.mean(list(dice.values()))),
        "dice": dice,
        "hd95_mm": hd95,
        "train_seconds": summary["train_seconds"],
        "epochs_run": summary["epochs_run"],
        "infer_seconds_per_volume": statistics.median(times),
        "peak_mem_mb": round(peak, 1),
        "params": count_parameters(predictor.model),
        "gflops_per_volume": flops_per_volume(
            method, predictor.model, volume, 1, predictor.slices if kind == "2.5d" else None
        )
        / 1e9,
        "volume_shape_for_flops": [int(s) for s in shape],
        "val_ids": val_ids,
        "checkpoint": summary["best"],
    }


def brats_inference(checkpoint: str, brats_case: Path) -> dict:
    from medsight import io
    from medsight.engine.infer import Predictor

    scan = io.read(brats_case / "Flair_subtrMeanDivStd.nii.gz")
    predictor = Predictor(checkpoint)
    predictor.predict(_small_crop(scan))  # warm-up on a small crop: first-call allocations are not the cost
    peak_rss_reset()
    t0 = time.perf_counter()
    mask, _ = predictor.predict(scan)
    return {
        "seconds": time.perf_counter() - t0,
        "peak_mem_mb": round(peak_rss_mb(), 1),
        "shape": list(mask.spatial_shape),
    }


def _small_crop(scan):  # noqa: N802 - a tiny helper, named for what it returns
    return scan.with_array(scan.array[:, :48, :48, :16])


def table(results: dict) -> str:
    lines = [
        "| method | mean Dice | Dice per class | HD95 mm per class | train s (epochs) | infer s/volume | peak MB | params | GFLOPs/volume | BraTS s | BraTS peak MB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, r in results["methods"].items():
        dice = ", ".join(f"{k} {v:.3f}" for k, v in r["dice"].items())
        hd = ", ".join(f"{k} {v:.2f}" for k, v in r["hd95_mm"].items())
        b = results.get("brats", {}).get(method, {})
        lines.append(
            f"| {method} | {r['mean_dice']:.4f} | {dice} | {hd} | {r['train_seconds']:.0f} ({r['epochs_run']}) | "
            f"{r['infer_seconds_per_volume']:.3f} | {r['peak_mem_mb']:.0f} | {r['params']:,} | {r['gflops_per_volume']:.3f} | "
            f"{b.get('seconds', float('nan')):.1f} | {b.get('peak_mem_mb', float('nan')):.0f} |"
        )
    spread = results.get("seed_spread")
    if spread:
        by_seed = ", ".join(f"seed {k}: {v:.4f}" for k, v in spread["mean_dice_by_seed"].items())
        lines.append(
            f"\ncontext25d over training seeds ({spread['budget_minutes']:g} min each, same split): {by_seed}; "
            f"mean {spread['mean']:.4f}, std {spread['std']:.4f}, range {spread['range']:.4f}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED / "hippocampus")
    parser.add_argument("--brats", type=Path, default=SHARED / "brats2015")
    parser.add_argument("--methods", default="unet2d,context25d,unet3d")
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget per method")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-cases-per-epoch", type=int, default=10)
    parser.add_argument("--augmentation", default="spatial", choices=["none", "intensity", "spatial"])
    parser.add_argument("--class-weights", default="auto", choices=["auto", "none"])
    parser.add_argument("--seed", type=int, default=0, help="split seed, and training seed of the main runs")
    parser.add_argument(
        "--spread-seeds", default="1,2", help="extra context25d training seeds for the spread"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--runs", type=Path, default=None, help="where checkpoints go (default: a temp folder)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run on a phantom; writes segmentation-quick.json"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; one keeps timings steady when other work shares the 2 cores",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    runs = args.runs or Path(tempfile.mkdtemp(prefix="medsight-bench-"))
    if args.quick:
        from medsight.datasets.phantom import write_phantom_dataset

        args.data = write_phantom_dataset(runs / "phantom", 5, dim=3, seed=0)
        args.brats, args.minutes, args.epochs, args.iters, args.batch_size = None, None, 1, 2, 2
    results = {
        "dataset": str(args.data),
        "budget_minutes": args.minutes,
        "seed": args.seed,
        "methods": {},
        "brats": {},
    }
    for method in args.methods.split(","):
        results["methods"][method] = run_method(method, args.data, runs, args)
    if args.spread_seeds and not args.quick and "context25d" in results["methods"]:
        # The main run is the spread's first seed; the others train on the same split and budget.
        runs_by_seed = {args.seed: results["methods"]["context25d"]["mean_dice"]}
        for seed in (int(s) for s in args.spread_seeds.split(",")):
            runs_by_seed[seed] = run_method("context25d", args.data, runs / "spread", args, seed=seed)[
                "mean_dice"
            ]
        scores = list(runs_by_seed.values())
        results["seed_spread"] = {
            "method": "context25d",
            "budget_minutes": args.minutes,
            "mean_dice_by_seed": runs_by_seed,
            "mean": float(np.mean(scores)),
            "std": float(np.std(scores)),
            "range": float(np.ptp(scores)),
        }
    if args.brats and args.brats.is_dir():
        case = sorted(p for p in (args.brats / "validation").iterdir() if p.is_dir())[0]
        results["brats_case"] = case.name
        for method, r in results["methods"].items():
            results["brats"][method] = brats_inference(r["checkpoint"], case)
    name = "segmentation-quick" if args.quick else "segmentation"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{name}.md").write_text(table(results) + "\n")
    print(table(results))
    if "seed_spread" in results:
        print(json.dumps(results["seed_spread"], indent=2))
    return results


if __name__ == "__main__":
    main()
