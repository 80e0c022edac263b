"""Streaming benchmark: memory and speed of training from the on-disk case cache as datasets grow.

    OMP_NUM_THREADS=1 python benchmarks/streaming.py                    # 50 and 200 cases
    OMP_NUM_THREADS=1 python benchmarks/streaming.py --cases 800        # adds 800 (~23 GB of disk)
    python benchmarks/streaming.py --table                              # rewrite the .md from the .json

Writes BraTS-style phantoms (4 MRI channels, 96^3 voxels, uncompressed NIfTI: 14 MB a case, case i
from seed i) into a temporary folder, growing it from one size to the next; each dataset is a dataset.json listing its first
cases. For each size, a fresh process fits the preprocessing and builds the cache (engine/cache.py) in
a fresh cache folder, then runs ``--steps`` training steps of a 3D U-Net (batch ``--batch-size``,
``--patch`` patches, ``--workers`` DataLoader workers, plain AdamW). A monitor thread samples that
process and its workers from /proc: peak resident memory (RSS) of the main process, peak RSS summed
over the process tree, and peak proportional set size (PSS: pages shared between the main process and
its forked workers counted once) summed over the tree. For comparison, the old in-memory path
(``engine.train.prepare_data``, which reads and preprocesses every case before training) is measured
on the smallest dataset. Everything written is removed at the end. Results merge into
benchmarks/results/streaming.json (keyed by size), from which streaming.md is generated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# -- memory of a process tree ----------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # the task ended meanwhile
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Monitor(threading.Thread):
    """Samples a process tree's memory every ``interval`` seconds until stopped (peaks in MB)."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval, self.done = pid, interval, threading.Event()
        self.peak = {"main_rss_mb": 0.0, "tree_rss_mb": 0.0, "tree_pss_mb": 0.0, "processes": 0}

    def run(self) -> None:
        while not self.done.is_set():
            pids = _tree(self.pid)
            rss = [_kib(f"/proc/{p}/status", "VmRSS") / 1024 for p in pids]
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss") for p in pids) / 1024
            sample = {
                "main_rss_mb": rss[0],
                "tree_rss_mb": sum(rss),
                "tree_pss_mb": pss,
                "processes": len(pids),
            }
            self.peak = {k: max(self.peak[k], v) for k, v in sample.items()}
            self.done.wait(self.interval)


def measured(cmd: list[str]) -> tuple[dict, dict]:
    """Run ``cmd`` (which prints one JSON line last) under the monitor: (its result, memory peaks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    monitor = Monitor(proc.pid)
    monitor.start()
    out, _ = proc.communicate()
    monitor.done.set()
    monitor.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1]), {k: round(v, 1) for k, v in monitor.peak.items()}


# -- the measured runs (each in its own process) -------------------------------------------------
def run_streaming(args) -> dict:
    import numpy as np
    import torch

    from medsight.datasets import open_dataset
    from medsight.engine.cache import CaseCache, PatchDataset, fit_preprocessing, make_loader
    from medsight.engine.train import adamw
    from medsight.losses import WeightedCEDiceLoss
    from medsight.models.registry import build_model

    torch.set_num_threads(1)
    start = time.perf_counter()
    dataset = open_dataset(args.data)
    ids = dataset.case_ids
    pre, values = fit_preprocessing(dataset, ids, slice_wise=False, root=args.cache, progress=False)
    fitted = time.perf_counter()
    cases = CaseCache(args.cache, pre, values, progress=False).build(dataset, ids)
    built = time.perf_counter()
    torch.manual_seed(0)
    model = build_model("unet3d", in_channels=pre.in_channels, num_classes=len(values))
    optimiser = adamw(model.parameters(), 1e-3)
    loss_fn = WeightedCEDiceLoss(len(values))
    data = PatchDataset(cases, "3d", (args.patch,) * 3, batch_size=args.batch_size, steps=args.steps)
    step_times, foreground = [], []
    tick = time.perf_counter()
    for x, y in make_loader(data, args.workers):
        loss = loss_fn(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        now = time.perf_counter()
        step_times.append(now - tick)
        foreground.append(float((y > 0).any()))
        tick = now
    steady = step_times[1:]  # the first step also waits for the workers to start
    return {
        "cases": len(ids),
        "fit_seconds": round(fitted - start, 1),
        "cache_build_seconds": round(built - fitted, 1),
        "cache_gb": round(sum(f.stat().st_size for f in Path(args.cache).rglob("*") if f.is_file()) / 1e9, 2),
        "steps": len(step_times),
        "steps_per_second": round(len(steady) / sum(steady), 3),
        "batches_with_foreground": float(np.mean(foreground)),
    }


def run_in_memory(args) -> dict:
    import torch

    from medsight.engine.train import TrainConfig, prepare_data
    from medsight.models.registry import build_model

    # The same network in memory as in the streaming runs, so the two start from the same footprint.
    model = build_model("unet3d", in_channels=args.channels, num_classes=4)
    torch.manual_seed(0)
    start = time.perf_counter()
    cfg = TrainConfig(method="unet3d", data=args.data, out=str(Path(args.cache) / "run"), progress=False)
    data = prepare_data(cfg, slice_wise=False)
    return {
        "cases": len(data["train_ids"]) + len(data["val_ids"]),
        "prepare_seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# -- datasets ------------------------------------------------------------------------------------
def grow(full: Path, have: int, n: int, args) -> None:
    """Write phantoms ``have`` .. ``n - 1`` (case i from seed i), so the sizes are made in turn."""
    from medsight import io
    from medsight.datasets.phantom import make_phantom_3d

    for i in range(have, n):
        image, label, _ = make_phantom_3d(
            i, shape=(args.size,) * 3, spacing=(1.0,) * 3, channels=args.channels
        )
        io.write(image, full / "imagesTr" / f"phantom_{i:04d}.nii", overwrite=True)
        io.write(label, full / "labelsTr" / f"phantom_{i:04d}.nii", overwrite=True)


def subset(full: Path, out: Path, n: int, channels: int) -> Path:
    """An MSD dataset of the first ``n`` phantoms of ``full``: its own dataset.json, the same files."""
    from medsight.datasets.phantom import CHANNEL_NAMES_3D, LABELS_3D

    names = [f"phantom_{i:04d}.nii" for i in range(n)]
    manifest = {
        "name": f"Phantom{n}",
        "tensorImageSize": "3D",
        "modality": {str(i): name for i, name in enumerate(CHANNEL_NAMES_3D[:channels])},
        "labels": {"0": "background", **{str(k): v for k, v in LABELS_3D.items()}},
        "numTraining": n,
        "training": [{"image": f"./imagesTr/{x}", "label": f"./labelsTr/{x}"} for x in names],
    }
    out.mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).symlink_to(full / sub)
    (out / "dataset.json").write_text(json.dumps(manifest))
    return out


def render(results: dict) -> str:
    rows = [
        "| cases | cache on disk (GB) | fit (s) | cache build (s) | steps/s | peak RSS main (MB) "
        "| peak RSS main + workers (MB) | peak PSS main + workers (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(results.get("streaming", {}), key=int):
        r = results["streaming"][n]
        m = r["memory"]
        rows.append(
            f"| {n} | {r['cache_gb']} | {r['fit_seconds']} | {r['cache_build_seconds']} | "
            f"{r['steps_per_second']} | {m['main_rss_mb']:.0f} | {m['tree_rss_mb']:.0f} | {m['tree_pss_mb']:.0f} |"
        )
    setup = results.get("setup", {})
    text = [
        "# Streaming training data",
        "",
        f"Generated by `benchmarks/streaming.py` from `streaming.json` ({results.get('date', '')}). "
        f"BraTS-style phantoms: {setup.get('channels')} channels, {setup.get('size')}^3 voxels; "
        f"{setup.get('steps')} steps of unet3d, batch {setup.get('batch_size')}, patch "
        f"{setup.get('patch')}^3, {setup.get('workers')} DataLoader workers, OMP_NUM_THREADS=1, "
        f"on {setup.get('cpus')} CPU cores shared with other jobs. Steps/s excludes the first step.",
        "",
        *rows,
    ]
    for n, r in sorted(results.get("in_memory", {}).items(), key=lambda kv: int(kv[0])):
        m = r["memory"]
        text += [
            "",
            f"For comparison, the in-memory path (`engine.train.prepare_data`, every case read and "
            f"preprocessed before training) on the {n}-case set: peak RSS {m['main_rss_mb']:.0f} MB, "
            f"{r['prepare_seconds']} s, before a single training step.",
        ]
    return "\n".join(text) + "\n"


def write_results(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "streaming.md").write_text(render(results))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--in-memory-cases",
        type=int,
        default=50,
        help="the size (one of --cases) to measure the in-memory path on too; 0: none",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--table", action="store_true", help="only rewrite streaming.md from the json")
    parser.add_argument("--run", choices=["streaming", "in-memory"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # one measured run, in the process the parent monitors
        result = run_streaming(args) if args.run == "streaming" else run_in_memory(args)
        print(json.dumps(result), flush=True)
        return
    path = RESULTS / "streaming.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.table:
        write_results(results)
        return
    sys.path.insert(0, str(ROOT / "src"))
    work = Path(tempfile.mkdtemp(prefix="medsight-streaming-", dir=args.workdir))
    setup = {k: getattr(args, k) for k in ("size", "channels", "steps", "batch_size", "patch", "workers")}
    results.update(setup=setup | {"cpus": os.cpu_count()}, date=time.strftime("%Y-%m-%d"))
    try:
        full, have = work / "phantom", 0
        base = [sys.executable, __file__] + [f"--{k.replace('_', '-')}={v}" for k, v in setup.items()]
        for n in sorted(args.cases):
            tick = time.perf_counter()
            grow(full, have, n, args)
            print(f"wrote phantoms {have}..{n - 1} in {time.perf_counter() - tick:.0f} s", flush=True)
            have = n
            data, cache = subset(full, work / f"data{n}", n, args.channels), work / f"cache{n}"
            result, memory = measured([*base, "--run=streaming", f"--data={data}", f"--cache={cache}"])
            results.setdefault("streaming", {})[str(n)] = {**result, "memory": memory}
            print(n, results["streaming"][str(n)], flush=True)
            write_results(results)
            shutil.rmtree(cache)
            if n == args.in_memory_cases:
                data = subset(full, work / f"memory{n}", n, args.channels)
                run = f"--cache={work / 'run'}"
                result, memory = measured([*base, "--run=in-memory", f"--data={data}", run])
                results.setdefault("in_memory", {})[str(n)] = {**result, "memory": memory}
                print("in memory", n, results["in_memory"][str(n)], flush=True)
                write_results(results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render(results))


if __name__ == "__main__":
    main()
