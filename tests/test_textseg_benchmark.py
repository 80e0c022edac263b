"""benchmarks/textseg.py --quick: the phantom smoke run writes (and merges into) the results files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "textseg.py"
KEYS = {"dice", "iou", "dice_tta", "iou_tta", "train_seconds", "evaluated_folder", "labeled_ids"}


def load_script():
    spec = importlib.util.spec_from_file_location("textseg_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quick_benchmark_merges_configurations(tmp_path):
    bench = load_script()
    earlier = {"dice": 0.5, "iou": 1 / 3, "train_seconds": 1.0, "evaluated_folder": "/x/Val_Folder",
               "labeled_ids": ["a"]}  # fmt: skip
    (tmp_path / "textseg-quick.json").write_text(json.dumps({"lvit@1.0": earlier}))
    bench.main(["--quick", "--quiet", "--configs", "unet2d@0.5,lvit-noepi@0.5", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "textseg-quick.json").read_text())
    assert set(results) == {"lvit@1.0", "unet2d@0.5", "lvit-noepi@0.5"}  # the earlier entry is kept
    assert results["lvit@1.0"] == earlier
    for name in ("unet2d@0.5", "lvit-noepi@0.5"):
        entry = results[name]
        assert set(entry) >= KEYS
        assert 0.0 <= entry["iou"] <= entry["dice"] <= 1.0
        assert 0.0 <= entry["iou_tta"] <= entry["dice_tta"] <= 1.0
        assert Path(entry["evaluated_folder"]).name == "Val_Folder"
        assert len(entry["labeled_ids"]) == 3  # half of the phantom's 6 training images (seed 0)
    assert results["lvit-noepi@0.5"]["settings"]["use_epi"] is False
    assert results["lvit-noepi@0.5"]["settings"]["use_lv_loss"] is True
    table = (tmp_path / "textseg-quick.md").read_text()
    assert (
        "| unet2d@0.5 |" in table and "| lvit@1.0 | 50.00 | 33.33 | - | - | - |" in table
    )  # no TTA, no budget


def test_bad_configuration_names_are_refused():
    bench = load_script()
    with pytest.raises(SystemExit, match="bad configuration"):
        bench.parse_config("vnet@0.5")
    with pytest.raises(SystemExit, match="fraction"):
        bench.parse_config("lvit@1.5")
    for bad in ("lvit@1.0:40", "lvit@1.0:xmin", "lvit@1.0:0min"):
        with pytest.raises(SystemExit, match="bad"):
            bench.parse_config(bad)
    assert bench.parse_config("lvit-nolv@0.25") == ("lvit-nolv", 0.25, None)
    assert bench.parse_config("lvit@1.0:40min") == ("lvit", 1.0, 40.0)
    assert bench.parse_config("unet2d@0.5:7.5min") == ("unet2d", 0.5, 7.5)


def test_repeated_seeds_are_filed_apart_and_summarised_by_their_median():
    bench = load_script()
    assert bench.result_key("lvit@1.0:40min", 0) == "lvit@1.0:40min"
    assert bench.result_key("lvit@1.0:40min", 2) == "lvit@1.0:40min/seed2"

    def run(dice, **tta):
        return {"dice": dice, "iou": dice / (2 - dice), "train_seconds": 1.0, "evaluated_folder": "/x/Val_Folder",
                "labeled_ids": ["a"], **tta}  # fmt: skip

    results = {
        "lvit@1.0": run(0.80, dice_tta=0.84, iou_tta=0.7),
        "lvit@1.0/seed1": run(0.83, dice_tta=0.82, iou_tta=0.7),
        "lvit@1.0/seed2": run(0.81, dice_tta=0.85, iou_tta=0.7),
        "unet2d@1.0": run(0.7),
        "unet2d@1.0/seed1": run(0.6, dice_tta=0.9, iou_tta=0.8),
        "unet2d@0.5": run(0.5),
    }
    table = bench.table(results)
    assert "| lvit@1.0/seed1 | 83.00 |" in table
    # medians of 80, 83, 81 and, with TTA, of 84, 82, 85
    assert "| lvit@1.0 | 3 | 80.00, 83.00, 81.00 | 81.00 | 84.00 |" in table
    assert "| unet2d@1.0 | 2 | 70.00, 60.00 | 65.00 | - |" in table  # one run without TTA: no TTA median
    assert "| unet2d@1.0/seed1 | 60.00 | 42.86 | 90.00 | 80.00 |" in table
    assert "| unet2d@0.5 | 1 |" not in table  # a single run has no repeats row
