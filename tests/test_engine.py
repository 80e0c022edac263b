"""The segmentation engine on a tiny phantom: geometry of predictions, checkpoints, resume, DDP,
ONNX parity and bad input. Runs are a few optimiser steps: correctness, not quality."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from medsight import MedsightError, Scan, io
from medsight.datasets.phantom import write_phantom_dataset
from medsight.engine import checkpoint
from medsight.engine.infer import Predictor, largest_components
from medsight.engine.train import TrainConfig, class_weights, train

MEDSIGHT = [sys.executable, "-m", "medsight.cli.main"]
TINY = dict(epochs=2, steps_per_epoch=2, batch_size=2, max_val_cases=1, progress=False)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "phantom", 4, dim=3, seed=0)


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = train(TrainConfig(method="context25d", data=str(phantom), out=str(out), slices=3, **TINY))
    return summary


def test_run_folder_has_checkpoints_log_and_curve(trained):
    from pathlib import Path

    run = Path(trained["last"]).parent
    assert {"best.pt", "last.pt", "metrics.csv", "training_curve.png", "summary.json"} <= {
        p.name for p in run.iterdir()
    }
    payload = checkpoint.load(trained["best"])
    assert payload["model"]["name"] == "context25d" and payload["model"]["slices"] == 3
    assert payload["labels"] == {0: "background", 1: "cyst", 2: "vessel", 3: "tumour"}
    assert payload["data"]["val_ids"] == trained["val_ids"]
    assert payload["slice_axes"] == [2]  # one slicing plane (the default), the coarse axis


def test_prediction_keeps_the_input_geometry(trained, phantom):
    image = io.read(next((phantom / "imagesTr").glob("*.nii.gz")))
    theta = np.deg2rad(25)  # an oblique, shifted affine the model never saw: the output must carry it
    affine = image.affine.copy()
    affine[:3, :3] = (
        np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
        @ affine[:3, :3]
    )
    affine[:3, 3] += [5.0, -7.0, 11.0]
    scan = Scan(image.array, affine)
    labels, probs = Predictor(trained["best"]).predict(scan)
    assert labels.spatial_shape == scan.spatial_shape and np.allclose(labels.affine, affine)
    assert set(np.unique(labels.array)) <= {0, 1, 2, 3}
    assert probs.channels == 4 and np.allclose(probs.array.sum(axis=0), 1.0, atol=1e-4)


def test_prediction_on_a_finer_grid_is_resampled_back(trained, phantom):
    """A scan at half the training slice spacing is resampled for the network and back again."""
    image = io.read(next((phantom / "imagesTr").glob("*.nii.gz")))
    affine = image.affine.copy()
    affine[:3, 0] *= 0.5  # in-plane spacing halved: working grid differs from the scan's
    scan = Scan(image.array, affine)
    labels, _ = Predictor(trained["best"]).predict(scan)
    assert labels.spatial_shape == scan.spatial_shape and np.allclose(labels.affine, affine)


def test_checkpoint_round_trip_gives_the_same_output(trained, phantom, tmp_path):
    image = io.read(next((phantom / "imagesTr").glob("*.nii.gz")))
    first = Predictor(trained["best"]).predict(image)[1].array
    payload = checkpoint.load(trained["best"])
    checkpoint.save(tmp_path / "copy.pt", payload)
    again = Predictor(tmp_path / "copy.pt").predict(image)[1].array
    assert np.array_equal(first, again)


def test_onnx_export_gives_the_same_masks(trained, phantom, tmp_path):
    pytest.importorskip("onnxruntime")
    from medsight.engine.export import export_onnx

    onnx_path = export_onnx(trained["best"], tmp_path / "model.onnx")
    image = io.read(next((phantom / "imagesTr").glob("*.nii.gz")))
    torch_labels, torch_probs = Predictor(trained["best"]).predict(image)
    onnx_labels, onnx_probs = Predictor(trained["best"], backend="onnx", onnx_path=onnx_path).predict(image)
    assert np.abs(torch_probs.array - onnx_probs.array).max() < 1e-4
    assert (torch_labels.array != onnx_labels.array).mean() < 1e-4


def _box_label(shape, box) -> Scan:
    array = np.zeros((1, *shape), np.int64)
    array[(0, *(slice(a, b) for a, b in box))] = 1
    return Scan(array, np.eye(4))


def test_slice_axis_is_the_coarsest_or_else_across_the_labels_long_axis():
    from medsight.engine.preprocess import choose_slice_axis

    along_y = _box_label((30, 40, 30), [(10, 16), (5, 35), (10, 18)])  # 6 x 30 x 8 voxels
    along_x = _box_label((30, 40, 30), [(2, 28), (10, 14), (10, 14)])
    empty = _box_label((30, 40, 30), [(0, 0)] * 3)
    assert choose_slice_axis(np.array([1.0, 1.0, 3.0]), [along_y]) == 2  # thick slices win over shape
    assert choose_slice_axis(np.array([0.8, 2.0, 0.8]), [along_y]) == 1
    assert choose_slice_axis(np.array([1.0, 1.0, 1.0]), [along_y, along_y, along_x]) == 1  # median
    assert choose_slice_axis(np.array([1.0, 1.0, 1.0]), [along_x]) == 0
    assert choose_slice_axis(np.array([1.0, 1.0, 1.0]), [empty]) == 2


def test_a_chosen_slice_axis_is_trained_stored_and_predicted_along(phantom, tmp_path):
    """Slices along voxel axis 0 of the 64x64x40 phantom: in-plane patches are 64 x 40 (padded to 48)."""
    summary = train(
        TrainConfig(
            method="unet2d", data=str(phantom), out=str(tmp_path), slice_axis=0, **{**TINY, "epochs": 1}
        )
    )
    payload = checkpoint.load(summary["best"])
    assert payload["preprocessing"]["slice_axis"] == 0 and payload["patch"] == [64, 48]
    image = io.read(next((phantom / "imagesTr").glob("*.nii.gz")))
    labels, _ = Predictor(summary["best"]).predict(image)
    assert labels.spatial_shape == image.spatial_shape == (64, 64, 40)


def test_class_weights_by_hand():
    labels = [np.array([0] * 90 + [1] * 9 + [2] * 1)]
    assert np.allclose(class_weights(labels, 3), [1.0, 1 + np.log(10), 1 + np.log(90)])


def test_largest_component_per_class():
    labels = np.zeros((10, 10, 3), np.uint8)
    labels[0:2, 0:2, 0] = 1  # 4 voxels
    labels[5:9, 5:9, 1] = 1  # 16 voxels: kept
    labels[0, 9, 2] = 2
    out = largest_components(labels)
    assert out[0:2, 0:2, 0].sum() == 0 and (out[5:9, 5:9, 1] == 1).all() and out[0, 9, 2] == 2


@pytest.mark.parametrize("method", ["unet2d", "unet3d"])
def test_baselines_train_and_predict(method, phantom, tmp_path):
    summary = train(TrainConfig(method=method, data=str(phantom), out=str(tmp_path), **{**TINY, "epochs": 1}))
    image = io.read(next((phantom / "imagesTr").glob("*.nii.gz")))
    labels, _ = Predictor(summary["best"]).predict(image)
    assert labels.spatial_shape == image.spatial_shape


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, data, out, result_dir):
    os.environ.update(  # what torchrun sets
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", TORCHELASTIC_RUN_ID="test",
    )  # fmt: skip
    torch.set_num_threads(1)
    _, model = train(
        TrainConfig(method="context25d", data=data, out=out, slices=3, **TINY), return_model=True
    )
    torch.save(model.state_dict(), f"{result_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_hold_the_same_weights(phantom, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(
        _ddp_worker, args=(2, _free_port(), str(phantom), str(tmp_path / "run"), str(tmp_path)), nprocs=2
    )
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # each rank samples different slices (its own seed stream), so only gradient averaging keeps them equal
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("ema_decay", ["0", "0.9"])
def test_resume_after_kill_matches_an_unbroken_run(phantom, tmp_path, ema_decay):
    """With a weight average, resuming must restore both the weights and their average."""
    args = ["train", "--data", str(phantom), "--method", "context25d", "--slices", "3", "--epochs", "3",
            "--steps-per-epoch", "2", "--batch-size", "2", "--max-val-cases", "1", "--ema-decay", ema_decay]  # fmt: skip
    unbroken = subprocess.run([*MEDSIGHT, *args, "-o", str(tmp_path / "a")], capture_output=True, text=True)
    assert unbroken.returncode == 0, unbroken.stderr
    proc = subprocess.Popen(
        [*MEDSIGHT, *args, "-o", str(tmp_path / "b")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 1800  # generous: only a hung run should reach it, however busy the machine
    while not (tmp_path / "b" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epochs_done = len(checkpoint.load(tmp_path / "b" / "last.pt")["training"]["history"])
    assert epochs_done < 3, "the run finished before it could be interrupted"
    resumed = subprocess.run(
        [*MEDSIGHT, *args, "-o", str(tmp_path / "b"), "--resume"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = (checkpoint.load(tmp_path / r / "last.pt") for r in ("a", "b"))
    assert len(b["training"]["history"]) == 3
    pairs = [(a["state_dict"], b["state_dict"])]
    if ema_decay != "0":  # the average, and the weights it averages (which differ from it)
        pairs.append((a["training"]["weights"], b["training"]["weights"]))
        assert not all(torch.equal(a["state_dict"][k], a["training"]["weights"][k]) for k in a["state_dict"])
    for left, right in pairs:
        for key in left:
            assert torch.allclose(left[key], right[key], atol=1e-5), key


# -- bad input ------------------------------------------------------------------------------------------
def test_resume_with_another_method_is_refused(trained, phantom):
    from pathlib import Path

    run = Path(trained["last"]).parent
    with pytest.raises(MedsightError, match="checkpoint is for method 'context25d', not 'unet2d'"):
        train(TrainConfig(method="unet2d", data=str(phantom), out=str(run), resume=True, **TINY))


def test_predict_with_wrong_channel_count(trained, tmp_path, run_cli):
    two = Scan(np.zeros((2, 16, 16, 8), np.float32))
    io.write(two, tmp_path / "two.nii.gz")
    result = run_cli(
        "predict", str(tmp_path / "two.nii.gz"), "--model", trained["best"], "-o", str(tmp_path / "out")
    )
    assert result.returncode == 2 and "2 channel(s) but the model was trained on 1" in result.stderr


def test_corrupt_checkpoint(tmp_path, run_cli):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02 definitely not a checkpoint")
    scan = tmp_path / "s.nii.gz"
    io.write(Scan(np.zeros((1, 8, 8, 4), np.float32)), scan)
    result = run_cli("predict", str(scan), "--model", str(bad), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "bad.pt: corrupt or unreadable checkpoint" in result.stderr
    torch.save({"weights": 1}, tmp_path / "other.pt")
    result = run_cli("predict", str(scan), "--model", str(tmp_path / "other.pt"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "not a medsight checkpoint" in result.stderr


def test_weights_of_another_layout_give_a_one_line_error(trained, tmp_path, run_cli):
    """A checkpoint whose weights do not fit the network this version builds (an older layout)."""
    payload = torch.load(trained["best"], map_location="cpu", weights_only=False)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if "head" not in k}
    payload["medsight_version"] = "0.0.1"
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    scan = tmp_path / "s.nii.gz"
    io.write(Scan(np.zeros((1, 8, 8, 4), np.float32)), scan)
    result = run_cli("predict", str(scan), "--model", str(old), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "old.pt: weights do not fit" in result.stderr and "medsight 0.0.1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_mirror_axes_land_on_the_right_sample_axes():
    from medsight.engine.sampling import sample_axes

    # 3D patches (C, X, Y, Z): scan axis a is image axis 1 + a and label axis a
    assert sample_axes("3d", 1, slice_axis=2) == (2, 1)
    # stacks (C, k, H, W) sliced along axis 1: H is scan axis 0, W scan axis 2, k the slice axis
    assert sample_axes("2.5d", 0, slice_axis=1) == (2, 0)
    assert sample_axes("2.5d", 2, slice_axis=1) == (3, 1)
    assert sample_axes("2.5d", 1, slice_axis=1) == (1, None)
    # single slices (C, H, W): no stack axis to mirror
    assert sample_axes("2d", 2, slice_axis=0) == (2, 1)
    assert sample_axes("2d", 0, slice_axis=0) is None


def test_mirrored_samples_keep_image_and_label_aligned():
    """The image is the voxel's index along scan axis 0 and the label marks index >= 6, so in every
    sample, mirrored or not, label == (image >= 6); both orientations must occur."""
    from medsight.engine.sampling import PatchSampler, to_working

    index = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None], (10, 8, 6))
    image, label = index[None], (index >= 6).astype(np.int64)
    work_x, work_y = to_working(image, 1), to_working(label[None], 1)[0]  # slice along axis 1
    sampler = PatchSampler(
        [work_x], [work_y], "2.5d", (10, 6), 3, np.random.default_rng(0), mirror_axes=[0], slice_axis=1
    )
    increasing = []
    for _ in range(40):
        x, y = sampler.sample()
        assert x.shape == (1, 3, 10, 6) and y.shape == (10, 6)
        np.testing.assert_array_equal(y, x[0, 1] >= 6)
        increasing.append(bool(x[0, 1, 1, 0] > x[0, 1, 0, 0]))
    assert 5 < sum(increasing) < 35


def test_weight_average_by_hand():
    """Weights 1, 2, 3, 4 averaged with decay 0.2: the first update copies; then the decay is
    min(0.2, (1 + n) / (10 + n)) after n updates: 2/11, then 0.2, 0.2."""
    from medsight.engine.train import weight_average

    net = torch.nn.Linear(1, 1, bias=False)
    average = weight_average(net, 0.2)
    expected = [1.0, 2 / 11 * 1 + 9 / 11 * 2, None, None]
    expected[2] = 0.2 * expected[1] + 0.8 * 3
    expected[3] = 0.2 * expected[2] + 0.8 * 4
    for value, want in zip([1.0, 2.0, 3.0, 4.0], expected, strict=True):
        net.weight.data.fill_(value)
        average.update_parameters(net)
        assert average.module.weight.item() == pytest.approx(want, rel=1e-6)
    assert weight_average(net, 0.0) is None
    with pytest.raises(MedsightError, match="decay must be in"):
        weight_average(net, 1.0)


def test_view_sets_are_the_grid_symmetries_and_map_back():
    from itertools import permutations

    from medsight.engine.tta import average_over_views, dihedral_views, mirror_views

    # The symmetries of a 2x2 square keep 0 and 3 on one diagonal: 4 places for 0, 2 for 1, so 8 grids.
    square = np.array([[0, 1], [2, 3]])
    symmetric = {p for p in permutations(range(4)) if p.index(0) + p.index(3) == 3}  # cells 0+3 or 1+2
    views = dihedral_views()
    assert len(symmetric) == 8 and {tuple(into(square).ravel()) for into, _ in views} == symmetric
    assert (views[0][0](square) == square).all()  # the identity first

    volume = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    flips = [volume, volume[:, ::-1], volume[:, :, :, ::-1], volume[:, ::-1, :, ::-1]]
    mirrors = mirror_views([1, 3])
    assert len(mirrors) == 4
    for (into, _), expected in zip(mirrors, flips, strict=True):
        np.testing.assert_array_equal(into(volume), expected)
    for into, back in mirrors:
        np.testing.assert_array_equal(back(into(volume)), volume)
    for into, back in views:  # a non-square plane: a quarter turn changes the shape, back restores it
        np.testing.assert_array_equal(back(into(volume[0, 0])), volume[0, 0])
    # a prediction that is the view itself, mapped back, is the input every time
    np.testing.assert_allclose(average_over_views(lambda v: v, volume[0].astype(float), views), volume[0])


def test_parse_axes():
    from medsight.engine.tta import parse_axes

    assert parse_axes("0,2") == [0, 2] and parse_axes("") == [] and parse_axes(" 1 ") == [1]
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_axes("left")


def test_test_time_mirroring_averages_each_view_mapped_back():
    """A position-dependent network, class-1 logit = row index h: at row h the plain probability is
    sigmoid(h); mirrored along the rows (scan axis 0, slices along axis 2) it is sigmoid(H - 1 - h),
    so TTA gives their mean."""
    from medsight.engine.infer import probabilities

    def forward(x):
        rows = np.arange(x.shape[2], dtype=np.float32)[None, :, None]
        logit = np.broadcast_to(rows, (x.shape[0], x.shape[2], x.shape[3]))
        return np.stack([np.zeros_like(logit), logit], axis=1)

    image = np.random.default_rng(0).normal(size=(1, 7, 5, 3)).astype(np.float32)
    sigmoid = 1 / (1 + np.exp(-np.arange(7.0)))
    plain = probabilities(forward, image, "2d", 1, None, slice_axis=2)
    tta = probabilities(forward, image, "2d", 1, None, slice_axis=2, mirror_axes=(0,))
    np.testing.assert_allclose(plain[1, :, 2, 1], sigmoid, rtol=1e-6)
    np.testing.assert_allclose(tta[1, :, 2, 1], (sigmoid + sigmoid[::-1]) / 2, rtol=1e-6)


def test_three_slicing_planes_average_each_plane_mapped_back():
    """A network whose class-1 logit is the row index of its input plane: sliding along scan axis 2
    or 1 the rows are scan axis 0 (logit x), along axis 0 they are scan axis 1 (logit y), so the
    three planes average to (2 sigmoid(x) + sigmoid(y)) / 3."""
    from medsight.engine.infer import probabilities

    def forward(x):
        rows = np.arange(x.shape[-2], dtype=np.float32)[None, :, None]
        logit = np.broadcast_to(rows, (x.shape[0], x.shape[-2], x.shape[-1]))
        return np.stack([np.zeros_like(logit), logit], axis=1)

    image = np.random.default_rng(0).normal(size=(1, 7, 5, 3)).astype(np.float32)
    sigmoid = 1 / (1 + np.exp(-np.arange(7.0)))
    planes = probabilities(forward, image, "2.5d", 3, None, slice_axis=[2, 0, 1])
    x, y = np.meshgrid(np.arange(7), np.arange(5), indexing="ij")
    expected = (2 * sigmoid[x] + sigmoid[y]) / 3
    for z in range(3):
        np.testing.assert_allclose(planes[1, :, :, z], expected, rtol=1e-6)


def test_three_plane_model_trains_on_each_plane_and_predicts_their_mean(tmp_path):
    cubes = write_phantom_dataset(tmp_path / "cubes", 3, dim=3, seed=0, shape=(32, 24, 16))  # 1 mm voxels
    summary = train(
        TrainConfig(method="context25d", data=str(cubes), out=str(tmp_path / "run"), slices=3, slice_planes=3,
                    slice_axis=1, **{**TINY, "batch_size": None, "steps_per_epoch": 6})
    )  # fmt: skip
    payload = checkpoint.load(summary["best"])
    assert payload["slice_axes"] == [1, 0, 2]  # the slice axis first, then the other two
    # each plane its own window over its in-plane axes, the extents rounded up to 16
    assert payload["plan"]["plane_patches"] == [[32, 16], [32, 16], [32, 32]]
    image = io.read(next((cubes / "imagesTr").glob("*.nii.gz")))
    predictor = Predictor(summary["best"])
    mean = predictor.predict(image)[1].array
    single = []
    for axis in (0, 1, 2):
        predictor.slice_axes = (axis,)
        single.append(predictor.predict(image)[1].array)
    np.testing.assert_allclose(mean, np.mean(single, axis=0), atol=1e-5)
    assert not np.allclose(single[0], single[2], atol=1e-3)  # the planes do see different inputs
    stretched = Scan(image.array, image.affine @ np.diag([1.0, 1.0, 2.5, 1.0]), path=image.path)
    with pytest.raises(MedsightError, match=r"has 1 x 1 x 2.5 mm voxels .* needs near-isotropic"):
        Predictor(summary["best"]).predict(stretched)
    if importlib.util.find_spec("onnxruntime"):  # the export takes each plane's slice shape
        from medsight.engine.export import export_onnx

        onnx_path = export_onnx(summary["best"], tmp_path / "model.onnx")
        onnx = Predictor(summary["best"], backend="onnx", onnx_path=onnx_path).predict(image)[1].array
        assert np.abs(onnx - mean).max() < 1e-4


def test_mirror_trained_model_predicts_with_tta_and_others_refuse(phantom, trained, tmp_path, run_cli):
    summary = train(
        TrainConfig(
            method="context25d", data=str(phantom), out=str(tmp_path / "run"), slices=3, mirror_axes=[0],
            **{**TINY, "epochs": 1},
        )
    )  # fmt: skip
    assert checkpoint.load(summary["best"])["mirror_axes"] == [0]
    image = io.read(next((phantom / "imagesTr").glob("*.nii.gz")))
    labels, probs = Predictor(summary["best"], tta=True).predict(image)
    assert labels.spatial_shape == image.spatial_shape
    np.testing.assert_allclose(labels.affine, image.affine)
    np.testing.assert_allclose(probs.array.sum(0), 1.0, atol=1e-5)
    result = run_cli(
        "predict", str(phantom / "imagesTr"), "--model", trained["best"], "--tta", "-o", str(tmp_path / "o")
    )
    assert (
        result.returncode == 2 and "test-time mirroring needs a model trained with mirroring" in result.stderr
    )
    result = run_cli("train", "--data", str(phantom), "--mirror-axes", "left", "-o", str(tmp_path / "bad"))
    assert result.returncode == 2 and "--mirror-axes: axes are comma-separated integers" in result.stderr
    result = run_cli("train", "--data", str(phantom), "--ema-decay", "1.5", "-o", str(tmp_path / "bad2"))
    assert result.returncode == 2 and "decay must be in [0, 1), not 1.5" in result.stderr
    assert not (tmp_path / "bad2").exists()  # refused before anything was read or made
    with pytest.raises(MedsightError, match="mirror axes must be distinct spatial axes"):
        train(
            TrainConfig(
                method="unet2d", data=str(phantom), out=str(tmp_path / "bad3"), mirror_axes=[3], **TINY
            )
        )
    result = run_cli(
        "train", "--data", str(phantom), "--class-weights", "inverse", "-o", str(tmp_path / "bad4")
    )
    assert result.returncode == 2 and "class_weights must be 'auto' or 'none', not 'inverse'" in result.stderr
    assert not (tmp_path / "bad4").exists()


def test_bad_training_options_leave_no_folder_behind(phantom, tmp_path, run_cli):
    """Each refused run ends in one line and exit code 2, before any run folder exists."""
    (tmp_path / "taken.nii.gz").write_bytes(b"a user's file")
    cases = [
        (["--augmentation", "bogus"], "augmentation must be one of none, intensity, spatial, not 'bogus'"),
        (["--method", "context25d", "--slices", "4"], "slices must be odd"),
        (["--val-fraction", "1.5"], "val"),
        (["--data", str(tmp_path / "nowhere")], "nowhere"),
    ]
    for i, (options, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        result = run_cli("train", "--data", str(phantom), *options, "--epochs", "1", "-o", str(out))
        assert result.returncode == 2 and message in result.stderr, (options, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists(), options
    result = run_cli("train", "--data", str(phantom), "--epochs", "1", "-o", str(tmp_path / "taken.nii.gz"))
    assert result.returncode == 2 and "taken.nii.gz: is a file; the run needs a folder" in result.stderr
    assert (tmp_path / "taken.nii.gz").read_bytes() == b"a user's file"


def test_resume_refuses_changed_options_and_does_not_rerun_a_finished_run(
    trained, phantom, tmp_path, run_cli
):
    import shutil
    from pathlib import Path

    run = tmp_path / "run"
    shutil.copytree(Path(trained["last"]).parent, run)
    before = (run / "last.pt").read_bytes()

    def resume(*options, epochs="2"):
        return run_cli("train", "--data", str(phantom), "--method", "context25d", "--epochs", epochs,
                       "--steps-per-epoch", "2", "--batch-size", "2", "--max-val-cases", "1", "-o", str(run),
                       "--resume", *options)  # fmt: skip

    result = resume("--slices", "5", "--lr", "0.01")
    assert result.returncode == 2, result.stderr
    assert "was started with other options (--lr, --slices); resume with the same ones" in result.stderr
    assert (run / "last.pt").read_bytes() == before
    result = resume("--slices", "3", epochs="4")
    assert result.returncode == 2 and "(--epochs)" in result.stderr  # more epochs is another schedule
    # A finished run (its epochs done, or stopped by patience or budget) has nothing left to train.
    result = resume("--slices", "3")
    assert result.returncode == 0 and "nothing to resume" in result.stdout, result.stderr
    assert (run / "last.pt").read_bytes() == before


def test_resume_of_a_run_older_than_an_option_takes_what_it_ran_with(tmp_path):
    """A run saved before an option existed ran with that option's default at the time: no mirroring
    (still the default) and no weight average (the default since 2026-11-27 is 0.999)."""
    from dataclasses import asdict

    from medsight.engine.train import check_resumable

    as_it_ran = TrainConfig(method="context25d", data="d", out="o", ema_decay=0.0)
    older = {k: v for k, v in asdict(as_it_ran).items() if k not in ("ema_decay", "mirror_axes")}
    check_resumable(older, as_it_ran, set(), {}, tmp_path)  # accepted
    defaults = TrainConfig(method="context25d", data="d", out="o")
    with pytest.raises(MedsightError, match=r"other options \(--ema-decay\)"):
        check_resumable(older, defaults, set(), {}, tmp_path)
    changed = TrainConfig(method="context25d", data="d", out="o", ema_decay=0.0, mirror_axes=[0])
    with pytest.raises(MedsightError, match=r"other options \(--mirror-axes\)"):
        check_resumable(older, changed, set(), {}, tmp_path)


def test_resume_without_a_run_starts_one(phantom, tmp_path):
    summary = train(
        TrainConfig(method="unet2d", data=str(phantom), out=str(tmp_path / "new"), resume=True, **TINY)
    )
    assert len(checkpoint.load(summary["last"])["training"]["history"]) == 2


def test_ctrl_c_says_how_to_continue(phantom, tmp_path):
    # preexec_fn: a test suite started in the background (`make test &`) passes an ignored SIGINT on
    # to its children, as shells do for background jobs; Ctrl-C reaches a foreground run by default.
    proc = subprocess.Popen(
        [*MEDSIGHT, "train", "--data", str(phantom), "--method", "unet2d", "--epochs", "500",
         "--steps-per-epoch", "2", "--batch-size", "2", "-o", str(tmp_path / "run")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 600
    while not (tmp_path / "run" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == (
        "medsight: interrupted; a training run continues from its last finished epoch with --resume"
    )


def test_predict_names_same_named_inputs_by_folder_and_checks_every_output_first(
    trained, phantom, tmp_path, run_cli
):
    scan = next((phantom / "imagesTr").glob("*.nii.gz"))
    for case in ("pat1", "pat2"):  # BraTS-style: one folder per case, the same file name in each
        (tmp_path / case).mkdir()
        (tmp_path / case / "flair.nii.gz").write_bytes(scan.read_bytes())
    inputs = [str(tmp_path / "pat1" / "flair.nii.gz"), str(tmp_path / "pat2" / "flair.nii.gz")]
    result = run_cli("predict", *inputs, "-m", trained["best"], "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["medsight-provenance.json", "pat1_flair.nii.gz", "pat2_flair.nii.gz"]
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "pat2_flair.nii.gz").write_bytes(b"kept")
    result = run_cli("predict", *inputs, "-m", trained["best"], "-o", str(tmp_path / "out2"))
    assert result.returncode == 2 and "pat2_flair.nii.gz: already exists" in result.stderr
    assert [p.name for p in (tmp_path / "out2").iterdir()] == ["pat2_flair.nii.gz"]  # nothing segmented
    assert (tmp_path / "out2" / "pat2_flair.nii.gz").read_bytes() == b"kept"


# -- devices --------------------------------------------------------------------------------------------
def test_device_and_precision_resolution():
    from medsight.engine.loop import resolve_device, resolve_precision

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "32-true"
    assert resolve_precision("bf16-mixed", torch.device("cpu")) == "bf16-mixed"
    with pytest.raises(MedsightError, match="--device must be auto, cpu"):
        resolve_device("gpu")
    with pytest.raises(MedsightError, match="--precision must be auto or one of"):
        resolve_precision("8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(MedsightError, match="--device cuda:1: no CUDA device is available"):
            resolve_device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_one_line_and_exit_2(trained, phantom, tmp_path, run_cli):
    scan = next((phantom / "imagesTr").glob("*.nii.gz"))
    for command in (
        ["predict", str(scan), "-m", trained["best"], "-o", str(tmp_path / "p"), "--device", "cuda"],
        ["train", "--data", str(phantom), "-o", str(tmp_path / "t"), "--device", "cuda"],
    ):
        result = run_cli(*command)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            "medsight: error: --device cuda: no CUDA device is available (this torch "
            f"{torch.__version__} has no CUDA support); use --device cpu"
        ]
    assert not (tmp_path / "p").exists() and not (tmp_path / "t").exists()


def test_predictor_runs_on_the_models_device(trained, phantom):
    """The network's inputs are moved to wherever its weights are (here the CPU, as resolved)."""
    predictor = Predictor(trained["best"], device="cpu")
    seen = []
    predictor.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].device))
    predictor.predict(io.read(next((phantom / "imagesTr").glob("*.nii.gz"))))
    weights = next(predictor.model.parameters()).device
    assert seen and all(d == weights == predictor.device for d in seen)


def test_plan_by_hand():
    """Hippocampus-sized working volumes (36 x 52 x 36 after preprocessing, slices along axis 2):
    slice windows 48 x 64 = 3072 voxels at 1536 bytes each = 4.5 MB -> 113 per 512 MB, capped at 16;
    3D patches 48 x 64 x 48 = 147456 voxels = 216 MB -> 2 per 512 MB."""
    from medsight.engine.plan import fingerprint, plan

    facts = fingerprint([(36, 52, 36), (30, 50, 34)], channels=1, slice_axis=2)
    assert facts["max_shape"] == [36, 52, 36]
    assert plan(facts, "2.5d")["batch_size"] == 16 and plan(facts, "2.5d")["patch"] == [48, 64]
    assert plan(facts, "3d")["batch_size"] == 2 and plan(facts, "3d")["patch"] == [48, 64, 48]
    assert plan(facts, "3d", memory_budget=1024)["batch_size"] == 4
    assert plan(facts, "3d", batch_size=3, patch_size=[32, 32, 32])["batch_size"] == 3
    assert plan(facts, "3d", patch_size=[30, 32, 32])["patch"] == [32, 32, 32]
    with pytest.raises(MedsightError, match="--patch-size needs 2"):
        plan(facts, "2d", patch_size=[32, 32, 32])


@pytest.mark.slow
def test_worker_processes_draw_the_same_batches(phantom, tmp_path):
    """Each batch comes from its own stream seeded by (seed, rank, epoch, step), so sampling in two
    DataLoader worker processes trains exactly as sampling in the main process."""
    runs = [
        train(
            TrainConfig(
                method="unet2d",
                data=str(phantom),
                out=str(tmp_path / f"w{w}"),
                num_workers=w,
                **{**TINY, "steps_per_epoch": 3},
            )
        )  # fmt: skip
        for w in (0, 2)
    ]
    first, second = (checkpoint.load(s["last"]) for s in runs)
    assert [r["train_loss"] for r in first["training"]["history"]] == [
        r["train_loss"] for r in second["training"]["history"]
    ]
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key


def test_time_budget_stops_after_the_epoch_that_passes_it(phantom, tmp_path):
    """A budget of 6 ms is used up by the first step: that epoch is still validated and saved, the
    run stops there, and resuming it has nothing left to train."""
    options = dict(
        method="unet2d", data=str(phantom), out=str(tmp_path), time_limit=1e-4, **{**TINY, "epochs": 4}
    )
    summary = train(TrainConfig(**options))
    assert summary["epochs_run"] == 1 and (tmp_path / "best.pt").exists()
    stopped = checkpoint.load(tmp_path / "last.pt")["training"]["stopped"]
    assert stopped == "the 0.0001-minute budget is used"
    assert train(TrainConfig(**{**options, "resume": True}))["epochs_run"] == 1


def test_predict_writes_a_dicom_seg_that_matches_the_nifti_mask(trained, phantom, tmp_path, run_cli):
    import highdicom as hd
    import pydicom

    from dicom_factory import write_series

    image = io.read(phantom / "imagesTr" / "phantom_000.nii.gz").array[0]  # (X, Y, Z)
    stored = np.round(np.transpose(image, (2, 1, 0)) * 100).astype(np.int16)  # (slice, row, column)
    geo = write_series(
        tmp_path / "ct", stored, pixel_spacing=(1.0, 1.0), slice_step=2.5, frame_of_reference_uid="1.2.3.4"
    )
    model = trained["best"]
    code_n = run_cli("predict", tmp_path / "ct", "-m", model, "-o", tmp_path / "nifti").returncode
    seg_run = run_cli(
        "predict", tmp_path / "ct", "-m", model, "-o", tmp_path / "seg", "--format", "dicom-seg"
    )
    assert code_n == 0 and seg_run.returncode == 0, seg_run.stderr
    mask = io.read(tmp_path / "nifti" / "ct.nii.gz").array[0]  # (column, row, slice)
    assert (mask == 1).any()  # something to compare
    seg = hd.seg.segread(tmp_path / "seg" / "ct.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == geo["uid"]
    names = checkpoint_label_names(model)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [names[v] for v in sorted(names) if v != 0]
    for f in (tmp_path / "ct").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        k = int(ds.InstanceNumber) - 1
        frames = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1])[0]
        assert np.array_equal(frames[..., 0], mask[:, :, k].T == 1)


def checkpoint_label_names(path) -> dict[int, str]:
    from medsight.engine import checkpoint

    return {int(k): v for k, v in checkpoint.load(path)["labels"].items()}


def test_dicom_seg_needs_dicom_inputs(trained, phantom, tmp_path, run_cli):
    result = run_cli(
        "predict", phantom / "imagesTr" / "phantom_000.nii.gz", "-m", trained["best"], "-o", tmp_path / "o",
        "--format", "dicom-seg",
    )  # fmt: skip
    assert result.returncode == 2 and "needs DICOM series folders" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
