"""Few-shot benchmark: three heads trained without labels vs a supervised unet2d trained on the supports.

    python benchmarks/fewshot.py --threads 1   # hippocampus + BraTS from ../shared/data (32 x 500 steps, ~1 h)
    python benchmarks/fewshot.py --threads 1 --checkpoint runs/shared/best.pt   # evaluate a trained model
    python benchmarks/fewshot.py --quick         # smoke run on a phantom written to a temp folder

Training goes through the few-shot task (``medsight.tasks.fewshot.train``, what ``medsight train
--method fewshot-*`` runs) with the same option names: ``--epochs`` x ``--steps-per-epoch`` steps (or
``--time-limit`` minutes) per model, ``--batch-size`` episodes per step, ``--lr``, ``--patience``
(default: no early stop), ``--ema-decay``, ``--val-fraction`` (images held out for the validation
episodes); the model kept is ``best.pt``. The three heads train on one shared encoder
(``fewshot-shared``), or with ``--separate`` one model per head; self-supervised superpixel episodes on
the hippocampus images outside the evaluation lists plus the BraTS FLAIR volumes (images only; no label
file is opened). BraTS has four patients only, so their FLAIR images (never their labels) are among the
unlabeled training slices: the BraTS figures are transductive, the hippocampus ones are not.
``--methods``, ``--structures`` and ``--shots`` restrict what is evaluated.

Evaluation, with case lists fixed by ``--seed`` and written to the results:
- hippocampus: 5 support candidates and 30 disjoint query cases; structures ``whole`` (labels 1+2),
  ``anterior`` (1), ``posterior`` (2); k-shot uses the first k candidates, combined by ensembling
  (the averaged-prototype combination is scored too, as ``average_combination``); chunk protocol
  with ``--chunks`` (12) chunks and the query slice range taken from the support (no query label
  is used).
- BraTS whole tumour (labels > 0), FLAIR: each patient in turn is the query, supports are the other
  patients (1-shot: the next one; k-shot: k of the others, at most 3); and slice propagation within
  each patient from its middle tumour slice (``brats/whole-tumour-propagation``).
- ``supervised-unet2d``: medsight's unet2d trained as ``medsight train --method unet2d --time-limit``
  trains it (``--supervised-seconds``), on the support volume(s) only, validated on them too (nothing
  else is labelled), applied with medsight's Predictor; for propagation, on the annotated slice alone.
Every method's masks keep their largest connected piece (``--no-largest-component`` turns it off).
Metrics: Dice and HD95 (mm) from ``medsight.evaluate.segmentation_metrics``, seconds per query
(the support set is embedded once per structure and shot count and timed apart: ``support_seconds``).
Writes ``fewshot.json`` and ``fewshot.md`` (``fewshot-quick.*`` with ``--quick``) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from medsight.scan import Scan

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HEADS = ("prototype", "local-prototype", "conditional")
METHODS = (*HEADS, "supervised-unet2d")


def parse(argv=None) -> argparse.Namespace:
    from medsight.tasks.fewshot import FewShotConfig

    defaults = FewShotConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # training: the options of `medsight train --method fewshot-*`, under the same names
    p.add_argument("--epochs", type=int, default=32, help="epochs of --steps-per-epoch steps per model")
    p.add_argument("--steps-per-epoch", type=int, default=500)
    p.add_argument("--time-limit", type=float, default=None, help="training budget per model, minutes")
    p.add_argument("--batch-size", type=int, default=None, help="episodes per step (default: 8)")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument(
        "--patience", type=int, default=None,
        help="epochs without a better validation episode Dice before stopping (default: --epochs, no early stop)",
    )  # fmt: skip
    p.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    p.add_argument("--quick", action="store_true", help="tiny smoke run on a phantom")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--runs", type=Path, default=None, help="where checkpoints go (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--supports", type=int, default=5)
    p.add_argument("--queries", type=int, default=30)
    p.add_argument(
        "--separate", dest="shared", action="store_false",
        help="three models, one per head (default: the three heads on one encoder, fewshot-shared)",
    )  # fmt: skip
    p.add_argument("--chunks", type=int, default=12, help="chunk protocol: chunks along the slice axis")
    p.add_argument(
        "--neighbours", type=int, default=1,
        help="chunks on each side whose support slices join a chunk's (0 is also scored, as no_neighbours)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint", type=Path, default=None,
        help="evaluate this fewshot-shared checkpoint instead of training one (its training and validation "
        "cases must be outside the evaluation lists)",
    )  # fmt: skip
    p.add_argument(
        "--no-largest-component", dest="largest_component", action="store_false",
        help="score raw masks (default: every method's masks keep their largest connected piece)",
    )  # fmt: skip
    p.add_argument("--supervised-seconds", type=float, default=40.0, help="unet2d budget per support set")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to evaluate")
    p.add_argument(
        "--structures", default=None,
        help="comma-separated structures to evaluate, e.g. hippocampus/whole (default: all; BraTS only when "
        "a brats/ structure is listed or none is given)",
    )  # fmt: skip
    p.add_argument("--shots", default=None, help="comma-separated shot counts (default: 1,5; --quick 1,2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    return args


# -- data ------------------------------------------------------------------------------------------
def binary(label_scan, values):
    return label_scan.with_array(np.isin(label_scan.array, values).astype(np.uint8))


def load_cases(dataset, ids, channel=0):
    out = {}
    for cid in ids:
        image, label = dataset.load_case(dataset.case(cid))
        out[cid] = (image.with_array(image.array[channel : channel + 1]), label)
    return out


# -- supervised baseline ---------------------------------------------------------------------------
def one_slice(scan, z: int, axis: int = 2):
    """Slice ``z`` of a volume along ``axis`` as a one-slice volume in the same world position."""
    index = [slice(None)] * 4
    index[1 + axis] = slice(z, z + 1)
    affine = scan.affine.copy()
    affine[:3, 3] += affine[:3, axis] * z
    return Scan(scan.array[tuple(index)], affine, dict(scan.meta), scan.path)


def train_unet2d(pairs, slice_axis, seconds, seed, only_slice=None):
    """unet2d trained as `medsight train --method unet2d --time-limit` trains it, on the support volumes
    (or, with ``only_slice``, one slice of each); they are the validation cases too: nothing else is
    labelled. Returns a predict(image) function (medsight's Predictor on ``best.pt``)."""
    from medsight import io
    from medsight.engine.infer import Predictor
    from medsight.tasks.segmentation import SegmentationConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        folder, rows = Path(tmp), []
        for k, (image, mask) in enumerate(pairs):
            if only_slice is not None:
                image, mask = (
                    one_slice(image, only_slice[k], slice_axis),
                    one_slice(mask, only_slice[k], slice_axis),
                )
            io.write(image, folder / f"s{k}.nii.gz")
            io.write(mask, folder / f"s{k}_mask.nii.gz")
            files = f"s{k}.nii.gz,s{k}_mask.nii.gz"
            rows += [f"s{k},{files},train", f"s{k}-val,{files},val"]
        (folder / "supports.csv").write_text("case_id,image,label,split\n" + "\n".join(rows) + "\n")
        cfg = SegmentationConfig(
            method="unet2d", data=str(folder), out=str(folder / "run"), slice_axis=slice_axis, epochs=10_000,
            steps_per_epoch=20, time_limit=seconds / 60, seed=seed, progress=False,
        )  # fmt: skip
        summary = train(cfg)
        predictor = Predictor(summary["best"])

    def predict(image):
        return predictor.predict(image)[0]

    predict.steps = summary["epochs_run"] * cfg.steps_per_epoch
    return predict


# -- evaluation ------------------------------------------------------------------------------------
def score(masks_and_refs, times, support_ids, query_ids):
    from medsight.evaluate import segmentation_metrics

    dice, hd95 = [], []
    for pred, ref, spacing in masks_and_refs:
        m = segmentation_metrics(pred.array[0] > 0, ref.array[0] > 0, spacing, {1: "s"})["s"]
        dice.append(m["dice"])
        hd95.append(m["hd95_mm"])
    finite = [h for h in hd95 if h is not None and np.isfinite(h)]
    return {
        "mean_dice": round(float(np.mean(dice)), 4),
        "std_dice": round(float(np.std(dice)), 4),
        "hd95_mm": round(float(np.mean(finite)), 3) if finite else None,
        "seconds_per_query": round(float(np.mean(times)), 4),
        "support_ids": list(support_ids),
        "query_ids": list(query_ids),
        "dice_per_query": [round(float(d), 4) for d in dice],
    }


def clean(pred, args):
    """The same post-processing for every method: keep the largest connected piece."""
    from medsight.engine.infer import largest_components

    return pred.with_array(largest_components(pred.array[0])[None]) if args.largest_component else pred


def run_fewshot(predictor, supports, queries, structure_values, support_ids, query_ids, args):
    """The support set is embedded once (timed apart), then each query is timed on its own. Also
    scored, under their own keys: with several shots the other k-shot combination (averaged
    prototypes/weights), and with ``--neighbours`` > 0 the plain chunk protocol."""
    pairs = [(img, binary(lab, structure_values)) for img, lab in supports]
    variants = [("ensemble", args.neighbours, None)]
    if args.neighbours:
        variants.append(("ensemble", 0, "no_neighbours"))
    if len(pairs) > 1:
        variants.append(("average", args.neighbours, "average_combination"))
    result, prepared = {}, {}
    for combine, neighbours, key in variants:
        if combine not in prepared:
            t0 = time.perf_counter()
            prepared[combine] = predictor.prepare(pairs, args.chunks, combine)
            support_seconds = time.perf_counter() - t0
        rows, times = [], []
        for image, label in queries:
            t0 = time.perf_counter()
            pred = clean(predictor.segment(prepared[combine], image, neighbours=neighbours), args)
            times.append(time.perf_counter() - t0)
            rows.append((pred, binary(label, structure_values), image.spacing))
        figures = score(rows, times, support_ids, query_ids)
        if key is None:
            result = {**figures, "support_seconds": round(support_seconds, 4)}
        else:
            result[key] = {k: figures[k] for k in ("mean_dice", "hd95_mm", "dice_per_query")}
    return result


def run_supervised(supports, queries, structure_values, support_ids, query_ids, args):
    pairs = [(img, binary(lab, structure_values)) for img, lab in supports]
    predict = train_unet2d(pairs, 2, args.supervised_seconds, args.seed)
    rows, times = [], []
    for image, label in queries:
        t0 = time.perf_counter()
        pred = clean(predict(image), args)
        times.append(time.perf_counter() - t0)
        rows.append((pred, binary(label, structure_values), image.spacing))
    result = score(rows, times, support_ids, query_ids)
    result["train_steps"] = predict.steps
    return result


def pooled(per_query: list[dict]) -> dict:
    """Mean over single-query results of every figure they carry (one query per support set)."""

    def mean(rows, key, digits=4):
        values = [r[key] for r in rows if r.get(key) is not None]
        return round(float(np.mean(values)), digits) if values else None

    out = {key: mean(per_query, key) for key in ("mean_dice", "seconds_per_query")}
    out["hd95_mm"] = mean(per_query, "hd95_mm", 3)
    if "support_seconds" in per_query[0]:  # few-shot heads only
        out["support_seconds"] = mean(per_query, "support_seconds")
    for key in ("no_neighbours", "average_combination"):
        if key in per_query[0]:
            variants = [r[key] for r in per_query]
            out[key] = {"mean_dice": mean(variants, "mean_dice"), "hd95_mm": mean(variants, "hd95_mm", 3)}
    return out


def middle_slice(mask_array, axis=2):
    filled = np.flatnonzero(np.moveaxis(mask_array, axis, 0).reshape(mask_array.shape[axis], -1).any(1))
    return int(filled[len(filled) // 2])


def run_propagation(predictors, cases, values, args):
    """Per patient: annotate the middle slice of the structure, complete the volume."""
    results = {}
    for method in args.methods:
        rows, times = [], []
        for image, label in cases.values():
            ref = binary(label, values)
            z = middle_slice(ref.array[0])
            partial = np.zeros_like(ref.array)
            partial[..., z] = ref.array[..., z]
            t0 = time.perf_counter()
            if method == "supervised-unet2d":
                predict = train_unet2d(
                    [(image, ref)], 2, args.supervised_seconds / 4, args.seed, only_slice=[z]
                )
                t0 = time.perf_counter()
                pred = predict(image)
                pred.array[..., z] = partial[..., z]
            else:
                pred = predictors[method].propagate(image, ref.with_array(partial))
            pred = clean(pred, args)
            times.append(time.perf_counter() - t0)
            rows.append((pred, ref, image.spacing))
        ids = list(cases)
        results[method] = {"1": score(rows, times, ids, ids)}
    return results


# -- main ------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse(argv)
    import torch

    log = (lambda *a: None) if args.quiet else print
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, log)
    finally:
        torch.set_num_threads(threads)


def load_trained(checkpoint_path: Path, evaluated_ids: list[str]) -> tuple[dict, dict]:
    """Predictors for every head of a fewshot-shared checkpoint, refusing one that trained or
    validated on any image of the evaluation lists."""
    from medsight.engine import checkpoint
    from medsight.errors import MedsightError
    from medsight.tasks.fewshot_predict import FewShotPredictor

    payload = checkpoint.load(checkpoint_path)
    seen = set(payload["data"]["case_ids"]) | set(payload["data"].get("val_ids", []))
    overlap = sorted(seen & set(evaluated_ids))
    if overlap:
        raise MedsightError(f"trained on evaluation cases {', '.join(overlap)}", checkpoint_path)
    summary_path = checkpoint_path.parent / "summary.json"
    summary = (
        json.loads(summary_path.read_text()) if summary_path.is_file() else {"best": str(checkpoint_path)}
    )
    summary = {k: v for k, v in summary.items() if k not in ("case_ids", "val_ids")}
    return (
        {head: FewShotPredictor(checkpoint_path, head=head) for head in HEADS},
        {head: {**summary, "trained_in_this_run": False} for head in HEADS},
    )


def loop_options(args) -> dict:
    """The training options, as `medsight train` passes them to the few-shot task."""
    return {
        "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "time_limit": args.time_limit,
        "batch_size": args.batch_size, "lr": args.lr, "patience": args.patience or args.epochs,
        "ema_decay": args.ema_decay, "val_fraction": args.val_fraction,
    }  # fmt: skip


def train_models(args, sources, channels, evaluated_ids, runs, log) -> tuple[dict, dict]:
    """The few-shot models, trained through the task's API (`medsight train --method fewshot-*`);
    the images are read once for every model."""
    from medsight.tasks.fewshot import FewShotConfig, read_training_slices, train
    from medsight.tasks.fewshot_predict import FewShotPredictor

    training, predictors, slices = {}, {}, None
    for run_name in ["shared"] if args.shared else list(HEADS):
        cfg = FewShotConfig(
            data=sources, out=str(runs / run_name), method=f"fewshot-{run_name}", channels=channels,
            seed=args.seed, exclude_ids=evaluated_ids, overwrite=True, progress=not args.quiet, **loop_options(args),
        )  # fmt: skip
        if slices is None:
            log("reading the unlabeled training images ...")
            slices = read_training_slices(cfg)
        log(f"training {run_name} ...")
        summary = train(cfg, slices)
        for head in HEADS if args.shared else [run_name]:
            training[head] = {k: v for k, v in summary.items() if k not in ("case_ids", "val_ids")}
            predictors[head] = FewShotPredictor(summary["best"], head=head)
    return training, predictors


def settings(args) -> dict:
    from medsight.tasks.fewshot import FewShotConfig

    return {
        **loop_options(args),
        "steps_per_model": args.epochs * args.steps_per_epoch,
        "shared_encoder": args.shared,
        "size": FewShotConfig().size,
        "seed": args.seed,
        "slice_axis": 2,
        "chunks": args.chunks,
        "neighbours": args.neighbours,
        "kshot_combination": "ensemble (mean of per-shot probabilities); average_combination: "
        "prototypes/weights averaged",
        "largest_component": args.largest_component,
        "query_range": "support range mapped proportionally (no query labels)",
        "supervised_seconds": args.supervised_seconds,
    }


def run_brats(predictors, brats: Path, args) -> dict:
    """BraTS whole tumour: each patient in turn is the query, the others the supports; and slice
    propagation inside each patient."""
    from medsight.datasets import open_dataset

    bdata = open_dataset(brats)
    patients = sorted(bdata.case_ids)
    cases = load_cases(bdata, patients)
    results = {"brats/whole-tumour": {}}
    for method in args.methods:
        results["brats/whole-tumour"][method] = {}
        for k in (1, len(patients) - 1):
            per_query, sup_ids = [], []
            for i, q in enumerate(patients):
                others = [patients[(i + j) % len(patients)] for j in range(1, k + 1)]
                sup_ids.append(others)
                sup = [cases[c] for c in others]
                if method == "supervised-unet2d":
                    per_query.append(run_supervised(sup, [cases[q]], [1, 2, 3, 4], others, [q], args))
                else:
                    per_query.append(
                        run_fewshot(predictors[method], sup, [cases[q]], [1, 2, 3, 4], others, [q], args)
                    )
            results["brats/whole-tumour"][method][str(k)] = {
                **pooled(per_query),
                "support_ids": sup_ids,
                "query_ids": patients,
            }
        results["brats/whole-tumour"][method]["5"] = {
            "skipped": "4 BraTS patients: at most 3 supports per query"
        }
    results["brats/whole-tumour-propagation"] = run_propagation(predictors, cases, [1, 2, 3, 4], args)
    return results


def run(args, log) -> dict:
    from medsight.datasets import open_dataset

    tmp = tempfile.TemporaryDirectory()
    runs = args.runs or Path(tmp.name) / "runs"
    rng = np.random.default_rng(args.seed)
    if args.quick:
        from medsight.datasets.phantom import write_phantom_dataset

        data = write_phantom_dataset(Path(tmp.name) / "phantom", 6, seed=args.seed)
        dataset = open_dataset(data)
        structures = {"phantom/cyst": [1], "phantom/tumour": [3]}
        n_supports, n_queries, shots = 2, 2, (1, 2)
        sources, channels, brats = [str(data)], None, None
        args.epochs, args.steps_per_epoch = 3, 5
        args.supervised_seconds = min(args.supervised_seconds, 2.0)
    else:
        dataset = open_dataset(SHARED / "hippocampus")
        structures = {"hippocampus/whole": [1, 2], "hippocampus/anterior": [1], "hippocampus/posterior": [2]}
        n_supports, n_queries, shots = args.supports, args.queries, (1, 5)
        brats = SHARED / "brats2015"
        sources, channels = [str(SHARED / "hippocampus"), str(brats)], [0]
    if args.shots:
        shots = tuple(int(k) for k in args.shots.split(","))
    if args.structures:
        wanted = args.structures.split(",")
        structures = {k: v for k, v in structures.items() if k in wanted}
        if not any(w.startswith("brats/") for w in wanted):
            brats = None
    order = [dataset.case_ids[i] for i in rng.permutation(len(dataset.case_ids))]
    support_ids, query_ids = order[:n_supports], order[n_supports : n_supports + n_queries]

    if args.checkpoint:
        predictors, training = load_trained(args.checkpoint, support_ids + query_ids)
    else:
        training, predictors = train_models(args, sources, channels, support_ids + query_ids, runs, log)

    supports = load_cases(dataset, support_ids)
    queries = load_cases(dataset, query_ids)
    results: dict[str, dict] = {}
    for structure, values in structures.items():
        results[structure] = {}
        for method in args.methods:
            results[structure][method] = {}
            for k in shots:
                ids = support_ids[:k]
                sup = [supports[c] for c in ids]
                if method == "supervised-unet2d":
                    figures = run_supervised(sup, list(queries.values()), values, ids, query_ids, args)
                else:
                    figures = run_fewshot(
                        predictors[method], sup, list(queries.values()), values, ids, query_ids, args
                    )
                results[structure][method][str(k)] = figures
                log(f"{structure:28s} {method:18s} {k}-shot Dice {figures['mean_dice']:.3f}")

    notes = []
    if brats is not None and brats.exists():
        results |= run_brats(predictors, brats, args)
        notes.append("BraTS: FLAIR only; its unlabeled FLAIR volumes were part of self-supervised training.")
    elif brats is not None:
        notes.append(f"BraTS skipped: {brats} not found")

    report = {
        "benchmark": "fewshot",
        "quick": args.quick,
        "settings": settings(args),
        "training": training,
        "support_ids": support_ids,
        "query_ids": query_ids,
        "results": results,
        "notes": notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "fewshot-quick" if args.quick else "fewshot"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{name}.md").write_text(markdown(report))
    tmp.cleanup()
    return report


def markdown(report: dict) -> str:
    lines = [
        "| dataset/structure | method | shots | Dice | HD95 (mm) | s/query | s/support set |",
        "|---|---|---|---|---|---|---|",
    ]
    for structure, methods in report["results"].items():
        for method, per_shot in methods.items():
            for k, f in per_shot.items():
                if "skipped" in f:
                    continue
                hd = "n/a" if f.get("hd95_mm") is None else f"{f['hd95_mm']:.2f}"
                support = f"{f['support_seconds']:.3f}" if "support_seconds" in f else "-"
                lines.append(
                    f"| {structure} | {method} | {k} | {f['mean_dice']:.3f} | {hd} | {f['seconds_per_query']:.3f} "
                    f"| {support} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
