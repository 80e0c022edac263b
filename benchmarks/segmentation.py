"""Segmentation benchmark: unet2d vs context25d vs unet3d under one wall-clock training budget.

    python benchmarks/segmentation.py                       # hippocampus + BraTS from ../shared/data
    python benchmarks/segmentation.py --quick               # smoke run on a phantom (seconds)
    python benchmarks/segmentation.py --spread-only --spread-methods unet2d   # seeds 1, 2 of unet2d

Besides the main runs (training seed = split seed), ``--spread-methods`` are trained again with each of
``--spread-seeds`` on the same split, for the spread over seeds and the median. Results merge into
the JSON on disk at the end, so methods can be run in separate processes side by side.

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
    from medsight.evaluate import segmentation_metrics
    from medsight.models.summary import count_parameters, flops_per_volume, slices_first
    from medsight.tasks.segmentation import SegmentationConfig, train

    # Only options `medsight train` has, with its defaults unless given: batch and patch sizes come
    # from the same plan (engine/plan.py) as on the command line.
    cfg = SegmentationConfig(
        method=method, data=str(data), out=str(out / f"{method}-seed{args.seed if seed is None else seed}"),
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
        seed=args.seed if seed is None else seed, split_seed=args.seed, patience=args.patience,
        time_limit=args.time_limit, max_val_cases=args.max_val_cases, overwrite=True,
        augmentation=args.augmentation, class_weights=args.class_weights, mirror_axes=args.mirror_axes,
        ema_decay=args.ema_decay, lr_warmup=args.lr_warmup, slice_planes=args.slice_planes,
        progress=not args.quiet,
    )  # fmt: skip
    summary = train(cfg)
    dataset = open_dataset(data)
    predictor = Predictor(summary["best"], tta=bool(args.mirror_axes))
    names = {v: n for v, n in predictor.labels.items() if v}
    from medsight.datasets import split_dataset

    val_ids = split_dataset(dataset, cfg.val_fraction, cfg.split_seed)[
        1
    ]  # all of it, not the per-epoch subset
    rows, times, plain_dice = [], [], []
    peak_rss_reset()
    for cid in val_ids:
        image, label = dataset.load_case(dataset.case(cid))
        t0 = time.perf_counter()
        mask, _ = predictor.predict(image)
        times.append(time.perf_counter() - t0)
        rows.append(segmentation_metrics(mask.array[0], label.array[0], image.spacing, names))
        if args.mirror_axes:  # the same network without test-time mirroring
            predictor.tta = False
            single = segmentation_metrics(
                predictor.predict(image)[0].array[0], label.array[0], image.spacing, names
            )
            plain_dice.append(np.mean([single[n]["dice"] for n in names.values()]))
            predictor.tta = True
    peak = peak_rss_mb()
    dice = {n: float(np.mean([r[n]["dice"] for r in rows])) for n in names.values()}
    hd95 = {n: float(np.nanmean([r[n]["hd95_mm"] for r in rows])) for n in names.values()}
    shape = np.median(
        [dataset.load_case(dataset.case(c))[0].spatial_shape for c in val_ids[:10]], axis=0
    ).astype(int)
    kind = predictor.kind
    return {
        "mean_dice": float(np.mean(list(dice.values()))),
        "dice": dice,
        "hd95_mm": hd95,
        **(
            {"mirror_axes": args.mirror_axes, "mean_dice_without_tta": float(np.mean(plain_dice))}
            if args.mirror_axes
            else {}
        ),
        "train_seconds": summary["train_seconds"],
        "epochs_run": summary["epochs_run"],
        "infer_seconds_per_volume": statistics.median(times),
        "peak_mem_mb": round(peak, 1),
        "params": count_parameters(predictor.model),
        "gflops_per_volume": sum(  # one pass per slicing plane
            flops_per_volume(
                method,
                predictor.model,
                slices_first(shape, axis),
                1,
                predictor.slices if kind == "2.5d" else None,
            )
            for axis in predictor.slice_axes
        )
        / 1e9,
        "volume_shape_for_flops": [int(s) for s in shape],
        "slice_axis": None if kind == "3d" else predictor.pre.slice_axis,
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
    for method, spread in results.get("seed_spread", {}).items():
        by_seed = ", ".join(f"seed {k}: {v:.4f}" for k, v in spread["mean_dice_by_seed"].items())
        lines.append(
            f"\n{method} over training seeds ({spread['budget_minutes'] or '-'} min each, same split): {by_seed}; "
            f"median {spread['median']:.4f}, std {spread['std']:.4f}, range {spread['range']:.4f}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    from medsight.engine.tta import parse_axes
    from medsight.tasks.segmentation import SegmentationConfig

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED / "hippocampus")
    parser.add_argument("--brats", type=Path, default=SHARED / "brats2015")
    parser.add_argument("--methods", default="unet2d,context25d,unet3d")
    parser.add_argument("--time-limit", type=float, default=15.0, help="training budget per method, minutes")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--steps-per-epoch", type=int, default=SegmentationConfig.steps_per_epoch)
    parser.add_argument("--batch-size", type=int, default=None, help="default: planned from the data")
    parser.add_argument(
        "--patience", type=int, default=200, help="as `medsight train --patience`; 200: no early stop"
    )
    parser.add_argument("--max-val-cases", type=int, default=10, help="validation cases per epoch")
    parser.add_argument("--augmentation", default="spatial", choices=["none", "intensity", "spatial"])
    parser.add_argument("--class-weights", default="auto", choices=["auto", "none"])
    parser.add_argument(
        "--mirror-axes",
        type=parse_axes,
        default=[],
        help="scan axes to mirror in training and at test time (0: left-right on the hippocampus)",
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=SegmentationConfig.ema_decay,
        help="decay of the weight average that is validated and scored (0: the weights as trained)",
    )
    parser.add_argument(
        "--lr-warmup",
        type=float,
        default=SegmentationConfig.lr_warmup,
        help="fraction of the steps over which the learning rate rises (0: none)",
    )
    parser.add_argument(
        "--slice-planes",
        type=int,
        default=SegmentationConfig.slice_planes,
        help="slicing planes of unet2d/context25d: 1 or 3",
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed, and training seed of the main runs")
    parser.add_argument(
        "--spread-seeds", default="1,2", help="extra training seeds, for the spread over seeds"
    )
    parser.add_argument(
        "--spread-methods", default="context25d", help="methods trained with every spread seed"
    )
    parser.add_argument(
        "--spread-only",
        action="store_true",
        help="skip the main runs: only add spread seeds to main runs already in --out",
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
        args.brats, args.time_limit, args.epochs, args.steps_per_epoch, args.batch_size = None, None, 1, 2, 2
        args.spread_seeds = args.spread_seeds if args.spread_only else ""
    name = "segmentation-quick" if args.quick else "segmentation"
    methods = args.methods.split(",")
    spread_seeds = [int(s) for s in args.spread_seeds.split(",") if s]
    main_runs = {} if args.spread_only else {m: run_method(m, args.data, runs, args) for m in methods}
    brats = {}
    if main_runs and args.brats and args.brats.is_dir():
        case = sorted(p for p in (args.brats / "validation").iterdir() if p.is_dir())[0]
        brats = {
            m: {**brats_inference(r["checkpoint"], case), "case": case.name} for m, r in main_runs.items()
        }

    on_disk = _read_results(args.out / f"{name}.json")["methods"]
    spread_methods = [m for m in args.spread_methods.split(",") if m] if spread_seeds else []
    missing = [m for m in spread_methods if m not in main_runs and m not in on_disk]
    if missing:
        raise SystemExit(f"no main run of {', '.join(missing)} in {args.out / name}.json to add seeds to")
    # The other seeds train on the main run's split and budget.
    spread = {
        m: {str(seed): run_method(m, args.data, runs / "spread", args, seed=seed)["mean_dice"] for seed in spread_seeds}
        for m in spread_methods
    }  # fmt: skip

    # Merged into what is on disk just before writing, so methods can run in parallel processes.
    results = _read_results(args.out / f"{name}.json")
    if main_runs:
        results.update(
            {
                "dataset": str(args.data),
                "budget_minutes": args.time_limit,
                "seed": args.seed,
                "ema_decay": args.ema_decay,
                "lr_warmup": args.lr_warmup,
                "slice_planes": args.slice_planes,
            }
        )
    results["methods"].update(main_runs)
    results["brats"].update(brats)
    for method in main_runs:  # a new main run makes the earlier seeds' runs stale
        results["seed_spread"].pop(method, None)
    for method, scores_by_seed in spread.items():
        by_seed = {
            str(results["seed"]): results["methods"][method]["mean_dice"],
            **results["seed_spread"].get(method, {}).get("mean_dice_by_seed", {}),
            **scores_by_seed,
        }
        scores = list(by_seed.values())
        results["seed_spread"][method] = {
            "budget_minutes": args.time_limit, "mean_dice_by_seed": by_seed, "median": float(np.median(scores)),
            "mean": float(np.mean(scores)), "std": float(np.std(scores)), "range": float(np.ptp(scores)),
        }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{name}.md").write_text(table(results) + "\n")
    print(table(results))
    return results


def _read_results(path: Path) -> dict:
    results = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("methods", "brats", "seed_spread"):
        results.setdefault(key, {})
    spread = results["seed_spread"]
    if "method" in spread:  # the older layout: one method's spread at the top level, no median
        spread["median"] = float(np.median(list(spread["mean_dice_by_seed"].values())))
        results["seed_spread"] = {spread.pop("method"): spread}
    case = results.pop("brats_case", None)
    for figures in results["brats"].values():
        figures.setdefault("case", case)
    return results


if __name__ == "__main__":
    main()
