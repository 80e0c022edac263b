"""Super-resolution as a task: prediction geometry, commands, bad input, a tiny training run, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsight import Scan, io
from medsight.engine import checkpoint


def one_error(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("medsight: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def sr_checkpoint(path, mode="inplane", scale=2, channels=1, method="plain"):
    """An untrained sr checkpoint as SRTask writes it (the global residual makes its output close to the
    interpolation, enough for geometry and command tests)."""
    from medsight.tasks.sr import build_network

    config = {
        "in_channels": channels,
        "scale": scale,
        "mode": mode,
        "method": method,
        "features": 8,
        "blocks": 1,
    }
    caption = None
    if method == "semantic":
        caption = {
            "config": {"in_channels": channels, "width": 8, "feature_channels": 16},
            "vocab": {"words": []},
        }
        config["semantic_channels"] = 16
    torch.manual_seed(0)
    net = build_network(config, caption, False)
    payload = {
        "task": "sr",
        "model": {"name": f"sr-{method}", "kind": "sr2d", "kwargs": config},
        "labels": {},
        "preprocessing": {"intensity": "percentile"},
        "sr": {"mode": mode, "scale": scale, "slice_axis": 2},
        "caption": caption,
        "state_dict": net.state_dict(),
    }
    return checkpoint.save(path, payload)


def blob_scan(shape, affine, centre_vox, sigma=1.5):
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre_vox, strict=True))
    return Scan((100 + 900 * np.exp(-d2 / (2 * sigma**2)))[None].astype(np.float32), affine)


def centroid_mm(scan: Scan) -> np.ndarray:
    """Intensity-weighted centroid of the blob above its background, in world mm (worked out here)."""
    arr = scan.array[0].astype(np.float64)
    w = np.clip(arr - 0.5 * arr.max(), 0, None)  # the blob's core only: robust to ringing
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in arr.shape], indexing="ij"), -1)
    vox = (idx * w[..., None]).reshape(-1, arr.ndim).sum(0) / w.sum()
    return scan.affine[:3, : arr.ndim] @ vox + scan.affine[:3, 3]


@pytest.mark.parametrize(("mode", "scale"), [("inplane", 2), ("thick", 4)])
def test_predict_keeps_world_positions(tmp_path, mode, scale):
    from medsight.tasks.sr import SRPredictor

    angle = np.deg2rad(20)
    affine = np.eye(4)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine[:3, :3] = rot @ np.diag([2.0, 2.5, 3.0])
    affine[:3, 3] = [12.0, -40.0, 7.5]
    low = blob_scan((14, 12, 10), affine, (6.3, 5.6, 4.4))
    predictor = SRPredictor(sr_checkpoint(tmp_path / "m.pt", mode, scale), device="cpu")
    high = predictor.predict(low)
    grow = (scale, scale, 1) if mode == "inplane" else (1, 1, scale)
    assert high.spatial_shape == tuple(n * g for n, g in zip(low.spatial_shape, grow, strict=True))
    np.testing.assert_allclose(np.linalg.norm(high.affine[:3, :3], axis=0), np.array([2.0, 2.5, 3.0]) / grow)
    # within a fifth of the smallest low-resolution voxel
    assert np.linalg.norm(centroid_mm(high) - centroid_mm(low)) < 0.2 * 2.0


def test_predict_command_png_odd_size_rgb(tmp_path, cli):
    """A 2D RGB PNG of odd size: every input size upsamples (no crop), output a PNG of the same depth."""
    rng = np.random.default_rng(0)
    io.write(Scan(rng.integers(0, 255, (3, 7, 9)).astype(np.uint8), np.eye(4)), tmp_path / "in.png")
    model = sr_checkpoint(tmp_path / "m.pt", "inplane", 4, channels=3, method="semantic")
    code, out, err = cli("sr", "predict", tmp_path / "in.png", "-m", model, "-o", tmp_path / "out.png")
    assert code in (0, None), err
    result = io.read(tmp_path / "out.png")
    assert result.array.shape == (3, 28, 36) and result.array.dtype == np.uint8


def test_predict_with_reference_writes_the_comparison(tmp_path, cli):
    from medsight.transforms.degrade import DegradeParams, make_pair

    high = blob_scan((32, 32, 12), np.diag([1.0, 1.0, 2.0, 1.0]), (15.2, 17.1, 5.0), sigma=3)
    low, high = make_pair(high, DegradeParams("inplane", 2))
    io.write(low, tmp_path / "low.nii.gz")
    io.write(high, tmp_path / "high.nii.gz")
    model = sr_checkpoint(tmp_path / "m.pt")
    code, out, err = cli(
        "sr", "predict", tmp_path / "low.nii.gz", "-m", model, "-o", tmp_path / "sr.nii.gz",
        "--reference", tmp_path / "high.nii.gz",
    )  # fmt: skip
    assert code in (0, None), err
    page = (tmp_path / "sr_compare.html").read_text()
    assert (
        "sr_compare.png" in page and "interpolated" in page and (tmp_path / "sr_compare.png").stat().st_size
    )
    assert io.read(tmp_path / "sr.nii.gz").same_geometry(high)


def test_evaluate_image_pairs_with_a_mask(tmp_path, cli):
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(1)
    ref = rng.uniform(0, 100, (1, 24, 24, 12)).astype(np.float32)
    pred = ref + rng.normal(0, 3, ref.shape).astype(np.float32)
    mask = np.zeros((1, 24, 24, 12), np.uint8)
    mask[:, 6:18, 6:18, 4:8] = 1
    for folder, arr in (("pred", pred), ("ref", ref), ("mask", mask)):
        io.write(Scan(arr, np.eye(4)), tmp_path / folder / "case1.nii.gz")
    code, out, err = cli(
        "evaluate", "--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--kind", "image",
        "--mask", tmp_path / "mask", "-o", tmp_path / "ev", "--no-report",
    )  # fmt: skip
    assert code in (0, None), err
    import pandas as pd

    row = pd.read_csv(tmp_path / "ev" / "metrics.csv").iloc[0]
    inside = mask[0] > 0
    data_range = float(ref.max() - ref.min())
    expected = peak_signal_noise_ratio(ref[0][inside], pred[0][inside], data_range=data_range)
    assert row["psnr_fg"] == pytest.approx(expected, rel=1e-4)
    assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(ref, pred, data_range=data_range), rel=1e-4)


# -- bad input -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom2d(tmp_path_factory):
    from medsight.datasets.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("p2") / "phantom", 4, dim=2, seed=0)


@pytest.fixture(scope="module")
def phantom3d(tmp_path_factory):
    from medsight.datasets.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("p3") / "phantom", 5, dim=3, seed=0)


def test_thick_mode_on_a_2d_dataset_is_one_line(phantom2d, tmp_path, cli):
    code, _, err = cli(
        "sr", "train", "--data", phantom2d, "--mode", "thick", "--method", "plain", "-o", tmp_path / "r"
    )
    assert code == 2 and "--mode thick needs 3D volumes" in one_error(err)
    assert not (tmp_path / "r").exists()


def test_scale_that_the_mode_does_not_allow_is_one_line(phantom3d, tmp_path, cli):
    code, _, err = cli("sr", "train", "--data", phantom3d, "--scale", "5", "-o", tmp_path / "r")
    assert code == 2 and "--scale for --mode inplane must be one of [2, 3, 4]" in one_error(err)


def test_predict_2d_image_with_a_thick_model_is_one_line(tmp_path, cli):
    io.write(Scan(np.zeros((1, 16, 16), np.uint8), np.eye(4)), tmp_path / "in.png")
    model = sr_checkpoint(tmp_path / "m.pt", "thick", 4)
    code, _, err = cli("sr", "predict", tmp_path / "in.png", "-m", model, "-o", tmp_path / "o.png")
    assert code == 2 and "needs a 3D volume" in one_error(err)
    assert not (tmp_path / "o.png").exists()


def test_predict_refuses_a_checkpoint_of_another_task(tmp_path, cli):
    other = checkpoint.save(
        tmp_path / "seg.pt",
        {
            "task": "segmentation",
            "model": {"name": "unet2d", "kind": "2d"},
            "preprocessing": {},
            "labels": {0: "background", 1: "organ"},
            "state_dict": {},
        },
    )
    io.write(Scan(np.zeros((1, 8, 8, 4), np.float32), np.eye(4)), tmp_path / "in.nii.gz")
    code, _, err = cli("sr", "predict", tmp_path / "in.nii.gz", "-m", other, "-o", tmp_path / "o.nii.gz")
    line = one_error(err)
    assert code == 2 and "not a super-resolution model" in line and "medsight predict" in line


def test_predict_refuses_a_channel_mismatch(tmp_path, cli):
    io.write(Scan(np.zeros((3, 16, 16), np.uint8), np.eye(4)), tmp_path / "in.png")
    model = sr_checkpoint(tmp_path / "m.pt")
    code, _, err = cli("sr", "predict", tmp_path / "in.png", "-m", model, "-o", tmp_path / "o.png")
    assert code == 2 and "has 3 channel(s); the model takes 1" in one_error(err)


# -- training ---------------------------------------------------------------------------------------------
def _psnr(pred, ref):
    from skimage.metrics import peak_signal_noise_ratio

    return peak_signal_noise_ratio(ref, pred, data_range=float(ref.max() - ref.min()))


@pytest.mark.slow
def test_tiny_phantom_run_beats_interpolation(phantom3d, tmp_path):
    """Through the API `medsight sr train` calls; scored on the held-out phantom as `sr predict` does."""
    from medsight.datasets import open_dataset, split_dataset
    from medsight.tasks.sr import SRConfig, SRPredictor, interpolate_scan, train
    from medsight.transforms.degrade import DegradeParams, make_pair

    cfg = SRConfig(
        data=str(phantom3d), out=str(tmp_path / "run"), method="plain", mode="inplane", scale=2,
        epochs=4, steps_per_epoch=25, batch_size=8, crop=32, features=16, blocks=2, progress=False,
        device="cpu", lr=3e-3,
    )  # fmt: skip
    summary = train(cfg)
    dataset = open_dataset(phantom3d)
    val_id = split_dataset(dataset, 0.2, 0)[1][0]
    image, _ = dataset.load_case(dataset.case(val_id))
    low, high = make_pair(image, DegradeParams("inplane", 2))
    sr = SRPredictor(summary["best"]).predict(low)
    interpolated = max(
        _psnr(interpolate_scan(low, 2, "inplane", 2, m).array, high.array) for m in ("bilinear", "bicubic")
    )
    assert _psnr(sr.array, high.array) > interpolated + 1.0
    assert checkpoint.load(summary["best"])["task"] == "sr"


@pytest.mark.slow
def test_semantic_run_records_its_caption_step_and_resumes(phantom3d, tmp_path, cli):
    def args(epochs="2"):
        return [
        "sr", "train", "--data", phantom3d, "--mode", "thick", "--scale", "2", "--method", "semantic",
        "--epochs", epochs, "--steps-per-epoch", "3", "--caption-epochs", "1", "--caption-steps", "3",
        "--batch-size", "4", "--crop", "16", "--features", "8", "--blocks", "1", "--max-val-cases", "1",
        "-o", tmp_path / "run", "--device", "cpu",
        ]  # fmt: skip

    code, out, err = cli(*args())
    assert code in (0, None), err
    best = checkpoint.load(tmp_path / "run" / "best.pt")
    assert (
        best["task"] == "sr" and best["sr"]["mode"] == "thick" and best["caption"]["sentences"] == "dataset"
    )
    assert set(best["caption"]["scores"]) == {"token_accuracy", "bleu4"}
    assert checkpoint.load(tmp_path / "run" / "caption" / "best.pt")["task"] == "caption"
    # a finished run resumes to nothing; more epochs are another experiment and are refused
    code, out, err = cli(*args(), "--resume")
    assert code in (0, None) and "nothing to resume" in out, err
    code, _, err = cli(*args("3"), "--resume")
    assert code == 2 and "was started with other options (--epochs)" in one_error(err)


@pytest.mark.slow
def test_benchmark_quick_mode_writes_every_key(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sr.py"
    spec = importlib.util.spec_from_file_location("benchmark_sr", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(
        ["--quick", "--quiet", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]
    )
    setting = results["results"]["phantom/inplane-x2"]
    for config in ("interpolation", "plain", "semantic", "semantic-shuffled"):
        keys = {"psnr", "ssim", "psnr_fg", "ssim_fg", "seconds_per_volume", "params", "task_dice"}
        assert keys <= set(setting[config]), config
    # the semantic branch (caption encoder + fusion) adds work to the plain network's
    assert 0 < setting["plain"]["gflops_per_volume"] < setting["semantic"]["gflops_per_volume"]
    assert (
        setting["semantic"]["caption"]["shuffled"] is False
        and setting["semantic-shuffled"]["caption"]["shuffled"]
    )
    assert (tmp_path / "out" / "figures" / "sr-phantom-inplane-x2.png").stat().st_size > 0
    assert "| phantom/inplane-x2 | semantic |" in (tmp_path / "out" / "sr-quick.md").read_text()
    page = (tmp_path / "out" / "figures" / "sr-quick.html").read_text()
    assert "<img src='sr-phantom-inplane-x2.png'>" in page
