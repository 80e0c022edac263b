"""The docs/cli.md walkthrough, end to end through `main()` as a user types it, on phantom data the
commands make themselves, with budgets of a few steps. Only the chains no other test runs through the
command line: segmentation (train with --cache -> predict --largest-component --probabilities ->
export -> predict --onnx -> evaluate --images -> overlay), textseg (train --grounded --labeled-fraction
-> predict --text-sheet / --text --tta) and `sr degrade`. pretrain -> train --init, fewshot and
sr train/predict are run by tests/test_ssl_task.py, tests/test_fewshot.py and tests/test_sr_task.py."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medsight import Scan, io


def ok(result):
    code, out, err = result
    assert code in (0, None), err
    return out


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    return tmp_path_factory.mktemp("walk")


@pytest.mark.slow
def test_segmentation_walkthrough(walk, cli, single_thread):
    data, run, cache = walk / "phantom3d", walk / "runs" / "ctx", walk / "cache"
    ok(cli("phantom", data, "--cases", 4, "--size", 24))
    ok(cli("train", "--data", data, "--method", "context25d", "-o", run, "--epochs", 1,
           "--steps-per-epoch", 2, "--batch-size", 2, "--slices", 3, "--cache", cache))  # fmt: skip
    assert {"best.pt", "last.pt", "metrics.csv", "summary.json", "training_curve.png"} <= {
        p.name for p in run.iterdir()
    }
    assert any(cache.rglob("*.npy")), "--cache must hold the preprocessed cases"

    masks = walk / "masks"
    ok(cli("predict", data / "imagesTr", "-m", run / "best.pt", "-o", masks, "--largest-component",
           "--probabilities"))  # fmt: skip
    for image in sorted((data / "imagesTr").glob("*.nii.gz")):
        scan, mask = io.read(image), io.read(masks / image.name)
        probabilities = io.read(masks / image.name.replace(".nii.gz", "_prob.nii.gz"))
        assert mask.same_geometry(scan) and probabilities.same_geometry(scan)
        assert probabilities.channels == 4  # background, cyst, vessel, tumour
        assert np.allclose(probabilities.array.sum(0), 1, atol=1e-3)

    ok(cli("export", run / "best.pt", "--onnx", walk / "ctx.onnx"))
    ok(cli("predict", data / "imagesTr" / "phantom_000.nii.gz", "-m", run / "best.pt", "--onnx",
           walk / "ctx.onnx", "-o", walk / "masks-onnx", "--largest-component"))  # fmt: skip
    onnx = io.read(walk / "masks-onnx" / "phantom_000.nii.gz").array
    torch_mask = io.read(walk / "masks" / "phantom_000.nii.gz").array
    assert onnx.shape == torch_mask.shape and np.mean(onnx == torch_mask) > 0.99

    ok(cli("evaluate", "--pred", masks, "--ref", data / "labelsTr", "--images", data / "imagesTr",
           "-o", walk / "evaluation"))  # fmt: skip
    rows = pd.read_csv(walk / "evaluation" / "metrics.csv")
    row = rows[(rows["case"] == "phantom_001") & (rows["label"] == "tumour")].iloc[0]
    pred = io.read(masks / "phantom_001.nii.gz").array == 3
    ref = io.read(data / "labelsTr" / "phantom_001.nii.gz").array == 3
    assert row["dice"] == pytest.approx(2 * (pred & ref).sum() / (pred.sum() + ref.sum()), abs=1e-6)
    assert (walk / "evaluation" / "report.html").stat().st_size > 0

    ok(cli("overlay", data / "imagesTr" / "phantom_000.nii.gz", "--label", data / "labelsTr" / "phantom_000.nii.gz",
           "--pred", masks / "phantom_000.nii.gz", "-o", walk / "overlay.png", "--title", "case 0"))  # fmt: skip
    assert io.read(walk / "overlay.png").array.shape[0] in (3, 4)


@pytest.mark.slow
def test_textseg_walkthrough(walk, cli, single_thread):
    data, run = walk / "phantom2d", walk / "runs" / "lvit"
    ok(cli("phantom", data, "--cases", 4, "--dim", 2))
    out = ok(cli("textseg", "train", "--data", data, "--method", "lvit", "-o", run, "--epochs", 1,
                 "--steps-per-epoch", 1, "--crop", 64, "--labeled-fraction", 0.5, "--grounded",
                 "--no-progress"))  # fmt: skip
    assert "(2 labeled, 1 unlabeled images)" in out  # 3 training images, half of them keep masks
    assert json.loads((run / "summary.json").read_text())
    image = next((data / "Val_Folder" / "img").glob("*.png"))
    ok(cli("textseg", "predict", data / "Val_Folder" / "img", "-m", run / "best.pt", "--text-sheet",
           data / "Val_Folder" / "Val_text.xlsx", "-o", walk / "text-masks"))  # fmt: skip
    ok(cli("textseg", "predict", image, "-m", run / "best.pt", "--text", "Nuclei are dense in the upper left.",
           "--tta", "-o", walk / "text-masks-tta"))  # fmt: skip
    for folder in ("text-masks", "text-masks-tta"):
        mask = io.read(walk / folder / image.name).array
        assert mask.shape[1:] == io.read(image).spatial_shape
        assert set(np.unique(mask)) <= {0, 255}  # the LViT masks' own values


def test_sr_degrade_thick_by_hand_with_its_reference(tmp_path, cli):
    rng = np.random.default_rng(0)
    array = rng.uniform(0, 1000, (1, 6, 5, 10)).astype(np.float32)
    affine = np.diag([0.5, 0.7, 1.2, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.0]
    io.write(Scan(array, affine), tmp_path / "high.nii.gz")
    ok(cli("sr", "degrade", tmp_path / "high.nii.gz", "--scale", 3, "--mode", "thick", "--profile", "box",
           "-o", tmp_path / "low.nii.gz", "--high", tmp_path / "ref.nii.gz"))  # fmt: skip
    low, ref = io.read(tmp_path / "low.nii.gz"), io.read(tmp_path / "ref.nii.gz")
    # 10 slices crop to 9; each thick slice is the mean of 3, centred on the middle one
    assert np.allclose(ref.array, array[..., :9]) and np.allclose(ref.affine, affine)
    assert np.allclose(low.array, array[..., :9].reshape(1, 6, 5, 3, 3).mean(-1), atol=1e-3)
    expected = affine.copy()
    expected[:3, 2] *= 3
    expected[:3, 3] += [0, 0, 1.2]
    assert np.allclose(low.affine, expected)


def test_sr_degrade_keeps_a_pictures_bit_depth_and_never_half_writes(tmp_path, cli):
    picture = np.arange(3 * 4 * 6, dtype=np.uint8).reshape(3, 4, 6) * 3
    io.write(Scan(picture, np.eye(4)), tmp_path / "tile.png")
    ok(
        cli(
            "sr",
            "degrade",
            tmp_path / "tile.png",
            "--scale",
            2,
            "--profile",
            "box",
            "-o",
            tmp_path / "low.png",
        )
    )
    low = io.read(tmp_path / "low.png").array
    blocks = picture.astype(np.float64).reshape(3, 2, 2, 3, 2).mean((2, 4))
    assert low.dtype == np.uint8 and np.array_equal(low, np.rint(blocks).astype(np.uint8))

    (tmp_path / "ref.png").write_bytes(b"keep")
    code, _, err = cli("sr", "degrade", tmp_path / "tile.png", "-o", tmp_path / "new.png", "--high",
                       tmp_path / "ref.png")  # fmt: skip
    assert code == 2 and "ref.png: already exists" in err and not (tmp_path / "new.png").exists()


def test_pretrain_on_a_study_of_parallel_series_says_what_to_do(tmp_path, cli):
    """An ordinary study (every series axial) has no true planes: one line naming the way that works."""
    from dicom_factory import write_series

    rng = np.random.default_rng(0)
    for name, origin in (("t1", (0.0, 0.0, 0.0)), ("flair", (0.0, 0.0, 1.0))):
        write_series(tmp_path / "study" / name, rng.integers(0, 500, (4, 8, 8)), (1, 0, 0), (0, 1, 0),
                     (1.0, 1.0), 2.0, origin, frame_of_reference_uid="1.2.3.4")  # fmt: skip
    code, _, err = cli("pretrain", "--data", tmp_path / "study", "-o", tmp_path / "ssl", "--epochs", 1)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "all parallel" in err and "medsight convert" in err
    assert not (tmp_path / "ssl" / "best.pt").exists()
