"""benchmarks/segmentation.py --quick: the smoke run on a phantom writes the JSON the README table reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "segmentation.py"
KEYS = {"mean_dice", "dice", "hd95_mm", "train_seconds", "infer_seconds_per_volume", "peak_mem_mb", "params",
        "gflops_per_volume", "val_ids"}  # fmt: skip


def test_quick_benchmark_writes_every_key(tmp_path):
    spec = importlib.util.spec_from_file_location("segmentation_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(
        [
            "--quick",
            "--quiet",
            "--methods",
            "unet2d,context25d",
            "--out",
            str(tmp_path),
            "--runs",
            str(tmp_path / "runs"),
        ]
    )
    results = json.loads((tmp_path / "segmentation-quick.json").read_text())
    for method in ("unet2d", "context25d"):
        figures = results["methods"][method]
        assert set(figures) >= KEYS
        assert set(figures["dice"]) == {"cyst", "vessel", "tumour"}
        assert figures["val_ids"] and all(0.0 <= d <= 1.0 for d in figures["dice"].values())
    assert results["methods"]["context25d"]["params"] < results["methods"]["unet2d"]["params"]
    assert "| context25d |" in (tmp_path / "segmentation-quick.md").read_text()

    # another process adds training seeds to unet2d only; the main runs on disk stay as they were
    bench.main(["--quick", "--quiet", "--spread-only", "--spread-methods", "unet2d", "--spread-seeds", "3",
                "--out", str(tmp_path), "--runs", str(tmp_path / "runs-seed3")])  # fmt: skip
    merged = json.loads((tmp_path / "segmentation-quick.json").read_text())
    assert merged["methods"] == results["methods"]
    spread = merged["seed_spread"]["unet2d"]
    assert set(spread["mean_dice_by_seed"]) == {"0", "3"}
    assert spread["mean_dice_by_seed"]["0"] == results["methods"]["unet2d"]["mean_dice"]
    assert spread["median"] == np.median(list(spread["mean_dice_by_seed"].values()))
