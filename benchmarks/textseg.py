"""Text-guided semi-supervised segmentation benchmark (LViT vs U-Net) on MoNuSeg with its text.

    python benchmarks/textseg.py                                   # every configuration, 15 min each
    python benchmarks/textseg.py --configs lvit@1.0,unet2d@1.0     # any subset; results accumulate
    python benchmarks/textseg.py --test-folder path/Test_Folder    # evaluate on another held-out folder
    python benchmarks/textseg.py --quick                           # smoke run on a 2D phantom (seconds)

Each configuration trains on ``Train_Folder`` (keeping a seeded ``fraction`` of the masks), selects
its checkpoint on ``Val_Folder`` and is evaluated on ``--test-folder`` (default: the Val_Folder):
mean per-image Dice and IoU of the foreground at the images' original size. Configuration names are
``<variant>@<labeled fraction>[:<minutes>min]``; the suffix overrides ``--time-limit`` for that
configuration and is part of its result key, e.g. ``lvit@1.0:40min``. Variants: ``unet2d``
(supervised U-Net), ``lvit`` (text, EPI, LV loss), ``lvit-notext`` (the same without text),
``lvit-noepi``, ``lvit-nolv``, ``lvit-nosemi`` (neither: the labeled images alone), ``lvit-large``.
Each configuration trains through the ``medsight textseg train`` command itself (``train_args``
gives its command line, kept as ``command`` in the results), so the benchmark reaches no setting the
command does not. Results merge into ``<out>/textseg.json`` (``textseg-quick.json`` for --quick), one entry per
configuration name (``<name>/seed<N>`` for ``--seed N`` other than 0, so repeats accumulate; the seed
draws the initial weights, the sampling and, below a fraction of 1, which masks are kept), and
``textseg.md``: a markdown table of every entry, then the median of each repeated configuration.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ALL_CONFIGS = (
    "unet2d@0.25", "unet2d@0.5", "unet2d@1.0", "lvit@0.25", "lvit@0.5", "lvit@1.0",
    "lvit-notext@1.0", "lvit-noepi@0.25", "lvit-nolv@0.25", "lvit-notext@0.25",
)  # fmt: skip
VARIANTS = {
    # variant: its `medsight textseg train` options
    "unet2d": ["--method", "unet2d"],
    "lvit": ["--method", "lvit"],
    "lvit-large": ["--method", "lvit", "--size", "large"],
    "lvit-notext": ["--method", "lvit-notext"],
    "lvit-noepi": ["--method", "lvit", "--no-epi"],
    "lvit-nolv": ["--method", "lvit", "--no-lv-loss"],
    "lvit-nosemi": ["--method", "lvit", "--no-epi", "--no-lv-loss"],  # the labeled images alone
    "lvit-grounded": ["--method", "lvit", "--grounded"],
    "lvit-grounded-notext": ["--method", "lvit-notext", "--grounded"],
}


CONFIG_NAME = re.compile(r"(?P<variant>[\w-]+)@(?P<fraction>\d*\.?\d+)(?::(?P<minutes>\d*\.?\d+)min)?")


def parse_config(name: str) -> tuple[str, float, float | None]:
    """``'lvit@0.25'`` -> ``('lvit', 0.25, None)``; ``'lvit@1.0:40min'`` -> ``('lvit', 1.0, 40.0)``."""
    match = CONFIG_NAME.fullmatch(name)
    if not match or match["variant"] not in VARIANTS:
        raise SystemExit(
            f"bad configuration {name!r}: use <variant>@<fraction>[:<minutes>min] with variants "
            f"{', '.join(VARIANTS)}"
        )
    fraction = float(match["fraction"])
    minutes = float(match["minutes"]) if match["minutes"] else None
    if not 0 < fraction <= 1 or minutes == 0:
        raise SystemExit(f"bad labeled fraction or budget in {name!r}")
    return match["variant"], fraction, minutes


def test_pairs(folder: Path) -> list[tuple[Path, Path, str | None]]:
    """(image, mask, sentence) for every picture in ``folder/img`` of an LViT split folder."""
    from medsight.errors import MedsightError
    from medsight.tasks.lvit_data import lvit_sheet
    from medsight.text import lookup, read_text_file, require_rows

    images = sorted(p for p in (folder / "img").iterdir() if p.is_file() and not p.name.startswith("."))
    if not images:
        raise MedsightError("no images in img/", folder)
    sheet = lvit_sheet(folder)
    table = read_text_file(sheet) if sheet else {}
    if sheet:
        require_rows(table, [p.name for p in images], sheet)
    pairs = []
    for image in images:
        candidates = [folder / "labelcol" / image.name, folder / "labelcol" / f"mask_{image.name}"]
        mask = next((c for c in candidates if c.is_file()), None)
        if mask is None:
            raise MedsightError(f"no mask for {image.name} in labelcol/", folder)
        pairs.append((image, mask, lookup(table, image.name)[1]))
    return pairs


def evaluate(checkpoint: str, folder: Path) -> dict:
    """Mean Dice and IoU over ``folder`` from one forward pass per image (``dice``, ``iou``, and the
    seconds it took) and averaged over the eight rotations and mirror images (``dice_tta``,
    ``iou_tta``), one network for both."""
    from medsight import io
    from medsight.evaluate import segmentation_metrics
    from medsight.tasks.lvit import TextSegPredictor

    predictor = TextSegPredictor(checkpoint)
    mapping = predictor.label_mapping
    names = {v: n for v, n in predictor.labels.items() if v}
    scores = {"dice": [], "iou": [], "dice_tta": [], "iou_tta": []}
    seconds = 0.0
    for image_path, mask_path, sentence in test_pairs(folder):
        image = io.read(image_path)
        ref = io.read(mask_path).array[0].astype(np.int64)
        for source, target in mapping.items():
            ref[ref == source] = target
        for suffix, tta in (("", False), ("_tta", True)):
            predictor.tta = tta
            t0 = time.perf_counter()
            pred = predictor.predict(image, sentence).array[0]
            seconds += 0.0 if tta else time.perf_counter() - t0
            rows = segmentation_metrics(pred, ref, labels=names)
            for metric in ("dice", "iou"):
                scores[metric + suffix].append(np.mean([r[metric] for r in rows.values()]))
    return {
        **{key: float(np.mean(values)) for key, values in scores.items()},
        "per_image_dice": [float(d) for d in scores["dice"]],
        "inference_seconds": round(seconds, 1),
    }


def train_args(name: str, data: Path, out: Path, runs: Path, args) -> list[str]:
    """The `medsight textseg train` command line of one configuration."""
    variant, fraction, minutes = parse_config(name)
    minutes = args.time_limit if minutes is None or args.quick else minutes
    options = {
        "--data": data, "--out": out, "--labeled-fraction": fraction, "--crop": args.crop, "--scale": args.scale,
        "--batch-size": args.batch_size, "--epochs": args.epochs, "--steps-per-epoch": args.steps_per_epoch,
        "--seed": args.seed, "--time-limit": minutes, "--patience": args.patience,
        "--ema-decay": args.ema_decay, "--text-cache": runs / "text_cache",
    }  # fmt: skip
    argv = [
        "textseg",
        "train",
        *VARIANTS[variant],
        "--overwrite",
        "--progress" if not args.quiet else "--no-progress",
    ]
    return argv + [str(x) for key, value in options.items() if value is not None for x in (key, value)]


def run_config(name: str, data: Path, test_folder: Path, runs: Path, args) -> dict:
    """Train through the `medsight textseg train` command itself, then evaluate its best.pt."""
    from typer.main import get_command

    from medsight.cli.main import app

    # one run folder per result key: repeats with other seeds may run at the same time
    out = runs / re.sub(r"[@:/]", "_", result_key(name, args.seed))
    argv = train_args(name, data, out, runs, args)
    get_command(app).main(argv, prog_name="medsight", standalone_mode=False)
    summary = json.loads((out / "summary.json").read_text())
    _, fraction, _ = parse_config(name)
    minutes = argv[argv.index("--time-limit") + 1] if "--time-limit" in argv else None
    return {
        **evaluate(summary["best"], test_folder),
        "train_seconds": summary["train_seconds"],
        "best_val_dice_working_scale": summary["best_val_score"],
        "epochs_run": summary["epochs_run"],
        "pseudo_label_rounds": summary["pseudo_label_rounds"],
        "evaluated_folder": str(test_folder),
        "labeled_fraction": fraction,
        "labeled_ids": summary["labeled_ids"],
        "command": "medsight " + " ".join(argv),
        "settings": {
            "method": summary["method"], "size": summary["size"] or "small", "with_text": summary["with_text"],
            "grounded": "--grounded" in argv, "use_epi": summary["use_epi"], "use_lv_loss": summary["use_lv_loss"],
            "minutes": None if minutes is None else float(minutes), "crop": args.crop, "scale": args.scale,
            "seed": args.seed, "batch_size": args.batch_size, "ema_decay": args.ema_decay,
            "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "patience": args.patience,
        },
    }  # fmt: skip


def result_key(config: str, seed: int) -> str:
    """Where a run is filed: the configuration name, with ``/seed<N>`` for a seed other than 0, so
    repeats of a configuration sit side by side instead of replacing each other."""
    return config if seed == 0 else f"{config}/seed{seed}"


def budget(entry: dict) -> str:
    minutes = entry.get("settings", {}).get("minutes")
    return "-" if minutes is None else f"{minutes:g}"


def average(entry: dict) -> str:
    # runs from before the option trained without a weight average
    return f"{entry.get('settings', {}).get('ema_decay', 0.0):g}"


def percent(entry: dict, key: str) -> str:
    return f"{100 * entry[key]:.2f}" if key in entry else "-"


def table(results: dict) -> str:
    """The runs, then each repeated configuration's median. "TTA": the same checkpoint evaluated
    with test-time rotations and mirror images ("-": run before the benchmark measured it); "weight
    average": the decay of the weights' moving average (0: none)."""
    lines = [
        "| configuration | Dice % | IoU % | Dice % TTA | IoU % TTA | budget min | train s | epochs "
        "| weight average | labeled images | evaluated on |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    order = {n: i for i, n in enumerate(ALL_CONFIGS)}
    config_of = {name: name.split("/")[0] for name in results}  # the inverse of result_key
    by_config: dict[str, list[dict]] = {}
    for name in sorted(results, key=lambda n: (order.get(config_of[n], len(order)), n)):
        r = results[name]
        by_config.setdefault(config_of[name], []).append(r)
        lines.append(
            f"| {name} | {percent(r, 'dice')} | {percent(r, 'iou')} | {percent(r, 'dice_tta')} | "
            f"{percent(r, 'iou_tta')} | {budget(r)} | {r['train_seconds']:.0f} | "
            f"{r.get('epochs_run', '')} | {average(r)} | {len(r['labeled_ids'])} | {Path(r['evaluated_folder']).name} |"
        )
    repeated = {config: runs for config, runs in by_config.items() if len(runs) > 1}
    if repeated:
        lines += [
            "",
            "| configuration | runs (training seeds) | Dice % per run | median Dice % | median Dice % TTA |",
            "| --- | ---: | --- | ---: | ---: |",
        ]
        for config, runs in repeated.items():
            dice = [100 * r["dice"] for r in runs]
            tta = [100 * r["dice_tta"] for r in runs if "dice_tta" in r]
            median_tta = f"{np.median(tta):.2f}" if len(tta) == len(runs) else "-"
            per_run = ", ".join(f"{d:.2f}" for d in dice)
            lines.append(f"| {config} | {len(runs)} | {per_run} | {np.median(dice):.2f} | {median_tta} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from medsight.tasks.lvit import TextSegConfig

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=SHARED / "monuseg", help="LViT-layout dataset")
    parser.add_argument(
        "--test-folder", type=Path, default=None, help="held-out folder (default: Val_Folder)"
    )
    parser.add_argument(
        "--configs", default=",".join(ALL_CONFIGS), help="comma-separated configuration names"
    )
    parser.add_argument(
        "--time-limit", type=float, default=15.0, help="training budget per configuration, minutes"
    )
    parser.add_argument(
        "--epochs", type=int, default=1000, help="epoch cap (the time budget usually ends first)"
    )
    parser.add_argument("--steps-per-epoch", type=int, default=25, help="optimiser steps per epoch")
    parser.add_argument(
        "--patience", type=int, default=1000, help="epochs without a better validation Dice before stopping"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop", type=int, default=128, help="training crop at the working scale")
    parser.add_argument("--scale", type=float, default=0.5, help="working scale (MoNuSeg 1000 px -> 500 px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=TextSegConfig.ema_decay,
        help="validate, pseudo-label and keep a moving average of the weights (0: the weights as trained)",
    )
    parser.add_argument(
        "--runs", type=Path, default=None, help="where run folders go (default: a temp folder)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="smoke run on a 2D phantom in a temp folder")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for name in configs:
        parse_config(name)

    import torch

    torch.set_num_threads(1)  # the machine is shared; one thread is also the fairest timing
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if args.quick:
            from medsight.datasets.phantom import write_phantom_dataset

            data = write_phantom_dataset(tmp / "phantom", 8, dim=2, seed=args.seed)
            args.time_limit, args.epochs, args.steps_per_epoch, args.crop, args.scale = None, 2, 3, 64, 1.0
        test_folder = args.test_folder or data / "Val_Folder"
        runs = args.runs or tmp / "runs"
        name = "textseg-quick" if args.quick else "textseg"
        results_path = args.out / f"{name}.json"
        results = {}
        for config in configs:
            print(f"== {config}")
            figures = run_config(config, data, test_folder, runs, args)
            print(f"   Dice {100 * figures['dice']:.2f} ({100 * figures['dice_tta']:.2f} with TTA)  "
                  f"IoU {100 * figures['iou']:.2f}  train {figures['train_seconds']:.0f} s")  # fmt: skip
            args.out.mkdir(parents=True, exist_ok=True)  # written after each config: partial runs keep theirs
            from medsight.io import write_text

            # re-read just before writing, so runs of other configurations in parallel keep their entries
            results = json.loads(results_path.read_text()) if results_path.is_file() else {}
            results[result_key(config, args.seed)] = figures
            write_text(results_path, json.dumps(results, indent=2) + "\n", overwrite=True)
            write_text(args.out / f"{name}.md", table(results), overwrite=True)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
