"""Self-supervised pretraining from imaging-plane geometry: what it is worth with 1-10 labelled volumes.

    python benchmarks/pretrain.py --stage pretrain --pretexts planes,position          # two processes side
    python benchmarks/pretrain.py --stage pretrain --pretexts planes+position,genesis  # by side, then
    python benchmarks/pretrain.py --stage finetune --shots 1,5 --draws 0,1,2
    python benchmarks/pretrain.py --stage brats          # the pretext alone on a second anatomy
    python benchmarks/pretrain.py --stage collect        # (every stage also collects) -> results/ssl.json
    python benchmarks/pretrain.py --quick                # smoke run on a phantom (a test runs it)

Hippocampus, the segmentation benchmark's split (seed 0: 160 training, 40 validation volumes).
Pretraining (``medsight pretrain`` = :class:`PretrainTask`) sees the 160 training volumes' images and
no label; its held-out volumes are the 40 validation ones, on which the pretext accuracy is measured
(angle and offset of the predicted intersection lines, position error) at its best epoch. Fine-tuning
(``medsight train --method unet2d --init ... --labeled-cases N --seed DRAW``) keeps N labelled
training volumes, drawn by the draw's seed, the same draw for every configuration (so differences
are paired); ``scratch`` is the same run without ``--init``. Each fine-tuned network is scored on all
40 validation volumes: mean Dice and HD95 over the two classes, and the whole-hippocampus Dice
(both classes as one) that the few-shot benchmark reports. Budgets are optimiser steps, not minutes.
Every unit's figures are kept in ``--work`` (one JSON per run); any stage rebuilds the results file
from all of them, so stages can run in separate processes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ("scratch", "planes", "position", "planes+position", "genesis")
PRETEXTS = CONFIGS[1:]
PRETEXT_FIGURES = ("angle_error_deg", "offset_px", "position_error", "missed", "loss")


def _save(path: Path, value: dict) -> None:
    from medsight.io import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(value, indent=2), overwrite=True)


def pretrain_unit(pretext: str, data: Path, work: Path, args, epochs: int | None = None, **options) -> dict:
    from medsight.engine import checkpoint
    from medsight.tasks.ssl import PretrainConfig, pretrain

    # only options `medsight pretrain` has; everything else at its defaults
    cfg = PretrainConfig(
        data=str(data), pretext=pretext, out=str(work / "pretrain" / pretext.replace("+", "_")),
        epochs=epochs or args.pretrain_epochs, steps_per_epoch=args.steps_per_epoch, seed=args.seed,
        overwrite=True, progress=not args.quiet, **options,
    )  # fmt: skip
    summary = pretrain(cfg)
    history = checkpoint.load(summary["best"])["training"]["history"]
    best = min(history, key=lambda row: row["val_loss"])
    return {
        "checkpoint": summary["best"],
        "steps": summary["epochs_run"] * cfg.steps_per_epoch,
        "epochs_run": summary["epochs_run"],
        "train_seconds": summary["train_seconds"],
        "best_epoch": best["epoch"],
        "validation_volumes": len(checkpoint.load(summary["best"])["data"]["val_ids"]),
        **{k: best[f"val_{k}"] for k in PRETEXT_FIGURES if f"val_{k}" in best},
        "settings": {k: getattr(cfg, k) for k in ("size", "spacing", "sigma", "stack_slices", "views")},
    }


def evaluate(checkpoint_path: str, data: Path, val_ids: list[str]) -> dict:
    from medsight.datasets import open_dataset
    from medsight.engine.infer import Predictor
    from medsight.evaluate import segmentation_metrics

    dataset = open_dataset(data)
    predictor = Predictor(checkpoint_path)
    names = {v: n for v, n in predictor.labels.items() if v}
    dice, hd95, whole = [], [], []
    for cid in val_ids:
        image, label = dataset.load_case(dataset.case(cid))
        mask = predictor.predict(image)[0].array[0]
        ref = label.array[0]
        row = segmentation_metrics(mask, ref, image.spacing, names)
        dice.append(np.mean([row[n]["dice"] for n in names.values()]))
        hd95.append(np.nanmean([row[n]["hd95_mm"] for n in names.values()]))
        both = (mask > 0).sum() + (ref > 0).sum()
        whole.append(1.0 if both == 0 else 2.0 * ((mask > 0) & (ref > 0)).sum() / both)
    return {
        "mean_dice": float(np.mean(dice)),
        "hd95_mm": float(np.nanmean(hd95)),
        "whole_dice": float(np.mean(whole)),
    }


def finetune_unit(config: str, shots: int, draw: int, data: Path, work: Path, args) -> dict:
    from medsight.datasets import open_dataset, split_dataset
    from medsight.engine import checkpoint
    from medsight.tasks.segmentation import SegmentationConfig, train

    init = None
    if config != "scratch":
        unit = work / "units" / f"pretrain-{config.replace('+', '_')}.json"
        if not unit.exists():
            raise SystemExit(f"ssl benchmark: pretrain {config} first (no {unit})")
        init = json.loads(unit.read_text())["checkpoint"]
    # only options `medsight train` has (--method unet2d --init --labeled-cases --seed --split-seed)
    cfg = SegmentationConfig(
        method="unet2d", data=str(data), out=str(work / "finetune" / f"{shots}-{config.replace('+', '_')}-{draw}"),
        epochs=args.finetune_epochs, steps_per_epoch=args.steps_per_epoch, seed=draw, split_seed=args.seed,
        max_val_cases=args.max_val_cases, init=init, labeled_cases=shots, overwrite=True,
        progress=not args.quiet,
    )  # fmt: skip
    summary = train(cfg)
    payload = checkpoint.load(summary["best"])
    val_ids = split_dataset(open_dataset(data), cfg.val_fraction, cfg.split_seed)[1]
    return {
        **evaluate(summary["best"], data, val_ids),
        "labelled_ids": payload["data"]["train_ids"],
        "steps": summary["epochs_run"] * cfg.steps_per_epoch,
        "train_seconds": summary["train_seconds"],
        "init_layers": payload.get("init", {}).get("loaded_layers", 0),
        "validation_volumes": len(val_ids),
    }


def fewshot_reference() -> dict:
    """The few-shot benchmark's 1-shot whole-hippocampus figures (its best head and its supervised
    unet2d), for the row next to N = 1."""
    path = RESULTS / "fewshot.json"
    if not path.exists():
        return {}
    whole = json.loads(path.read_text())["results"].get("hippocampus/whole", {})
    one = {head: figures["1"] for head, figures in whole.items() if "1" in figures}
    if not one:
        return {}
    best = max((h for h in one if not h.startswith("supervised")), key=lambda h: one[h]["mean_dice"])
    return {
        "source": "benchmarks/results/fewshot.json results/hippocampus/whole/*/1",
        "best_head": best,
        "whole_dice": one[best]["mean_dice"],
        "hd95_mm": one[best]["hd95_mm"],
        **{f"{h}_whole_dice": v["mean_dice"] for h, v in one.items() if h.startswith("supervised")},
    }


def collect(work: Path, args) -> dict:
    """The results file from every unit on disk."""
    units = {p.stem: json.loads(p.read_text()) for p in sorted((work / "units").glob("*.json"))}
    pretext = {
        name[len("pretrain-") :].replace("_", "+"): u
        for name, u in units.items()
        if name.startswith("pretrain-")
    }
    results: dict = {}
    for name, unit in units.items():
        if not name.startswith("finetune-"):
            continue
        shots, config, draw = name[len("finetune-") :].split("-")
        results.setdefault(shots, {}).setdefault(config.replace("_", "+"), {})[int(draw)] = unit
    table: dict = {}
    for shots, configs in sorted(results.items(), key=lambda kv: int(kv[0])):
        scratch = configs.get("scratch", {})
        for config in CONFIGS:
            draws = configs.get(config)
            if not draws:
                continue
            order = sorted(draws)
            row = {
                "draws": order,
                "mean_dice": {
                    "mean": _mean(draws, order, "mean_dice"),
                    "per_draw": [draws[d]["mean_dice"] for d in order],
                },
                "hd95_mm": {
                    "mean": _mean(draws, order, "hd95_mm"),
                    "per_draw": [draws[d]["hd95_mm"] for d in order],
                },
                "whole_dice": {
                    "mean": _mean(draws, order, "whole_dice"),
                    "per_draw": [draws[d]["whole_dice"] for d in order],
                },
                "steps": [draws[d]["steps"] for d in order],
                "train_seconds": [draws[d]["train_seconds"] for d in order],
                "labelled_ids": [draws[d]["labelled_ids"] for d in order],
            }
            if config != "scratch" and scratch:
                paired = [draws[d]["mean_dice"] - scratch[d]["mean_dice"] for d in order if d in scratch]
                row["dice_minus_scratch"] = {
                    "mean": float(np.mean(paired)) if paired else None,
                    "per_draw": paired,
                }
            table.setdefault(shots, {})[config] = row
    brats = units.get("brats-planes_position")
    return {
        "benchmark": "ssl",
        "quick": args.quick,
        "data": str(args.data),
        "split": {
            "val_fraction": 0.2,
            "seed": args.seed,
            "validation_volumes": 40 if not args.quick else None,
        },
        "budgets": {
            "pretrain": {
                k: {"steps": u["steps"], "train_seconds": u["train_seconds"], "epochs_run": u["epochs_run"]}
                for k, u in pretext.items()
            },
            "pretrain_steps_planned": args.pretrain_epochs * args.steps_per_epoch,
            "finetune_steps_planned": args.finetune_epochs * args.steps_per_epoch,
            "brats_pretrain_steps": brats["steps"] if brats else None,
            "draws_per_n": {
                shots: len(configs.get("scratch", {}).get("draws", [])) for shots, configs in table.items()
            },
            "steps_per_epoch": args.steps_per_epoch,
            "batch": "pretrain: 16 stack slices (2 stacks of 8) of 40x40 px at 1 mm; fine-tune: planned (engine/plan.py)",
            "max_val_cases_during_finetune": args.max_val_cases,
            "timing": "Budgets are optimiser steps; train_seconds are wall-clock on the 2-core CPU, two runs "
            "side by side, one thread each",
        },
        "results": table,
        "pretext": {
            k: {f: u.get(f) for f in PRETEXT_FIGURES if f in u}
            | {"validation_volumes": u["validation_volumes"]}
            for k, u in pretext.items()
        },
        "brats_pretext": brats,
        "fewshot_1shot_whole": fewshot_reference(),
    }


def _mean(draws: dict, order: list, key: str) -> float:
    return float(np.mean([draws[d][key] for d in order]))


def table(results: dict) -> str:
    lines = [
        "| N | configuration | mean Dice (per draw) | minus scratch (per draw) | HD95 mm | whole Dice |",
        "|---:|---|---|---|---:|---:|",
    ]
    ref = results.get("fewshot_1shot_whole") or {}
    for shots, configs in results["results"].items():
        for config, row in configs.items():
            per = ", ".join(f"{v:.3f}" for v in row["mean_dice"]["per_draw"])
            diff = row.get("dice_minus_scratch")
            delta = (
                f"{diff['mean']:+.3f} ({', '.join(f'{v:+.3f}' for v in diff['per_draw'])})"
                if diff and diff["per_draw"]
                else "-"
            )
            lines.append(
                f"| {shots} | {config} | {row['mean_dice']['mean']:.4f} ({per}) | {delta} | "
                f"{row['hd95_mm']['mean']:.2f} | {row['whole_dice']['mean']:.4f} |"
            )
        if shots == "1" and ref:  # the few-shot benchmark's 1-shot figure, next to N = 1
            lines.append(
                f"| 1 | few-shot benchmark, {ref['best_head']} (whole hippocampus) | - | - | "
                f"{ref['hd95_mm']:.2f} | {ref['whole_dice']:.4f} |"
            )
    lines += [
        "",
        "| pretext (validation volumes) | angle error deg | offset px | position error | volumes |",
        "|---|---:|---:|---:|---:|",
    ]
    pretexts = dict(results["pretext"])
    if results.get("brats_pretext"):
        pretexts["planes+position, BraTS"] = results["brats_pretext"]
    for name, p in pretexts.items():
        cells = [
            f"{p[k]:.3g}" if isinstance(p.get(k), int | float) else "-"
            for k in ("angle_error_deg", "offset_px", "position_error")
        ]
        lines.append(f"| {name} | {' | '.join(cells)} | {p.get('validation_volumes', '-')} |")
    budgets = results["budgets"]
    steps = ", ".join(
        f"{k} {v['steps']} steps ({v['train_seconds']:.0f} s)" for k, v in budgets["pretrain"].items()
    )
    draws = ", ".join(f"N={n}: {d}" for n, d in budgets.get("draws_per_n", {}).items())
    brats = budgets.get("brats_pretrain_steps")
    lines += [
        "",
        f"Pretraining: {steps}{f'; BraTS {brats} steps' if brats else ''}. Fine-tuning: at most "
        f"{budgets['finetune_steps_planned']} steps per run; draws {draws}. {budgets.get('timing') or budgets['reduced']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED / "hippocampus")
    parser.add_argument("--brats", type=Path, default=SHARED / "brats2015")
    parser.add_argument("--stage", default="all", choices=["all", "pretrain", "finetune", "brats", "collect"])
    parser.add_argument("--pretexts", default=",".join(PRETEXTS))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--draws", default="0,1,2")
    parser.add_argument("--pretrain-epochs", type=int, default=200)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--brats-epochs", type=int, default=20, help="pretraining epochs on BraTS")
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument(
        "--max-val-cases", type=int, default=10, help="validation cases per fine-tuning epoch"
    )
    parser.add_argument("--seed", type=int, default=0, help="the split's seed (the segmentation benchmark's)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ssl-benchmark")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="phantom smoke run (seconds)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    name = "ssl-quick" if args.quick else "ssl"
    if args.quick:
        from medsight.datasets.phantom import write_phantom_dataset

        args.work = args.work.with_name(args.work.name + "-quick")
        args.data = write_phantom_dataset(args.work / "phantom", 8, overwrite=True)
        args.pretrain_epochs, args.finetune_epochs, args.steps_per_epoch = 2, 2, 4
        args.shots, args.draws, args.max_val_cases = "1", "0", 2
    units = args.work / "units"
    stages = ["pretrain", "finetune", "brats"] if args.stage == "all" else [args.stage]
    if args.quick:
        stages = [s for s in stages if s != "brats"]
    if "pretrain" in stages:
        for pretext in args.pretexts.split(","):
            t0 = time.time()
            unit = pretrain_unit(pretext, args.data, args.work, args)
            _save(units / f"pretrain-{pretext.replace('+', '_')}.json", unit)
            print(f"pretrain {pretext}: {unit['steps']} steps, {time.time() - t0:.0f} s", file=sys.stderr)
    if "finetune" in stages:
        for shots in [int(s) for s in args.shots.split(",")]:
            for draw in [int(d) for d in args.draws.split(",")]:
                for config in args.configs.split(","):
                    unit = finetune_unit(config, shots, draw, args.data, args.work, args)
                    _save(units / f"finetune-{shots}-{config.replace('+', '_')}-{draw}.json", unit)
                    print(f"N={shots} draw {draw} {config}: Dice {unit['mean_dice']:.4f}", file=sys.stderr)
    if "brats" in stages:
        # the pretext alone on brains: 40 px at 4 mm cover a brain's cross-section as 40 px at 1 mm a hippocampus
        unit = pretrain_unit(
            "planes+position", args.brats, args.work / "brats", args, args.brats_epochs, size=40, spacing=4.0
        )
        _save(units / "brats-planes_position.json", unit)
    results = collect(args.work, args)
    _save(args.out / f"{name}.json", results)
    (args.out / f"{name}.md").write_text(table(results))
    return results


if __name__ == "__main__":
    main()
