"""Bad input on the command line: one line naming the file and the problem, exit code 2, nothing
written. The commands run in this process through the real entry point (``medsight.cli.main.main``),
so a traceback fails the test instead of being printed; checkpoints come from tiny phantom runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsight import Scan, io

pytestmark = pytest.mark.usefixtures("single_thread")


def one_error_line(err: str) -> str:
    """The ``medsight: error:`` line, checked to be the only one and the last thing on stderr
    (progress bars of the steps before it may come first)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("medsight: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def phantom3d(tmp_path_factory):
    from medsight.datasets.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("data3d") / "phantom", 3, dim=3, seed=0)


@pytest.fixture(scope="module")
def phantom2d(tmp_path_factory):
    from medsight.datasets.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("data2d") / "phantom", 4, dim=2, seed=0)


@pytest.fixture(scope="module")
def context25d(phantom3d, tmp_path_factory) -> Path:
    from medsight.engine.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ctx")
    config = TrainConfig(
        method="context25d", data=str(phantom3d), out=str(out), slices=3, epochs=1, steps_per_epoch=1,
        batch_size=2, max_val_cases=1, progress=False,
    )  # fmt: skip
    return Path(train(config)["best"])


@pytest.fixture(scope="module")
def fewshot(phantom3d, tmp_path_factory) -> Path:
    from medsight.tasks.fewshot import FewShotConfig, train

    out = tmp_path_factory.mktemp("fewshot")
    config = FewShotConfig(
        data=str(phantom3d), out=str(out), method="fewshot-local-prototype", epochs=1, steps_per_epoch=1,
        batch_size=2, val_episodes=2, overwrite=True, progress=False,
    )  # fmt: skip
    return Path(train(config)["best"])


@pytest.fixture(scope="module")
def lvit(phantom2d, tmp_path_factory) -> Path:
    from medsight.tasks.lvit import TextSegConfig, train_textseg

    out = tmp_path_factory.mktemp("lvit")
    config = TextSegConfig(
        data=str(phantom2d), out=str(out), epochs=1, steps_per_epoch=1, batch_size=1,
        crop_size=128,  # the phantom tiles' own size: the largest crop allowed is accepted
        progress=False,
    )  # fmt: skip
    return Path(train_textseg(config)["best"])


@pytest.fixture(scope="module")
def volume(phantom3d) -> Path:
    return phantom3d / "imagesTr" / "phantom_000.nii.gz"


# -- 1: predict --onnx with a file that is not ONNX ------------------------------------------------------
def test_predict_with_an_unreadable_onnx_file_names_it(cli, context25d, volume, tmp_path):
    bad = tmp_path / "not_an_onnx_file"
    bad.write_bytes(b"certainly not a protobuf")
    code, _, err = cli("predict", volume, "-m", context25d, "--onnx", bad, "-o", tmp_path / "out")
    line = one_error_line(err)
    assert code == 2 and f"{bad}: not a readable ONNX model" in line
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_predict_with_an_onnx_model_of_another_network_names_it(cli, context25d, volume, tmp_path):
    import warnings

    other = tmp_path / "other.onnx"  # a readable ONNX model whose input is one 2D picture, not a stack
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Conv2d(1, 2, 3), (torch.zeros(1, 1, 8, 8),), str(other), dynamo=False)
    code, _, err = cli("predict", volume, "-m", context25d, "--onnx", other, "-o", tmp_path / "out")
    line = one_error_line(err)
    assert code == 2 and f"{other}: does not fit the checkpoint {Path(context25d).name}" in line
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# -- 2: predict with a checkpoint of another trainer -----------------------------------------------------
def test_predict_with_a_fewshot_checkpoint_points_to_the_fewshot_command(cli, fewshot, volume, tmp_path):
    code, _, err = cli("predict", volume, "-m", fewshot, "-o", tmp_path / "out")
    line = one_error_line(err)
    assert code == 2 and f"{fewshot}: is a few-shot model" in line and "`medsight fewshot`" in line
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_predict_with_a_text_guided_checkpoint_points_to_textseg(cli, lvit, phantom2d, tmp_path):
    tile = sorted((phantom2d / "Val_Folder" / "img").iterdir())[0]
    code, _, err = cli("predict", tile, "-m", lvit, "-o", tmp_path / "out")
    line = one_error_line(err)
    assert code == 2 and f"{lvit}: is a text-guided model" in line and "`medsight textseg predict`" in line
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# -- 3: export ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fewshot", "lvit"])
def test_export_refuses_checkpoints_the_engine_cannot_build(cli, which, request, tmp_path):
    ckpt = request.getfixturevalue(which)
    code, _, err = cli("export", ckpt, "--onnx", tmp_path / "m.onnx")
    line = one_error_line(err)
    assert code == 2 and f"{ckpt}: is a " in line
    assert (
        "ONNX export supports the segmentation-engine checkpoints (unet2d, context25d, unet3d) only" in line
    )
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_export_shows_no_tracer_warnings(cli, context25d, tmp_path):
    """Every warning recorded; only deprecation notices (hidden by Python's default filters) may remain."""
    import warnings

    target = tmp_path / "ctx.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = cli("export", context25d, "--onnx", target)
    shown = [w for w in caught if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)]
    assert code == 0 and err == "" and out.strip() == f"wrote {target}" and target.stat().st_size > 0
    assert not shown, [f"{w.category.__name__}: {w.message}" for w in shown]


# -- 4: model summary --volume ----------------------------------------------------------------------------
@pytest.mark.parametrize("volume_option", ["36,52", "a,b,c", "36,0,36", "36,52,36,4"])
def test_summary_needs_three_positive_sizes(cli, volume_option):
    code, _, err = cli("model", "summary", "context25d", "--volume", volume_option)
    line = one_error_line(err)
    assert code == 2 and "--volume needs three positive integers like 36,52,36" in line


@pytest.mark.parametrize("name", ["unet2d", "unet3d"])
def test_summary_prints_the_volume_as_given(cli, name):
    import json

    code, out, _ = cli("model", "summary", name, "--volume", "36,52,40", "--json")
    assert code == 0 and json.loads(out)["volume_shape"] == [36, 52, 40]


# -- 5: info --series on a file that is not DICOM ---------------------------------------------------------
def test_series_option_on_a_nifti_file_says_it_is_for_dicom(cli, volume):
    code, _, err = cli("info", volume, "--series", "foo")
    line = one_error_line(err)
    assert code == 2 and f"{volume}: --series applies to DICOM only" in line and "TypeError" not in line


# -- 6: a writer's error names the target, not the temporary file -----------------------------------------
def test_convert_volume_to_picture_names_the_target(cli, volume, tmp_path):
    target = tmp_path / "out.png"
    code, _, err = cli("convert", volume, target)
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"medsight: error: {target}: only 2D scans")
    assert list(tmp_path.iterdir()) == []  # nor is the temporary file left behind


# -- 7: overlay --slice out of range, and a non-PNG name ---------------------------------------------------
def test_overlay_slice_out_of_range_is_refused(cli, phantom3d, volume, tmp_path):
    label = phantom3d / "labelsTr" / "phantom_000.nii.gz"
    n = io.read(volume).spatial_shape[2]  # the phantom's axial axis is its third
    code, _, err = cli("overlay", volume, "--label", label, "-o", tmp_path / "ov.png", "--slice", 999)
    line = one_error_line(err)
    assert code == 2 and f"{volume}: slice 999 is out of range" in line and f"0 to {n - 1}" in line
    assert not (tmp_path / "ov.png").exists()
    code, _, err = cli("overlay", volume, "--label", label, "-o", tmp_path / "ov.png", "--slice", n - 1)
    assert code == 0 and (tmp_path / "ov.png").exists()


def test_overlay_refuses_a_name_that_is_not_png(cli, volume, tmp_path):
    code, _, err = cli("overlay", volume, "-o", tmp_path / "ov.jpg")
    line = one_error_line(err)
    assert code == 2 and f"{tmp_path / 'ov.jpg'}: overlays are written as PNG" in line
    assert list(tmp_path.iterdir()) == []


# -- 8: textseg train -o <a file> ---------------------------------------------------------------------------
def test_textseg_train_into_a_file_is_refused_before_reading(cli, phantom2d, tmp_path):
    target = tmp_path / "scan.nii.gz"
    io.write(Scan(np.zeros((1, 4, 4, 2), np.float32)), target)
    before = target.read_bytes()
    code, _, err = cli(
        "textseg", "train", "--data", phantom2d, "-o", target, "--epochs", 1, "--steps-per-epoch", 1
    )
    line = one_error_line(err)
    assert code == 2 and f"{target}: is a file; the run needs a folder" in line
    assert len(err.strip().splitlines()) == 1  # no progress bar: no image was read
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == before


# -- 9: the overwrite hint ----------------------------------------------------------------------------------
def test_overwrite_hint_speaks_to_cli_and_python_users(cli, volume, tmp_path):
    target = tmp_path / "copy.nii.gz"
    target.write_bytes(b"keep me")
    code, _, err = cli("convert", volume, target)
    line = one_error_line(err)
    assert code == 2 and line.endswith(
        "already exists; pass --overwrite (or overwrite=True in Python) to replace it"
    )
    assert target.read_bytes() == b"keep me"


# -- 10: a training crop larger than every image ------------------------------------------------------------
def test_textseg_crop_larger_than_every_image_is_refused(cli, phantom2d, tmp_path):
    """At --scale 0.25 the 128-px phantom tiles are 32 px: a 256-px crop would be nearly all padding."""
    out = tmp_path / "run"
    code, _, err = cli(
        "textseg", "train", "--data", phantom2d, "-o", out, "--crop", 256, "--scale", 0.25,
        "--epochs", 1, "--steps-per-epoch", 1, "--batch-size", 1,
    )  # fmt: skip
    line = one_error_line(err)
    assert code == 2 and f"{phantom2d}: crop 256 px is larger than every training image" in line
    assert "largest side 32 px" in line and "--crop 32 or less" in line
    assert not out.exists()  # not even the text cache: sentences are embedded once a run is accepted


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--slice-planes", "2"], "--slice-planes must be 1 or 3"),
        (["--slice-planes", "3", "--method", "unet3d"], "--slice-planes must be 1 or 3"),
        (["--slice-planes", "3"], ": --slice-planes 3 needs near-isotropic voxels; these are 1 x 1 x 2.5 mm"),
    ],
)
def test_three_slicing_planes_are_refused_where_they_mean_nothing(cli, phantom3d, tmp_path, args, problem):
    code, _, err = cli("train", "--data", phantom3d, "--out", tmp_path / "run", "--epochs", "1", *args)
    assert code == 2 and problem in one_error_line(err)
    assert not (tmp_path / "run").exists()
