"""Streaming benchmark: memory and speed of `medsight train` from the on-disk case cache as datasets grow.

    OMP_NUM_THREADS=1 python benchmarks/streaming.py                    # 50 and 200 cases
    OMP_NUM_THREADS=1 python benchmarks/streaming.py --cases 800        # adds 800 (~23 GB of disk)
    OMP_NUM_THREADS=1 python benchmarks/streaming.py --cases --hippocampus --baseline-src ../base/src
    python benchmarks/streaming.py --table                              # rewrite the .md from the .json

Writes BraTS-style phantoms (4 MRI channels, 96^3 voxels, uncompressed NIfTI: 14 MB a case, case i
from seed i) into a temporary folder, growing it from one size to the next; each dataset is a
dataset.json listing its first cases. For each size, a fresh process trains through the segmentation
task's ``train()`` API, the code `medsight train` runs, with its options: ``--method unet3d
--batch-size 2 --patch-size P,P,P --epochs 1 --steps-per-epoch N --num-workers W --max-val-cases 1``
and a fresh ``--cache`` folder, so the run fits the preprocessing and builds the cache
(engine/cache.py) before training. A monitor thread samples that process and its DataLoader workers
from /proc: peak resident memory (RSS) of the main process, peak RSS summed over the process tree,
and peak proportional set size (PSS: pages shared between the main process and its forked workers
counted once) summed over the tree. Steps/s counts training steps only, from the end of the first
step (worker start-up) to the end of the last, validation excluded.

``--hippocampus`` measures context25d on the hippocampus (``--hippocampus-epochs`` x 50 steps, 10
validation cases) twice at once, with this checkout and with the code in ``--baseline-src`` (e.g. a
git worktree of the commit before the cache, whose segmentation task reads every case into memory):
both processes wait for each other after reading their data, so they train under the same load.
Everything written is removed at the end. Results merge into benchmarks/results/streaming.json, from
which streaming.md and the table in benchmarks/README.md (``python benchmarks/tables.py``) are made.
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
HIPPOCAMPUS = ROOT.parent / "shared" / "data" / "hippocampus"


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


class Measured:
    """``cmd`` (which prints one JSON line last) running under the monitor, with ``src`` as the
    medsight it imports; :meth:`result` waits: (its result, memory peaks in MB)."""

    def __init__(self, cmd: list[str], src: Path = ROOT / "src"):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        self.monitor = Monitor(self.proc.pid)
        self.monitor.start()

    def result(self) -> tuple[dict, dict]:
        out, _ = self.proc.communicate()
        self.monitor.done.set()
        self.monitor.join()
        if self.proc.returncode:
            raise SystemExit(f"{' '.join(self.cmd)} failed ({self.proc.returncode})")
        return json.loads(out.strip().splitlines()[-1]), {
            k: round(v, 1) for k, v in self.monitor.peak.items()
        }


def measured(cmd: list[str]) -> tuple[dict, dict]:
    return Measured(cmd).result()


# -- the measured runs (each in its own process) -------------------------------------------------
def instrument(barrier: str | None = None, parties: int = 2) -> dict:
    """Time the segmentation task from inside: reading its data (``prepare``) and the end of every
    training step. With ``barrier`` (a path prefix), wait after ``prepare`` until ``parties``
    processes have got there, so processes started together train side by side."""
    from medsight.tasks.segmentation import SegmentationTask

    marks: dict = {"prepare_seconds": 0.0, "steps": []}
    prepare, batch_end = SegmentationTask.prepare, SegmentationTask.on_train_batch_end

    def timed_prepare(task):
        tick = time.perf_counter()
        prepare(task)
        marks["prepare_seconds"] = round(time.perf_counter() - tick, 1)
        if barrier:
            Path(f"{barrier}.{os.getpid()}").touch()
            deadline = time.time() + 3600  # a partner that died must not hang this run
            while len(list(Path(barrier).parent.glob(Path(barrier).name + ".*"))) < parties:
                if time.time() > deadline:
                    break
                time.sleep(0.2)

    def timed_batch_end(task, outputs, batch, batch_idx):
        batch_end(task, outputs, batch, batch_idx)
        marks["steps"].append((task.current_epoch, time.perf_counter()))

    SegmentationTask.prepare, SegmentationTask.on_train_batch_end = timed_prepare, timed_batch_end
    return marks


def steps_per_second(marks: dict) -> float:
    """Steps after the first of each epoch (which waits for workers, or follows validation)."""
    from itertools import pairwise

    gaps = [b - a for (ea, a), (eb, b) in pairwise(marks["steps"]) if ea == eb]
    return round(len(gaps) / sum(gaps), 3)


def train_timed(args, **options) -> tuple[dict, dict]:
    """The segmentation task's ``train()`` with ``options``; (summary, marks). A medsight without
    the case cache (``--baseline-src``) has no ``cache`` option: it is dropped there."""
    from medsight.tasks.segmentation import SegmentationConfig, train

    marks = instrument(args.barrier)
    if "cache" not in SegmentationConfig.__dataclass_fields__:
        options.pop("cache", None)
    summary = train(SegmentationConfig(**options, overwrite=True, progress=False))
    return summary, marks


def run_streaming(args) -> dict:
    import torch

    torch.set_num_threads(1)
    summary, marks = train_timed(
        args, method="unet3d", data=args.data, out=str(Path(args.cache) / "run"), cache=args.cache,
        epochs=1, steps_per_epoch=args.steps, batch_size=args.batch_size, patch_size=[args.patch] * 3,
        num_workers=args.workers, max_val_cases=1,
    )  # fmt: skip
    return {
        "cases": len(json.loads((Path(args.data) / "dataset.json").read_text())["training"]),
        "prepare_seconds": marks["prepare_seconds"],
        "cache_gb": round(sum(f.stat().st_size for f in Path(args.cache).rglob("*.npy")) / 1e9, 2),
        "steps": len(marks["steps"]),
        "steps_per_second": steps_per_second(marks),
        "train_seconds": summary["train_seconds"],
    }


def run_hippocampus(args) -> dict:
    import torch

    torch.set_num_threads(1)
    summary, marks = train_timed(
        args, method="context25d", data=args.data, out=str(Path(args.cache) / "run"), cache=args.cache,
        epochs=args.hippocampus_epochs, steps_per_epoch=50, max_val_cases=10, num_workers=args.workers,
    )  # fmt: skip
    return {
        "prepare_seconds": marks["prepare_seconds"],
        "steps": len(marks["steps"]),
        "steps_per_second": steps_per_second(marks),
        "train_seconds": summary["train_seconds"],
        "best_val_mean_dice": round(summary["best_val_score"], 4),
    }


def run_in_memory(args) -> dict:
    """The in-memory path of a medsight before the cache (``--baseline-src``): every case read and
    preprocessed before training."""
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


def table(results: dict) -> str:
    """The streaming table with its notes: what benchmarks/README.md and streaming.md show."""
    setup = results.get("setup", {})
    rows = [
        f"BraTS-style phantoms: {setup.get('channels')} channels, {setup.get('size')}^3 voxels. "
        f"`medsight train` code path (`tasks.segmentation.train`): unet3d, 1 epoch of {setup.get('steps')} "
        f"steps, batch {setup.get('batch_size')}, patch {setup.get('patch')}^3, {setup.get('workers')} "
        f"DataLoader workers, a fresh cache (prepare = fit + cache build), OMP_NUM_THREADS=1, "
        f"{setup.get('cpus')} CPU cores shared with other jobs ({results.get('date', '')}). "
        "Steps/s excludes the first step and validation.",
        "",
        "| cases | cache on disk (GB) | prepare (s) | steps/s | peak RSS main (MB) "
        "| peak RSS main + workers (MB) | peak PSS main + workers (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(results.get("streaming", {}), key=int):
        r = results["streaming"][n]
        m = r["memory"]
        rows.append(
            f"| {n} | {r['cache_gb']} | {r['prepare_seconds']} | {r['steps_per_second']} | "
            f"{m['main_rss_mb']:.0f} | {m['tree_rss_mb']:.0f} | {m['tree_pss_mb']:.0f} |"
        )
    for n, r in sorted(results.get("in_memory", {}).items(), key=lambda kv: int(kv[0])):
        rows += [
            "",
            f"For comparison, the in-memory path before the cache (`prepare_data` reading and "
            f"preprocessing every case before training) on the {n}-case set: peak RSS "
            f"{r['memory']['main_rss_mb']:.0f} MB, {r['prepare_seconds']} s, before a single training step.",
        ]
    hippo = results.get("hippocampus")
    if hippo:
        rows += [
            "",
            f"Hippocampus, context25d, {hippo['setup']} ({hippo.get('date', '')}), the two runs side by side "
            "(same load):",
            "",
            "| data path | steps/s | prepare (s) | best val Dice | peak RSS main (MB) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in hippo["runs"].items():
            rows.append(
                f"| {name} | {r['steps_per_second']} | {r['prepare_seconds']} | {r['best_val_mean_dice']} | "
                f"{r['memory']['main_rss_mb']:.0f} |"
            )
    return "\n".join(rows) + "\n"


def render(results: dict) -> str:
    return f"# Streaming training data\n\nGenerated by `benchmarks/streaming.py` from `streaming.json`.\n\n{table(results)}"


def write_results(results: dict, keys: tuple[str, ...] = ()) -> None:
    """Write ``results``, or with ``keys`` only those sections, merged into the file as it is now
    (a run of ``--hippocampus`` and one of ``--cases`` may run side by side)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "streaming.json"
    if keys:
        on_disk = json.loads(path.read_text()) if path.exists() else {}
        results = on_disk | {k: results[k] for k in keys if k in results}
    path.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "streaming.md").write_text(render(results))


def grow_and_measure(args, results: dict, work: Path) -> None:
    setup = {k: getattr(args, k) for k in ("size", "channels", "steps", "batch_size", "patch", "workers")}
    results.update(setup=setup | {"cpus": os.cpu_count()}, date=time.strftime("%Y-%m-%d"))
    base = [sys.executable, __file__] + [f"--{k.replace('_', '-')}={v}" for k, v in setup.items()]
    full, have = work / "phantom", 0
    for n in sorted(args.cases):
        tick = time.perf_counter()
        grow(full, have, n, args)
        print(f"wrote phantoms {have}..{n - 1} in {time.perf_counter() - tick:.0f} s", flush=True)
        have = n
        data, cache = subset(full, work / f"data{n}", n, args.channels), work / f"cache{n}"
        result, memory = measured([*base, "--run=streaming", f"--data={data}", f"--cache={cache}"])
        results.setdefault("streaming", {})[str(n)] = {**result, "memory": memory}
        print(n, results["streaming"][str(n)], flush=True)
        write_results(results, ("setup", "date", "streaming", "in_memory"))
        shutil.rmtree(cache)
        if n == args.in_memory_cases and args.baseline_src:
            data = subset(full, work / f"memory{n}", n, args.channels)
            cmd = [*base, "--run=in-memory", f"--data={data}", f"--cache={work / 'run'}"]
            result, memory = Measured(cmd, args.baseline_src).result()
            results.setdefault("in_memory", {})[str(n)] = {**result, "memory": memory}
            print("in memory", n, results["in_memory"][str(n)], flush=True)
            write_results(results, ("setup", "date", "streaming", "in_memory"))


def hippocampus(args, results: dict, work: Path) -> None:
    """This checkout (the case cache) and ``--baseline-src`` (in memory) side by side."""
    barrier = work / "barrier" / "ready"
    barrier.parent.mkdir()
    base = [
        sys.executable,
        __file__,
        "--run=hippocampus",
        f"--data={args.hippocampus_data}",
        f"--barrier={barrier}",
    ]
    base += [f"--hippocampus-epochs={args.hippocampus_epochs}", f"--workers={args.hippocampus_workers}"]
    runs = {
        "case cache (this checkout)": Measured([*base, f"--cache={work / 'hippo-cache'}"]),
        "in memory (--baseline-src)": Measured(
            [*base, f"--cache={work / 'hippo-memory'}"], args.baseline_src
        ),
    }
    done = {name: run.result() for name, run in runs.items()}
    results["hippocampus"] = {
        "setup": f"{args.hippocampus_epochs} epochs x 50 steps, 10 validation cases, planned batch, "
        f"{args.hippocampus_workers} DataLoader workers, OMP_NUM_THREADS=1",
        "date": time.strftime("%Y-%m-%d"),
        "baseline": str(args.baseline_src),
        "runs": {name: {**result, "memory": memory} for name, (result, memory) in done.items()},
    }
    print(json.dumps(results["hippocampus"], indent=1), flush=True)
    write_results(results, ("hippocampus",))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, nargs="*", default=[50, 200])
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
        help="the size (one of --cases) to measure the in-memory path of --baseline-src on too",
    )
    parser.add_argument("--hippocampus", action="store_true", help="context25d: cache vs --baseline-src")
    parser.add_argument("--hippocampus-data", type=Path, default=HIPPOCAMPUS)
    parser.add_argument("--hippocampus-epochs", type=int, default=3)
    parser.add_argument("--hippocampus-workers", type=int, default=0)
    parser.add_argument("--baseline-src", type=Path, help="src/ of a medsight that trains in memory")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--table", action="store_true", help="only rewrite streaming.md from the json")
    parser.add_argument("--run", choices=["streaming", "in-memory", "hippocampus"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # one measured run, in the process the parent monitors
        run = {"streaming": run_streaming, "in-memory": run_in_memory, "hippocampus": run_hippocampus}
        print(json.dumps(run[args.run](args)), flush=True)
        return
    path = RESULTS / "streaming.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    # Figures of the earlier benchmark (a plain optimiser loop, no prepare time) do not compare.
    results["streaming"] = {n: r for n, r in results.get("streaming", {}).items() if "prepare_seconds" in r}
    if args.table:
        write_results(results, ("setup", "date", "streaming", "in_memory"))
        return
    if args.hippocampus and not args.baseline_src:
        parser.error("--hippocampus needs --baseline-src")
    if args.hippocampus and not args.hippocampus_data.is_dir():
        parser.error(f"no hippocampus dataset in {args.hippocampus_data}; pass --hippocampus-data")
    work = Path(tempfile.mkdtemp(prefix="medsight-streaming-", dir=args.workdir))
    try:
        if args.hippocampus:
            hippocampus(args, results, work)
        if args.cases:
            grow_and_measure(args, results, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render(results))


if __name__ == "__main__":
    main()
