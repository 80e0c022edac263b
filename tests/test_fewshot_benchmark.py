"""benchmarks/fewshot.py --quick: the phantom smoke run writes every key the README table reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fewshot.py"
METHODS = {"prototype", "local-prototype", "conditional", "supervised-unet2d"}
KEYS = {"mean_dice", "hd95_mm", "seconds_per_query", "support_ids", "query_ids"}


@pytest.mark.parametrize("flags", [[], ["--separate"]], ids=["shared-encoder", "three-models"])
def test_quick_benchmark_writes_every_key(tmp_path, flags):
    spec = importlib.util.spec_from_file_location("fewshot_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--quiet", "--threads", "1", "--out", str(tmp_path), *flags])
    report = json.loads((tmp_path / "fewshot-quick.json").read_text())
    assert set(report["results"]) == {"phantom/cyst", "phantom/tumour"}
    assert not set(report["support_ids"]) & set(report["query_ids"])
    for structure, methods in report["results"].items():
        assert set(methods) == METHODS, structure
        for per_shot in methods.values():
            assert set(per_shot) == {"1", "2"}
            for k, figures in per_shot.items():
                assert set(figures) >= KEYS
                assert 0.0 <= figures["mean_dice"] <= 1.0 and len(figures["support_ids"]) == int(k)
                assert figures["query_ids"] == report["query_ids"]
        for head in METHODS - {"supervised-unet2d"}:  # the support set is embedded once, timed apart
            assert all(f["support_seconds"] > 0 for f in methods[head].values())
    assert report["settings"]["shared_encoder"] == (not flags)
    if not flags:  # one checkpoint serves the three heads
        assert len({report["training"][h]["checkpoint"] for h in METHODS - {"supervised-unet2d"}}) == 1
    table = (tmp_path / "fewshot-quick.md").read_text()
    assert "| phantom/cyst | local-prototype | 1 |" in table
