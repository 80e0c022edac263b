"""The 2D supervised path: `medsight train`/`predict`/`evaluate` on a folder of pictures.

The data is a DRIVE-like folder (``training/`` and ``test/``, each with ``images/``, ``1st_manual/``
and the field-of-view ``mask/``) of 2D phantom tiles, written by the test. Expected values come from
the files themselves (read with Pillow, Dice counted here), not from medsight's own output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsight import Scan

pytestmark = pytest.mark.usefixtures("single_thread")

N_TRAIN, N_TEST, SIZE = 6, 2, 64


def write_drive_like(root: Path, rgb: bool = True) -> Path:
    from medsight.datasets.phantom import make_phantom_2d

    for split, seeds in (("training", range(N_TRAIN)), ("test", range(N_TRAIN, N_TRAIN + N_TEST))):
        for sub in ("images", "1st_manual", "mask"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            image, label, _ = make_phantom_2d(seed, shape=(SIZE, SIZE), rgb=rgb)
            name = f"case_{seed:02d}.png"
            pixels = image.array[0] if not rgb else np.moveaxis(image.array, 0, -1)
            Image.fromarray(pixels).save(root / split / "images" / name)
            Image.fromarray((label.array[0] > 0).astype(np.uint8) * 255).save(
                root / split / "1st_manual" / name
            )
            Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(root / split / "mask" / name)
    return root


@pytest.fixture(scope="module")
def drive(tmp_path_factory) -> Path:
    return write_drive_like(tmp_path_factory.mktemp("drive") / "DRIVE")


def error_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("medsight: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("method", ["context25d", "unet3d"])
def test_a_3d_method_on_pictures_is_refused_in_one_line(drive, tmp_path, cli, method):
    code, _, err = cli("train", "--data", drive, "--method", method, "-o", tmp_path / "run", "--epochs", 1)
    line = error_line(err)
    assert code == 2 and f"--method {method}" in line and "--method unet2d" in line, line
    assert not (tmp_path / "run" / "best.pt").exists()


@pytest.mark.slow
def test_train_predict_evaluate_on_a_drive_like_folder(drive, tmp_path, cli):
    run = tmp_path / "run"
    code, out, err = cli(
        "train", "--data", drive, "--method", "unet2d", "-o", run, "--epochs", 3, "--steps-per-epoch", 10,
        "--batch-size", 4, "--mirror-axes", "0,1", "--ema-decay", 0, "--augmentation", "none",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["val_ids"]) != []
    # DRIVE's test/ split never trains or validates (test cases are held out by the layout)
    assert not any(cid in summary["val_ids"] for cid in ("case_06", "case_07"))

    masks = tmp_path / "masks"
    code, out, err = cli("predict", drive / "test" / "images", "-m", run / "best.pt", "-o", masks)
    assert code == 0, err
    written = sorted(p.name for p in masks.glob("*.png"))
    assert written == ["case_06.png", "case_07.png"]
    assert (masks / "medsight-provenance.json").is_file()
    dices = []
    for name in written:
        pred = np.asarray(Image.open(masks / name))
        ref = np.asarray(Image.open(drive / "test" / "1st_manual" / name))
        assert pred.shape == ref.shape == (SIZE, SIZE)  # the input picture's own grid
        assert set(np.unique(pred)) <= {0, 255}  # the values the training masks stored
        p, r = pred > 0, ref > 0
        dices.append(2 * (p & r).sum() / (p.sum() + r.sum()))
    assert np.mean(dices) > 0.5, dices  # dark nuclei on pink: learnt in 30 steps

    # --tta on a model trained with all eight symmetries averages over all eight: the prediction of
    # a transposed picture is then the transposed prediction (four mirror images alone are not).
    from medsight import io
    from medsight.engine.infer import Predictor

    predictor = Predictor(run / "best.pt", tta=True)
    picture = io.read(drive / "test" / "images" / "case_06.png")
    _, probs = predictor.predict(picture)
    _, probs_t = predictor.predict(picture.with_array(np.swapaxes(picture.array, 1, 2).copy()))
    assert np.allclose(np.swapaxes(probs_t.array, 1, 2), probs.array, atol=1e-5)

    report = tmp_path / "evaluation"
    code, out, err = cli(
        "evaluate", "--pred", masks, "--ref", drive / "test" / "1st_manual", "-o", report, "--no-report"
    )
    assert code == 0, err
    scores = json.loads((report / "summary.json").read_text())["summary"]
    assert list(scores) == ["255"]  # the references' own foreground value
    assert scores["255"]["dice"]["mean"] == pytest.approx(np.mean(dices), abs=1e-6)


@pytest.mark.slow
def test_grey_pictures_at_half_resolution_come_back_on_their_grid(tmp_path, cli):
    """--spacing 2,2 trains on half-size pictures; the masks are resampled back to the input's size,
    and a 2D NIfTI input (stored as one slice) gets a NIfTI mask with its own affine."""
    import nibabel as nib

    drive = write_drive_like(tmp_path / "grey", rgb=False)
    run = tmp_path / "run"
    code, _, err = cli(
        "train", "--data", drive, "--method", "unet2d", "-o", run, "--epochs", 1, "--steps-per-epoch", 2,
        "--batch-size", 2, "--spacing", "2,2",
    )  # fmt: skip
    assert code == 0, err
    picture = np.asarray(Image.open(drive / "test" / "images" / "case_06.png"))
    affine = np.diag([0.5, 0.25, 1.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 2.0]
    nib.save(nib.Nifti1Image(picture.astype(np.float32), affine), tmp_path / "scan2d.nii.gz")
    masks = tmp_path / "masks"
    code, _, err = cli(
        "predict", drive / "test" / "images" / "case_06.png", tmp_path / "scan2d.nii.gz", "-m", run / "best.pt",
        "-o", masks,
    )  # fmt: skip
    assert code == 0, err
    assert np.asarray(Image.open(masks / "case_06.png")).shape == picture.shape
    mask = nib.load(masks / "scan2d.nii.gz")
    assert mask.shape[:2] == picture.shape and np.allclose(mask.affine, affine)

    code, _, err = cli(
        "predict", drive / "test" / "images" / "case_06.png", "-m", run / "best.pt", "-o", tmp_path / "rgb",
    )  # fmt: skip
    assert code == 0, err
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(rgb)
    code, _, err = cli("predict", rgb, "-m", run / "best.pt", "-o", tmp_path / "rgb-out")
    assert code == 2 and "3 channel(s) but the model was trained on 1" in error_line(err)


def test_sampler_transposes_pictures_into_all_eight_symmetries():
    """Both in-plane mirrors plus transposition draw the dihedral group of the square (8 views);
    volumes (and pictures without both mirrors) never transpose."""
    from medsight.engine.sampling import PatchSampler

    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    label = (image[0] > 10).astype(np.int64)
    views = {np.rot90(image[0, :, :, 0], k).tobytes() for k in range(4)}
    views |= {np.rot90(image[0, :, :, 0].T, k).tobytes() for k in range(4)}
    assert len(views) == 8

    def seen(**options) -> set[bytes]:
        sampler = PatchSampler([image], [label], "2d", (4, 4), 1, np.random.default_rng(0), **options)
        return {sampler.sample()[0][0].tobytes() for _ in range(200)}

    assert seen(mirror_axes=(0, 1), transpose=True) == views
    flips = seen(mirror_axes=(0, 1))
    assert len(flips) == 4 and flips < views


def test_spacing_option_resamples_pictures():
    from medsight.engine.preprocess import Preprocessing, as_picture, as_volume
    from medsight.scan import Scan

    picture = Scan(np.random.default_rng(0).random((3, 40, 60)).astype(np.float32))
    volume = as_volume(picture)
    assert volume.spatial_shape == (40, 60, 1) and np.array_equal(volume.affine, picture.affine)
    assert np.array_equal(as_picture(volume).array, picture.array)
    label = Scan(np.zeros((1, 40, 60, 1), np.int64))
    pre = Preprocessing.fit([volume], [label], None, slice_wise=True, slice_axis=2, spacing=[2.0, 2.0])
    assert pre.image(volume).spatial_shape == (20, 30, 1)
    with pytest.raises(ValueError, match="2 positive values"):
        Preprocessing.fit([volume], [label], None, slice_wise=True, slice_axis=2, spacing=[2.0])


def test_resampling_keeps_the_new_grid_while_monai_tracking_is_off():
    from monai.data import get_track_meta, set_track_meta

    from medsight.engine.preprocess import Preprocessing

    scan = Scan(np.zeros((1, 8, 8, 4), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    set_track_meta(False)
    try:
        out = Preprocessing([2.0, 2.0, 2.0]).resample(scan)
    finally:
        set_track_meta(True)
    assert out.spatial_shape == (4, 4, 4) and np.allclose(np.diag(out.affine)[:3], 2.0)
    assert get_track_meta()
