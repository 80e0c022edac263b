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
    runs = ["--runs", str(tmp_path / "runs")]
    bench.main(["--quick", "--quiet", "--threads", "1", "--out", str(tmp_path), *runs, *flags])
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
            assert all(0.0 <= f["no_neighbours"]["mean_dice"] <= 1.0 for f in methods[head].values())
    assert report["settings"]["shared_encoder"] == (not flags)
    if not flags:  # one checkpoint serves the three heads
        assert len({report["training"][h]["best"] for h in METHODS - {"supervised-unet2d"}}) == 1
    table = (tmp_path / "fewshot-quick.md").read_text()
    assert "| phantom/cyst | local-prototype | 1 |" in table
    if flags:
        return
    # --checkpoint evaluates the trained model again without training: the heads' figures repeat
    checkpoint = report["training"]["prototype"]["best"]
    again = bench.main(
        ["--quick", "--quiet", "--threads", "1", "--out", str(tmp_path / "again"), "--checkpoint", checkpoint]
    )
    for head in METHODS - {"supervised-unet2d"}:
        assert again["training"][head]["trained_in_this_run"] is False
        for structure in report["results"]:
            first, second = report["results"][structure][head], again["results"][structure][head]
            assert [f["mean_dice"] for f in first.values()] == [f["mean_dice"] for f in second.values()]


def test_a_checkpoint_trained_or_validated_on_evaluation_cases_is_refused(tmp_path):
    from medsight.datasets.phantom import write_phantom_dataset
    from medsight.errors import MedsightError
    from medsight.tasks.fewshot import FewShotConfig, train

    spec = importlib.util.spec_from_file_location("fewshot_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = write_phantom_dataset(tmp_path / "data", 2, seed=0)
    summary = train(
        FewShotConfig(
            data=str(data), out=str(tmp_path / "run"), method="fewshot-shared", epochs=1, steps_per_epoch=2,
            val_episodes=4, progress=False,
        )
    )  # fmt: skip
    for seen in (summary["case_ids"][0], summary["val_ids"][0]):
        with pytest.raises(MedsightError, match=f"trained on evaluation cases {seen}"):
            bench.load_trained(Path(summary["best"]), [seen, "elsewhere"])
    predictors, _ = bench.load_trained(Path(summary["best"]), ["elsewhere"])
    assert set(predictors) == {"prototype", "local-prototype", "conditional"}


def test_benchmark_training_options_are_the_cli_options():
    """No training setting only the benchmark can reach: each of its training options is an option of
    `medsight train` under the same name, and reaches the task's config unchanged."""
    import typer

    from medsight.cli.main import app
    from medsight.tasks.fewshot import FewShotConfig

    spec = importlib.util.spec_from_file_location("fewshot_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse(["--epochs", "7", "--steps-per-epoch", "9", "--lr", "0.004", "--batch-size", "3"])
    options = bench.loop_options(args)
    train = typer.main.get_command(app).commands["train"]
    cli_options = {opt for param in train.params for opt in param.opts}
    assert {"--" + name.replace("_", "-") for name in options} <= cli_options
    cfg = FewShotConfig(**options)
    assert (cfg.epochs, cfg.steps_per_epoch, cfg.lr, cfg.batch_size, cfg.patience) == (7, 9, 0.004, 3, 7)
