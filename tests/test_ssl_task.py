"""The pretraining task and its transfer: `medsight pretrain`, `medsight train --init`, and the
few-label options `--labeled-cases` / `--labeled-ids`. Phantom data only."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsight.datasets import open_dataset, split_dataset
from medsight.datasets.phantom import write_phantom_dataset
from medsight.engine import checkpoint
from medsight.errors import MedsightError
from medsight.models.registry import build_model
from medsight.models.ssl import PretextUNet
from medsight.tasks.segmentation import SegmentationConfig, labeled_subset, prepare_data
from medsight.tasks.ssl import PretrainConfig, PretrainTask, init_from_pretrained, pretrain

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ssl") / "phantom", 8, seed=3)


def _pretrain_checkpoint(path: Path, in_channels: int = 1, seed: int = 0) -> PretextUNet:
    """A pretraining checkpoint as the task stores it, with random (not trained) weights."""
    torch.manual_seed(seed)
    kwargs = {"in_channels": in_channels, "n_views": 2, "position": True, "restoration": False}
    net = PretextUNet(**kwargs)
    checkpoint.save(
        path,
        {
            "task": "pretrain",
            "model": {"name": "pretext-unet2d", "kind": "2d", "kwargs": kwargs},
            "state_dict": net.state_dict(),
            "labels": {},
            "preprocessing": {},
        },
    )
    return net


# -- --init -----------------------------------------------------------------------------------------
def test_init_loads_exactly_the_layers_it_reports(tmp_path):
    pretrained = _pretrain_checkpoint(tmp_path / "ssl.pt")
    torch.manual_seed(1)
    seg = build_model("unet2d", in_channels=1, num_classes=3)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    record = init_from_pretrained(seg, tmp_path / "ssl.pt", "unet2d")
    after, source = seg.state_dict(), pretrained.unet.state_dict()
    loaded, kept = set(record["loaded"]), set(record["not_loaded"])
    assert loaded | kept == set(after) and not loaded & kept
    assert record["loaded_layers"] == len(loaded) > 0
    for name in loaded:  # the pretrained tensors, bit for bit
        assert torch.equal(after[name], source[name]), name
    for name in kept:  # untouched: the fresh network's own
        assert torch.equal(after[name], before[name]), name
    # what cannot transfer (its shape holds the 3 classes, not the pretext's 16 features) is not loaded,
    # and only the top block (the network's last layer) is left out
    differs = {k for k in after if k in source and after[k].shape != source[k].shape}
    assert differs and differs <= kept
    assert {k.split(".")[2] for k in kept} == {str(max(int(k.split(".")[2]) for k in after))}
    assert record["sha256"] == hashlib.sha256((tmp_path / "ssl.pt").read_bytes()).hexdigest()


def test_init_refuses_an_incompatible_network_or_checkpoint(tmp_path):
    _pretrain_checkpoint(tmp_path / "two.pt", in_channels=2)
    seg = build_model("unet2d", in_channels=1, num_classes=2)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    with pytest.raises(MedsightError, match="shape mismatch"):
        init_from_pretrained(seg, tmp_path / "two.pt", "unet2d")
    assert all(torch.equal(v, before[k]) for k, v in seg.state_dict().items())  # nothing loaded
    with pytest.raises(MedsightError, match="unet2d only"):
        init_from_pretrained(build_model("context25d", 1, 2, slices=5), tmp_path / "two.pt", "context25d")


def test_train_init_with_another_network_is_one_line_exit_2(tmp_path, phantom, cli):
    _pretrain_checkpoint(tmp_path / "ssl.pt")
    out = tmp_path / "run"
    code, _, err = cli(
        "train", "--data", phantom, "--method", "context25d", "--init", tmp_path / "ssl.pt", "-o", out
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "unet2d only" in lines[0] and "Traceback" not in err
    assert not out.exists()
    seg_like = tmp_path / "seg.pt"  # a checkpoint of another task
    checkpoint.save(seg_like, {"task": "segmentation", "model": {"name": "unet2d"}, "state_dict": {},
                               "labels": {}, "preprocessing": {}})  # fmt: skip
    code, _, err = cli("train", "--data", phantom, "--method", "unet2d", "--init", seg_like, "-o", out)
    assert code == 2 and err.count("\n") == 1 and "medsight pretrain" in err


# -- --labeled-cases / --labeled-ids ---------------------------------------------------------------------
def test_labeled_cases_are_seeded_and_drawn_from_the_training_cases():
    train = [f"case{i:02d}" for i in range(30)]
    val = [f"val{i}" for i in range(5)]
    a = labeled_subset(train, val, 5, None, seed=0, root=".")
    assert a == labeled_subset(train, val, 5, None, seed=0, root=".")
    assert a != labeled_subset(train, val, 5, None, seed=1, root=".")
    assert len(a) == len(set(a)) == 5 and set(a) <= set(train)
    draws = {tuple(labeled_subset(train, val, 1, None, seed=s, root=".")) for s in range(20)}
    assert len(draws) > 5  # the seed really moves the draw
    assert labeled_subset(train, val, None, ["case03", "case01"], 0, ".") == ["case01", "case03"]
    with pytest.raises(MedsightError, match="validation"):
        labeled_subset(train, val, None, ["case01", "val2"], 0, ".")
    with pytest.raises(MedsightError, match="between 1 and 30"):
        labeled_subset(train, val, 31, None, 0, ".")


def test_labeled_cases_never_touch_the_validation_split(phantom):
    full_train, full_val = split_dataset(open_dataset(phantom), 0.25, 0)
    for seed in (0, 1, 2):
        data = prepare_data(
            SegmentationConfig(method="unet2d", data=str(phantom), val_fraction=0.25, seed=seed, split_seed=0,
                               labeled_cases=2),
            kind="2d", progress=False,
        )  # fmt: skip
        assert data["val_ids"] == full_val and len(data["val"]) == len(full_val)
        assert len(data["train_ids"]) == 2 == len(data["train"])
        assert set(data["train_ids"]) <= set(full_train) and not set(data["train_ids"]) & set(full_val)


# -- training ------------------------------------------------------------------------------------------
def _val_mse(model: torch.nn.Module, samples: list[dict]) -> float:
    """Heatmap + position MSE on the held-out samples, computed here from the targets."""
    model.eval()
    total = []
    with torch.no_grad():
        for s in samples:
            out = model(torch.from_numpy(s["input"]))
            heat = torch.mean((out["heatmap"] - torch.from_numpy(s["heatmap"])) ** 2)
            pos = torch.mean((out["position"] - torch.from_numpy(s["position"])) ** 2)
            total.append(float(heat + pos))
    return float(np.mean(total))


@pytest.mark.slow
def test_a_tiny_phantom_pretraining_lowers_the_pretext_loss(tmp_path, phantom):
    cfg = PretrainConfig(data=str(phantom), out=str(tmp_path / "ssl"), pretext="planes+position", epochs=2,
                         steps_per_epoch=15, size=24, stack_slices=4, ema_decay=0.0, progress=False)  # fmt: skip
    task = PretrainTask(cfg)
    task.prepare()
    samples = task.data.value["val_samples"]
    torch.manual_seed(cfg.seed)
    untrained = _val_mse(PretextUNet(**task.model_kwargs), samples)
    summary = pretrain(cfg)
    payload = checkpoint.load(summary["best"])
    assert payload["task"] == "pretrain" and payload["pretext"] == "planes+position"
    assert payload["transferable"]["into"] == "unet2d" and payload["transferable"]["layers"] > 0
    trained = PretextUNet(**payload["model"]["kwargs"])
    trained.load_state_dict(payload["state_dict"])
    assert _val_mse(trained, samples) < 0.7 * untrained
    assert {"val_angle_error_deg", "val_offset_px", "val_position_error"} <= set(summary["best_epoch"])


@pytest.mark.slow
def test_pretrain_then_fine_tune_end_to_end(tmp_path, phantom, cli):
    code, out, _ = cli("pretrain", "--data", phantom, "--pretext", "genesis", "-o", tmp_path / "ssl",
                       "--epochs", 1, "--steps-per-epoch", 3, "--size", 24)  # fmt: skip
    assert code in (0, None) and "genesis" in out
    best = tmp_path / "ssl" / "best.pt"
    code, out, _ = cli("train", "--data", phantom, "--method", "unet2d", "--init", best, "--labeled-cases", 2,
                       "-o", tmp_path / "ft", "--epochs", 1, "--steps-per-epoch", 3)  # fmt: skip
    assert code in (0, None)
    payload = checkpoint.load(tmp_path / "ft" / "best.pt")
    init = payload["init"]
    assert init["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest() and init["pretext"] == "genesis"
    assert init["loaded_layers"] == len(init["loaded"]) == checkpoint.load(best)["transferable"]["layers"]
    assert len(payload["data"]["train_ids"]) == 2
    image = next((phantom / "imagesTr").iterdir())
    code, _, _ = cli("predict", image, "-m", tmp_path / "ft" / "best.pt", "-o", tmp_path / "masks")
    assert code in (0, None)
    from medsight import io

    mask, scan = io.read(next((tmp_path / "masks").iterdir())), io.read(image)
    assert mask.spatial_shape == scan.spatial_shape and np.allclose(mask.affine, scan.affine)


@pytest.mark.slow
def test_quick_benchmark_writes_every_key(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("ssl_benchmark", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--quiet", "--work", str(tmp_path / "work"), "--out", str(tmp_path)])
    results = json.loads((tmp_path / "ssl-quick.json").read_text())
    for config in ("scratch", "planes", "position", "planes+position", "genesis"):
        row = results["results"]["1"][config]
        assert len(row["mean_dice"]["per_draw"]) == 1 and 0.0 <= row["mean_dice"]["mean"] <= 1.0
        assert "hd95_mm" in row
    assert {"angle_error_deg", "offset_px", "position_error"} <= set(results["pretext"]["planes+position"])
    assert results["budgets"]["pretrain"]["planes"]["steps"] > 0
    assert "| 1 | planes+position |" in (tmp_path / "ssl-quick.md").read_text()


def test_a_dicom_study_trains_on_its_true_plane_tags(tmp_path):
    from dicom_factory import write_series

    rng = np.random.default_rng(0)
    study = tmp_path / "study"
    # axial stack: pixel (row r, col c) of slice s sits at LPS (10 + c, -20 + r, 30 + 2 s), 1 mm pixels
    write_series(study / "axial", rng.integers(0, 500, (9, 16, 16)), (1, 0, 0), (0, 1, 0), (1.0, 1.0), 2.0,
                 (10.0, -20.0, 30.0), frame_of_reference_uid="1.2.3.4")  # fmt: skip
    # coronal series (normal +y): its central slice lies at y = -16 + 2 = -14, i.e. row 6 of every axial image
    write_series(study / "coronal", rng.integers(0, 500, (3, 16, 16)), (1, 0, 0), (0, 0, -1), (1.0, 1.0), 2.0,
                 (10.0, -16.0, 40.0), frame_of_reference_uid="1.2.3.4")  # fmt: skip
    cfg = PretrainConfig(data=str(study), out=str(tmp_path / "ssl"), pretext="planes+position", size=16,
                         spacing=1.0, sigma=2.0, stack_slices=9, progress=False)  # fmt: skip
    task = PretrainTask(cfg)
    task.prepare()
    assert task.dicom and task.model_kwargs["n_views"] == 1
    sample = task.data.value["val_samples"][0]
    assert sample["heatmap"].shape == (9, 1, 16, 16)
    assert np.allclose(sample["heatmap"][:, 0, 6, :], 1.0, atol=1e-4)
    assert np.allclose(sample["heatmap"][:, 0, 8, :], np.exp(-4 / 8), atol=1e-4)
    assert np.allclose(sample["position"], np.arange(9) / 8)
    batch = task.make_batch(np.random.default_rng(0))
    assert batch["input"].shape == (18, 1, 16, 16) and torch.isfinite(batch["input"]).all()


def test_a_plain_folder_of_scans_is_read_without_labels(tmp_path, phantom):
    import shutil

    from medsight.tasks.ssl import read_volumes

    folder = tmp_path / "scans"
    folder.mkdir()
    for image in sorted((phantom / "imagesTr").iterdir())[:4]:
        shutil.copy(image, folder / image.name)
    data = read_volumes(PretrainConfig(data=str(folder), val_fraction=0.25), progress=False)
    assert len(data["train"]) == 3 and len(data["val"]) == 1
    assert not set(data["train_ids"]) & set(data["val_ids"])
    for scan in data["train"] + data["val"]:  # z-scored for the network, geometry kept
        assert abs(float(scan.array.mean())) < 0.05 and abs(float(scan.array.std()) - 1) < 0.05
    with pytest.raises(MedsightError):
        read_volumes(PretrainConfig(data=str(tmp_path / "empty")), progress=False)
