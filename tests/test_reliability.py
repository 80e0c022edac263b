"""Issue 24: inputs that used to give a wrong answer with exit 0, checkpoints that could run code,
unwritable and interrupted outputs. Every test here failed before its fix."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from medsight import Scan, io
from medsight.errors import MedsightError

pytestmark = pytest.mark.usefixtures("single_thread")


def error_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("medsight: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


# -- 5: names keep their dots ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "case"),
    [
        ("1.3.6.1.4.1.9328.50.4.0001.nii.gz", "1.3.6.1.4.1.9328.50.4.0001"),
        ("sub-01_ses-1.5T.nii.gz", "sub-01_ses-1.5T"),
        ("sub-01_ses-1.5T.nrrd", "sub-01_ses-1.5T"),
        ("a.b.PNG", "a.b"),
        ("scan.nii", "scan"),
        ("series.1.2", "series.1.2"),  # a DICOM folder: no image suffix, nothing stripped
    ],
)
def test_case_name_strips_only_image_suffixes(name, case):
    assert io.case_name(Path("/x") / name) == case


def test_dotted_names_pair_between_predict_outputs_and_evaluate(tmp_path):
    from medsight.cli.fewshot import output_name
    from medsight.evaluate import _case_files

    query = tmp_path / "sub-01_ses-1.5T.nii.gz"
    query.write_bytes(b"")
    assert output_name(query, 3) == "sub-01_ses-1.5T.nii.gz"
    for name in ("1.3.6.1.0001.nii.gz", "1.3.6.1.0002.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    assert set(_case_files(tmp_path)) == {"sub-01_ses-1.5T", "1.3.6.1.0001", "1.3.6.1.0002"}


# -- 6: checkpoints cannot run code ---------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_malicious_checkpoint_runs_nothing_and_is_refused_in_one_line(cli, tmp_path):
    import torch

    marker = tmp_path / "ran.txt"
    ckpt = tmp_path / "evil.pt"
    torch.save({"format": "medsight-checkpoint-1", "x": _Payload(marker)}, ckpt)
    image = tmp_path / "img.nii.gz"
    io.write(Scan(np.zeros((1, 4, 4, 4), np.float32)), image)
    code, _, err = cli("predict", image, "--model", ckpt, "-o", tmp_path / "out")
    assert code == 2 and not marker.exists()
    line = error_line(err)
    assert str(ckpt) in line and "cannot be loaded safely" in line
    assert not (tmp_path / "out").exists()


def test_a_plain_pickle_checkpoint_runs_nothing(tmp_path):
    from medsight.engine import checkpoint

    marker = tmp_path / "ran.txt"
    ckpt = tmp_path / "evil.pt"
    ckpt.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(MedsightError):
        checkpoint.load(ckpt)
    assert not marker.exists()


def test_checkpoint_metadata_round_trips_as_plain_types(tmp_path):
    import torch

    from medsight.engine import checkpoint

    payload = {
        "model": {"name": "unet2d", "kwargs": {"spacing": np.float64(0.5)}},
        "state_dict": {"w": torch.ones(2)},
        "labels": {0: "background"},
        "preprocessing": {"mean": np.float32(1.5), "source": Path("/data/x"), "lut": np.arange(3)},
    }
    checkpoint.save(tmp_path / "c.pt", payload)
    loaded = checkpoint.load(tmp_path / "c.pt")
    assert loaded["preprocessing"]["mean"] == 1.5 and type(loaded["preprocessing"]["mean"]) is float
    assert loaded["preprocessing"]["source"] == "/data/x"
    assert np.array_equal(loaded["preprocessing"]["lut"], [0, 1, 2])
    assert type(loaded["model"]["kwargs"]["spacing"]) is float


def test_an_old_checkpoint_with_numpy_scalars_and_paths_still_loads(tmp_path):
    import torch

    from medsight.engine import checkpoint

    old = {
        "format": "medsight-checkpoint-1", "model": {"name": "unet2d"}, "state_dict": {},
        "labels": {0: "bg"}, "preprocessing": {"mean": np.float32(2.0), "path": Path("/a")},
    }  # fmt: skip
    torch.save(old, tmp_path / "old.pt")  # as medsight saved before: no conversion
    loaded = checkpoint.load(tmp_path / "old.pt")
    assert float(loaded["preprocessing"]["mean"]) == 2.0


# -- 2: a DICOM series with a missing slice -------------------------------------------------------------
def _series_with_gap(folder: Path, drop: list[int], n: int = 25, step: float = 6.5, **kw) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from dicom_factory import write_series

    volume = np.arange(n * 4 * 5).reshape(n, 4, 5) % 200
    write_series(folder, volume, slice_step=step, shuffle_seed=None, **kw)  # file k holds slice k
    for k in drop:
        (folder / f"{k:04d}.dcm").unlink()
    return folder


def test_a_series_with_one_missing_slice_is_refused_naming_the_gap(cli, tmp_path):
    series = _series_with_gap(tmp_path / "ct", drop=[11])
    code, _, err = cli("info", series)
    line = error_line(err)
    assert code == 2 and str(series) in line
    # slices 1..11 are k=0..10; the 12th is k=12, two steps (13 mm) further on
    assert "slices 11 and 12" in line and "13 mm apart" in line and "6.5 mm" in line
    assert "a slice is missing" in line


def test_two_missing_slices_on_an_oblique_series_are_counted(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    series = _series_with_gap(
        tmp_path / "ob", drop=[4, 5], n=10, step=2.0, row_dir=(c, s, 0), col_dir=(0, 0, -1)
    )
    with pytest.raises(MedsightError, match=r"slices 4 and 5 .* 6 mm apart.* 2 mm: 2 slices are missing"):
        io.read(series)


def test_convert_refuses_the_gap_and_writes_nothing(cli, tmp_path):
    series = _series_with_gap(tmp_path / "ct", drop=[3])
    code, _, err = cli("convert", series, tmp_path / "ct.nii.gz")
    assert code == 2 and "a slice is missing" in error_line(err)
    assert not (tmp_path / "ct.nii.gz").exists()


def test_an_evenly_spaced_series_with_rounded_positions_still_reads(tmp_path):
    # positions written with 6 decimals of a 1/3 mm step: rounding noise far below the tolerance
    series = _series_with_gap(tmp_path / "ok", drop=[], n=12, step=0.3333333)
    assert io.read(series).spatial_shape == (5, 4, 12)


# -- 1: NaN voxels ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom3d(tmp_path_factory):
    from medsight.datasets.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("data3d") / "phantom", 3, dim=3, seed=0)


@pytest.fixture(scope="module")
def context25d(phantom3d, tmp_path_factory) -> Path:
    from medsight.engine.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ctx")
    config = TrainConfig(
        method="context25d", data=str(phantom3d), out=str(out), slices=3, epochs=1, steps_per_epoch=2,
        batch_size=2, max_val_cases=1, progress=False,
    )  # fmt: skip
    return Path(train(config)["best"])


def _with_nan(source: Path, target: Path, count: int = 300) -> Path:
    scan = io.read(source)
    array = scan.array.astype(np.float32)
    array.flat[np.random.default_rng(0).choice(array.size, count, replace=False)] = np.nan
    io.write(scan.with_array(array), target)
    return target


def test_predict_fills_nan_voxels_warns_with_the_count_and_still_segments(
    cli, context25d, phantom3d, tmp_path
):
    source = phantom3d / "imagesTr" / "phantom_000.nii.gz"
    nan_scan = _with_nan(source, tmp_path / "in" / "nan.nii.gz")
    # the expectation, built by hand: the same voxels set to the scan's lowest finite value
    array = io.read(nan_scan).array
    filled = np.where(np.isfinite(array), array, np.nanmin(array))
    io.write(io.read(nan_scan).with_array(filled), tmp_path / "in2" / "nan.nii.gz")
    with pytest.warns(UserWarning, match=f"{nan_scan}: 300 non-finite voxels"):
        code, _, err = cli("predict", nan_scan, "--model", context25d, "-o", tmp_path / "a")
    assert code in (0, None), err
    cli("predict", tmp_path / "in2" / "nan.nii.gz", "--model", context25d, "-o", tmp_path / "b")
    got = io.read(tmp_path / "a" / "nan.nii.gz").array
    assert np.array_equal(got, io.read(tmp_path / "b" / "nan.nii.gz").array)
    reference = io.read(source)  # the clean scan's mask has foreground, so the NaN one must too
    assert reference.array.size == got.size and (got > 0).any()


def test_training_refuses_a_nan_image_naming_case_and_count_before_any_step(cli, phantom3d, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom3d, data)
    target = data / "imagesTr" / "phantom_001.nii.gz"
    _with_nan(target, target.with_name("x.nii.gz"), count=17)
    target.with_name("x.nii.gz").replace(target)
    code, _, err = cli(
        "train", "--data", data, "--method", "context25d", "--slices", "3", "--epochs", "1",
        "--steps-per-epoch", "1", "--batch-size", "2", "-o", tmp_path / "run",
    )  # fmt: skip
    line = error_line(err)
    assert code == 2 and "case 'phantom_001'" in line and "17 non-finite voxels" in line
    assert str(target) in line
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_a_non_finite_loss_stops_training_in_one_line():
    import torch

    from medsight.losses import require_finite_loss

    assert require_finite_loss(torch.tensor(0.5), 0, 0).item() == 0.5
    with pytest.raises(MedsightError, match="loss became nan at epoch 2, step 4; no checkpoint"):
        require_finite_loss(torch.tensor(float("nan")), 1, 3)


# -- 7: unwritable outputs ---------------------------------------------------------------------------------
def _volume(tmp_path: Path) -> Path:
    return io.write(Scan(np.arange(60, dtype=np.float32).reshape(1, 3, 4, 5)), tmp_path / "v.nii.gz")


def test_convert_under_a_regular_file_is_one_line(cli, tmp_path):
    source = _volume(tmp_path)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    target = blocker / "sub" / "out.nii.gz"
    code, _, err = cli("convert", source, target)
    line = error_line(err)
    assert code == 2 and str(target) in line and f"{blocker} is a file" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through chmod 0o555")
def test_a_read_only_folder_is_refused_before_any_work(cli, tmp_path):
    source = _volume(tmp_path)
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = cli("convert", source, locked / "out.nii.gz")
        assert code == 2 and "read-only" in error_line(err)
        code, _, err = cli("predict", source, "--model", tmp_path / "missing.pt", "-o", locked / "masks")
        assert code == 2 and "read-only" in error_line(err) and "missing.pt" not in err
    finally:
        locked.chmod(0o755)


def test_a_folder_without_write_permission_is_named(tmp_path, monkeypatch):
    # os.access is what answers for a read-only folder or filesystem (root is never refused by it)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(MedsightError, match="cannot be written: the folder .*ro.* is read-only"):
        io.check_writable(tmp_path / "ro" / "x.nii.gz")


def test_predict_into_a_path_under_a_file_is_refused_before_loading_the_model(cli, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = cli("predict", _volume(tmp_path), "--model", tmp_path / "missing.pt", "-o", blocker / "m")
    line = error_line(err)
    assert code == 2 and "is a file" in line and "missing.pt" not in line


def test_train_run_folder_under_a_file_is_refused(cli, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = cli("train", "--data", tmp_path, "-o", blocker / "run")
    assert code == 2 and "is a file" in error_line(err)


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(cli, tmp_path, monkeypatch):
    import errno

    source = _volume(tmp_path)
    out = tmp_path / "out"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    code, _, err = cli("convert", source, out / "v.nrrd")
    line = error_line(err)
    assert code == 2 and str(out / "v.nrrd") in line and os.strerror(errno.ENOSPC) in line
    assert list(out.iterdir()) == []  # neither the output nor a temporary


# -- 8: interrupted runs -----------------------------------------------------------------------------------
def _dead_pid() -> int:
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".a.nii.gz.medsight-tmp-{_dead_pid()}-0a1b2c3d.nii.gz"
    live = out / f".b.nii.gz.medsight-tmp-{os.getppid()}-0a1b2c3d.nii.gz"
    foreign = out / ".c.nii.gz.something.nii.gz"  # not ours: never touched
    for path in (stale, live, foreign):
        path.write_bytes(b"partial")
    code, _, err = cli("convert", _volume(tmp_path), out / "v.nii.gz")
    assert code in (0, None), err
    assert not stale.exists() and live.exists() and foreign.exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["v.nii.gz"]


def test_predict_skip_existing_continues_a_batch(cli, context25d, phantom3d, tmp_path):
    images = phantom3d / "imagesTr"
    out = tmp_path / "masks"
    code, _, err = cli("predict", images, "--model", context25d, "-o", out)
    assert code in (0, None), err
    first = out / "phantom_000.nii.gz"
    before = first.stat().st_mtime_ns
    (out / "phantom_001.nii.gz").unlink()  # as if the run had been killed before this one
    code, stdout, _ = cli("predict", images, "--model", context25d, "-o", out)
    assert code == 2  # without the option the existing masks are protected
    code, stdout, err = cli("predict", images, "--model", context25d, "-o", out, "--skip-existing")
    assert code in (0, None), err
    assert "skipping 2 scan(s)" in stdout and stdout.count(" -> ") == 1 and "phantom_001" in stdout
    assert first.stat().st_mtime_ns == before and (out / "phantom_001.nii.gz").is_file()


def test_predict_refuses_a_folder_locked_by_a_live_run_and_takes_over_a_dead_one(
    cli, context25d, phantom3d, tmp_path
):
    import subprocess

    image = phantom3d / "imagesTr" / "phantom_000.nii.gz"
    out = tmp_path / "masks"
    out.mkdir()
    lock = out / ".medsight-predict.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{sleeper.pid}\n")
        code, _, err = cli("predict", image, "--model", context25d, "-o", out)
        line = error_line(err)
        assert code == 2 and f"pid {sleeper.pid}" in line and str(out) in line
        assert not (out / "phantom_000.nii.gz").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(f"{_dead_pid()}\n")
    code, _, err = cli("predict", image, "--model", context25d, "-o", out)
    assert code in (0, None), err
    assert (out / "phantom_000.nii.gz").is_file() and not lock.exists()


def test_provenance_records_the_checkpoint_and_guards_the_folder(cli, context25d, phantom3d, tmp_path):
    import hashlib
    import json

    import torch

    image = phantom3d / "imagesTr" / "phantom_000.nii.gz"
    out = tmp_path / "masks"
    code, _, err = cli("predict", image, "--model", context25d, "-o", out, "--largest-component")
    assert code in (0, None), err
    record = json.loads((out / "medsight-provenance.json").read_text())
    assert record["checkpoint_sha256"] == hashlib.sha256(context25d.read_bytes()).hexdigest()
    assert record["model"] == str(context25d.resolve()) and record["finished"] is True
    assert record["options"]["largest_component"] is True and record["outputs"] == ["phantom_000.nii.gz"]
    from medsight import __version__

    assert record["medsight_version"] == __version__ and record["time"]
    other = tmp_path / "other.pt"
    payload = torch.load(context25d, weights_only=True)
    payload["note"] = "another training run"
    torch.save(payload, other)
    second = phantom3d / "imagesTr" / "phantom_001.nii.gz"
    code, _, err = cli("predict", second, "--model", other, "-o", out)
    line = error_line(err)
    assert code == 2 and "another checkpoint" in line and not (out / "phantom_001.nii.gz").exists()
    code, _, err = cli("predict", second, "--model", other, "-o", out, "--overwrite")
    assert code in (0, None), err
    record = json.loads((out / "medsight-provenance.json").read_text())
    assert record["checkpoint_sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()


# -- 3: pairing two scans by their affines -------------------------------------------------------------------
LPS = np.diag([-1.0, -1.0, 2.0, 1.0])  # DICOM-read CT: x, y decrease along the voxel axes


def _ct_and_label(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CT in LPS and the same label twice: on the CT's grid, and as a LAS file (y axis flipped)."""
    rng = np.random.default_rng(1)
    ct = Scan(rng.normal(0, 1, (1, 12, 10, 8)).astype(np.float32), LPS.copy())
    label = np.zeros((1, 12, 10, 8), np.uint8)
    label[0, 3:7, 1:4, 2:6] = 1  # near the front (low j): a flip front to back would show
    las_affine = LPS.copy()
    las_affine[:3, 1] *= -1  # y now increases along j ...
    las_affine[1, 3] = LPS[1, 3] - 9 * 1.0  # ... starting where the LPS grid ends (j = 9)
    io.write(ct, tmp_path / "ct.nii.gz")
    io.write(Scan(label, LPS.copy()), tmp_path / "same.nii.gz")
    io.write(Scan(label[:, :, ::-1].copy(), las_affine), tmp_path / "las.nii.gz")
    return tmp_path / "ct.nii.gz", tmp_path / "same.nii.gz", tmp_path / "las.nii.gz"


def test_a_las_label_on_an_lps_ct_draws_the_same_overlay(cli, tmp_path):
    from PIL import Image

    ct, same, las = _ct_and_label(tmp_path)
    assert io.read(las).orientation != io.read(same).orientation  # the files really differ
    for name, label in (("a.png", same), ("b.png", las)):
        code, _, err = cli("overlay", ct, "--label", label, "-o", tmp_path / name)
        assert code in (0, None), err
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert np.array_equal(a, b)


def test_align_to_matches_nibabel_nearest_neighbour_resampling(tmp_path):
    import nibabel as nib
    from nibabel.processing import resample_from_to

    ct, _, las = _ct_and_label(tmp_path)
    shifted = io.read(las)
    shifted.affine[:3, 3] += [2.0, -3.0, 4.0]  # overlaps the CT in part
    ours = __import__("medsight.scan", fromlist=["align_to"]).align_to(shifted, io.read(ct))
    image = nib.load(str(ct))
    theirs = resample_from_to(nib.Nifti1Image(shifted.array[0], shifted.affine), image, order=0)
    assert np.array_equal(ours.array[0], np.asarray(theirs.dataobj)) and ours.array.sum() > 0
    assert np.allclose(ours.affine, image.affine)


def test_a_label_that_does_not_overlap_the_image_is_refused(cli, tmp_path):
    ct, same, _ = _ct_and_label(tmp_path)
    far = io.read(same)
    far.affine[:3, 3] += [0.0, 0.0, 500.0]
    io.write(far, tmp_path / "far.nii.gz")
    code, _, err = cli("overlay", ct, "--label", tmp_path / "far.nii.gz", "-o", tmp_path / "x.png")
    line = error_line(err)
    assert code == 2 and "far.nii.gz: label does not overlap the image in space" in line
    assert not (tmp_path / "x.png").exists()


def test_evaluate_pairs_a_las_prediction_with_an_lps_reference(tmp_path):
    from medsight.evaluate import evaluate_folders

    _, same, las = _ct_and_label(tmp_path)
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    same.replace(tmp_path / "ref" / "case.nii.gz")
    las.replace(tmp_path / "pred" / "case.nii.gz")
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", progress=False)
    assert result.cases["dice"].tolist() == [1.0]


# -- 4: DICOM studies pair series by description, not folder position -----------------------------------------
def _studies(root: Path, with_t1: tuple[bool, ...] = (True, True)) -> Path:
    """Studies whose folders sort differently: FLAIR holds 100s, T1 holds 7s, so a channel shows which."""
    sys.path.insert(0, str(Path(__file__).parent))
    from dicom_factory import write_series

    flair, t1 = np.full((4, 6, 5), 100), np.full((4, 6, 5), 7)
    mask = np.zeros((4, 6, 5), int)
    mask[1:3, 2:4, 2:4] = 1
    layouts = [("2_flair", "FLAIR", "1_t1", "T1 pre"), ("1_flair", "flair", "2_t1", "t1-PRE")]
    for i, ((f_dir, f_desc, t_dir, t_desc), has_t1) in enumerate(zip(layouts, with_t1, strict=False)):
        study = root / f"patient{i}"
        write_series(study / f_dir, flair, description=f_desc)
        if has_t1:
            write_series(study / t_dir, t1, description=t_desc)
        write_series(study / "seg", mask, description="segmentation")
    return root


def test_series_are_matched_across_studies_by_description(tmp_path):
    from medsight.datasets import open_dataset

    ds = open_dataset(_studies(tmp_path))
    assert ds.layout == "dicom-study" and ds.channel_names == ["FLAIR", "T1 pre"]
    for case in ds.cases:  # folder order differs between the studies; the channels must not
        image = ds.read_image(case)
        assert image.array[0].max() == 100 and image.array[1].max() == 7, case.case_id


def test_a_user_mapping_names_the_channels(tmp_path):
    from medsight.datasets import open_dataset

    ds = open_dataset(_studies(tmp_path), layout="dicom-study", series="T1|T1pre,FLAIR")
    assert ds.channel_names == ["T1", "FLAIR"]
    assert all(ds.read_image(c).array[0].max() == 7 for c in ds.cases)


def test_a_study_lacking_a_series_is_flagged_and_training_refuses(cli, tmp_path):
    from medsight.datasets import fingerprint, open_dataset

    root = _studies(tmp_path / "data", with_t1=(True, False))
    facts = fingerprint(open_dataset(root), progress=False)
    missing = [p for p in facts["problems"] if p["case"] == "patient1"]
    assert len(missing) == 1 and "(missing series T1 pre)" in missing[0]["file"]
    code, _, err = cli(
        "train", "--data", root, "--method", "unet2d", "--epochs", "1", "--steps-per-epoch", "1",
        "--val-fraction", "0.5", "-o", tmp_path / "run",
    )  # fmt: skip
    line = error_line(err)
    assert code == 2 and "patient1" in line and "missing series T1 pre" in line
    assert not (tmp_path / "run" / "best.pt").exists()


def test_training_reads_a_las_label_on_its_lps_image_unflipped(tmp_path):
    from medsight.datasets import fingerprint, open_dataset

    ct, same, las = _ct_and_label(tmp_path)
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / "msd" / folder).mkdir(parents=True)
    ct.replace(tmp_path / "msd" / "imagesTr" / "a.nii.gz")
    las.replace(tmp_path / "msd" / "labelsTr" / "a.nii.gz")
    (tmp_path / "msd" / "dataset.json").write_text(
        '{"labels": {"0": "background", "1": "x"}, "modality": {"0": "CT"}, '
        '"training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}'
    )
    dataset = open_dataset(tmp_path / "msd")
    _, label = dataset.load_case(dataset.cases[0])
    assert np.array_equal(label.array, io.read(same).array)
    assert not fingerprint(dataset, progress=False)["problems"]


def test_the_temporary_of_a_killed_write_is_removed_by_the_next_run(cli, tmp_path):
    import subprocess

    out = tmp_path / "out"
    killed = (
        "import os, signal\n"
        "from medsight.io import atomic_path\n"
        f"tmp = atomic_path({str(out / 'big.nii.gz')!r}).__enter__()\n"
        "tmp.write_bytes(b'x' * 100000)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(io.__file__).parents[2])}
    assert subprocess.run([sys.executable, "-c", killed], env=env).returncode == -9
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".big.nii.gz.medsight-tmp-")
    code, _, err = cli("convert", _volume(tmp_path), out / "v.nii.gz")
    assert code in (0, None), err
    assert [p.name for p in out.iterdir()] == ["v.nii.gz"]


def test_data_inspect_takes_the_series_mapping(cli, tmp_path):
    root = _studies(tmp_path / "data")
    code, stdout, err = cli("data", "inspect", root, "--series", "T1|T1pre,FLAIR", "--json", "--no-progress")
    assert code in (0, None), err
    assert '"T1"' in stdout and "missing series" not in stdout
    code, stdout, _ = cli("data", "inspect", root, "--series", "T2,FLAIR", "--json", "--no-progress")
    assert stdout.count("(missing series T2)") == 2


def test_a_nan_loss_stops_the_training_loop_before_any_checkpoint(cli, phantom3d, tmp_path, monkeypatch):
    import torch

    from medsight.losses import WeightedCEDiceLoss

    monkeypatch.setattr(WeightedCEDiceLoss, "forward", lambda self, logits, target: logits.sum() * torch.nan)
    code, _, err = cli(
        "train", "--data", phantom3d, "--method", "context25d", "--slices", "3", "--epochs", "1",
        "--steps-per-epoch", "2", "--batch-size", "2", "-o", tmp_path / "run",
    )  # fmt: skip
    line = error_line(err)
    assert code == 2 and "the loss became nan at epoch 1, step 1" in line
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()
