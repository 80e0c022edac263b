"""Layouts users have (issue 24, item 10): BIDS, DRIVE-style parallel folders and pyradiomics-style
image/mask pairs, each on a tiny tree made here with the names those datasets use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import tifffile
from PIL import Image

from medsight.datasets import detect_layout, fingerprint, open_dataset

AFFINE = np.diag([0.9, 0.9, 1.2, 1.0])


def _nii(path: Path, array: np.ndarray, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(500, 50, (6, 5, 4)).astype(np.float32)


def _segmentation() -> np.ndarray:
    seg = np.zeros((6, 5, 4), np.uint8)
    seg[1:3, 1:4, 1:3] = 1
    seg[4, 2, 2] = 2
    return seg


def run_inspect(run_cli, path: Path) -> dict:
    result = run_cli("data", "inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- BIDS -----------------------------------------------------------------------------------------------
def make_bids(root: Path) -> None:
    (root).mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.8.0"}')
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\n")
    sessions = [("sub-01", "ses-1"), ("sub-01", "ses-2"), ("sub-02", "ses-1"), ("sub-03", None)]
    for n, (sub, ses) in enumerate(sessions):
        rel = Path(sub, ses, "anat") if ses else Path(sub, "anat")
        prefix = f"{sub}_{ses}" if ses else sub
        _nii(root / rel / f"{prefix}_T1w.nii.gz", _volume(n))
        _nii(root / rel / f"{prefix}_FLAIR.nii.gz", _volume(10 + n))
        (root / rel / f"{prefix}_T1w.json").write_text('{"RepetitionTime": 2.3}')
        labels = root / "derivatives" / "labels" / rel
        _nii(labels / f"{prefix}_dseg.nii.gz", _segmentation())
        _nii(labels / f"{prefix}_label-brain_mask.nii.gz", np.ones((6, 5, 4), np.uint8))
    (root / "derivatives" / "labels" / "dataset_description.json").write_text('{"Name": "labels"}')


def test_bids_subjects_sessions_and_derivative_labels(tmp_path, run_cli):
    make_bids(tmp_path / "bids")
    assert detect_layout(tmp_path / "bids") == "bids"
    ds = open_dataset(tmp_path / "bids")
    assert ds.case_ids == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1", "sub-03"]
    assert ds.channel_names == ["FLAIR", "T1w"] and ds.dim == 3
    case = ds.case("sub-01_ses-2")
    assert [p.name for p in case.images] == ["sub-01_ses-2_FLAIR.nii.gz", "sub-01_ses-2_T1w.nii.gz"]
    assert case.label == tmp_path / "bids/derivatives/labels/sub-01/ses-2/anat/sub-01_ses-2_dseg.nii.gz"
    image, label = ds.load_case(case)
    assert image.channels == 2 and set(np.unique(label.array)) == {0, 1, 2}
    facts = run_inspect(run_cli, tmp_path / "bids")
    assert facts["layout"] == "bids" and facts["problems"] == []
    assert {v["value"] for v in facts["label_values"]} == {0, 1, 2}


def test_bids_missing_derivative_is_the_only_problem(tmp_path):
    make_bids(tmp_path / "bids")
    (tmp_path / "bids/derivatives/labels/sub-02/ses-1/anat/sub-02_ses-1_dseg.nii.gz").unlink()
    facts = fingerprint(open_dataset(tmp_path / "bids"), progress=False)
    assert [(p["case"], p["problem"]) for p in facts["problems"]] == [("sub-02_ses-1", "missing label file")]
    assert facts["problems"][0]["file"].endswith(
        "derivatives/labels/sub-02/ses-1/anat/sub-02_ses-1_dseg.nii.gz"
    )


def test_bids_without_derivatives_is_image_only(tmp_path):
    make_bids(tmp_path / "bids")
    shutil.rmtree(tmp_path / "bids" / "derivatives")
    ds = open_dataset(tmp_path / "bids")
    assert ds.layout == "bids" and len(ds) == 4
    assert not ds.expects_labels and fingerprint(ds, progress=False)["problems"] == []


# -- DRIVE: images/ + 1st_manual/ + mask/ ------------------------------------------------------------------
def _gif(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)


def make_drive(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    fov = np.zeros((12, 10), np.uint8)
    fov[1:11, 1:9] = 255
    vessels = {}
    for split, names in (("training", ["21", "22"]), ("test", ["01"])):
        kind = "training" if split == "training" else "test"
        for n in names:
            pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / split / "images" / f"{n}_{kind}.tif", pixels, compression="lzw")
            vessel = np.zeros((12, 10), np.uint8)
            vessel[3:9, int(n) % 7] = 255
            vessels[n] = vessel
            _gif(root / split / "1st_manual" / f"{n}_manual1.gif", vessel)
            _gif(root / split / "mask" / f"{n}_{kind}_mask.gif", fov)
            if split == "test":
                _gif(root / split / "2nd_manual" / f"{n}_manual2.gif", np.zeros_like(vessel))
    return vessels


def test_drive_parallel_folders_with_field_of_view_masks(tmp_path, run_cli):
    vessels = make_drive(tmp_path / "DRIVE")
    assert detect_layout(tmp_path / "DRIVE") == "parallel-folders"
    ds = open_dataset(tmp_path / "DRIVE")
    assert ds.dim == 2 and ds.channel_names == ["R", "G", "B"]
    assert ds.splits == {"train": ["21_training", "22_training"], "test": ["01_test"]}
    case = ds.case("22_training")
    assert case.label == tmp_path / "DRIVE/training/1st_manual/22_manual1.gif"
    assert ds.extra["fov_masks"]["22_training"] == str(tmp_path / "DRIVE/training/mask/22_training_mask.gif")
    image, label = ds.load_case(case)
    assert image.spatial_shape == (12, 10)
    assert np.array_equal(label.array[0], vessels["22"] // 255)  # stored 0/255, a class map 0/1
    facts = run_inspect(run_cli, tmp_path / "DRIVE")
    assert facts["layout"] == "parallel-folders" and facts["problems"] == []
    assert {v["value"] for v in facts["label_values"]} == {0, 255}


def test_drive_split_folder_alone_and_missing_manual(tmp_path):
    make_drive(tmp_path / "DRIVE")
    (tmp_path / "DRIVE/training/1st_manual/21_manual1.gif").unlink()
    ds = open_dataset(tmp_path / "DRIVE" / "training")
    assert ds.layout == "parallel-folders" and ds.case_ids == ["21_training", "22_training"]
    problems = fingerprint(ds, progress=False)["problems"]
    assert [(p["case"], p["problem"]) for p in problems] == [("21_training", "missing label file")]


def test_images_beside_masks_folder_uses_masks_as_labels(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = np.zeros((8, 9), np.uint8)
    mask[2:5, 3:6] = 255
    for name in ("cju0qkwl35piu", "cju0s690hkp960"):  # Kvasir-SEG names
        pixels = np.random.default_rng(len(name)).integers(0, 256, (8, 9, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{name}.jpg")
        Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
    ds = open_dataset(tmp_path)
    assert ds.layout == "parallel-folders" and ds.extra["fov_masks"] == {}
    assert ds.case("cju0qkwl35piu").label == tmp_path / "masks" / "cju0qkwl35piu.png"
    assert fingerprint(ds, progress=False)["problems"] == []


# -- pyradiomics: <case>_image / <case>_label --------------------------------------------------------------
def make_pairs(root: Path) -> None:
    root.mkdir(parents=True)
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.7, 0.7, 2.0]),
              "space origin": np.array([-20.0, 10.0, 5.0])}  # fmt: skip
    for n, case in enumerate(("brain1", "breast1")):
        nrrd.write(str(root / f"{case}_image.nrrd"), _volume(n), header)
        nrrd.write(str(root / f"{case}_label.nrrd"), _segmentation(), header)
    _nii(root / "lung1_image.nii.gz", _volume(5))
    _nii(root / "lung1_mask.nii.gz", _segmentation())
    (root / "README.md").write_text("pyradiomics test cases")
    (root / "params.yaml").write_text("setting: {}")


def test_image_mask_pairs(tmp_path, run_cli):
    make_pairs(tmp_path / "data")
    assert detect_layout(tmp_path / "data") == "image-mask-pairs"
    ds = open_dataset(tmp_path / "data")
    assert ds.case_ids == ["brain1", "breast1", "lung1"] and ds.dim == 3
    assert ds.case("lung1").label == tmp_path / "data" / "lung1_mask.nii.gz"
    assert ds.case("brain1").images == [tmp_path / "data" / "brain1_image.nrrd"]
    facts = run_inspect(run_cli, tmp_path / "data")
    assert facts["layout"] == "image-mask-pairs" and facts["problems"] == []


def test_image_without_its_label_is_reported(tmp_path):
    make_pairs(tmp_path / "data")
    (tmp_path / "data" / "breast1_label.nrrd").unlink()
    problems = fingerprint(open_dataset(tmp_path / "data"), progress=False)["problems"]
    assert [(p["case"], p["problem"], Path(p["file"]).name) for p in problems] == [
        ("breast1", "missing label file", "breast1_label.nrrd")
    ]


@pytest.mark.parametrize("maker", [make_bids, make_pairs])
def test_case_folders_layout_is_still_detected_beside_the_new_ones(tmp_path, maker):
    # one folder per case holding *_image/*_label files is case folders, not pairs split by case name
    for case in ("case1", "case2"):
        _nii(tmp_path / "cf" / case / f"{case}_image.nii.gz", _volume(1))
        _nii(tmp_path / "cf" / case / f"{case}_label.nii.gz", _segmentation())
    assert detect_layout(tmp_path / "cf") == "case-folders"
    maker(tmp_path / "other")
    assert detect_layout(tmp_path / "other") != "case-folders"


def test_drive_test_split_without_manual_keeps_its_fov_masks_out_of_the_labels(tmp_path):
    make_drive(tmp_path / "DRIVE")
    shutil.rmtree(tmp_path / "DRIVE/test/1st_manual")
    ds = open_dataset(tmp_path / "DRIVE")
    assert ds.case("01_test").label is None and ds.case("21_training").label is not None
    assert ds.extra["fov_masks"]["01_test"].endswith("test/mask/01_test_mask.gif")
    assert fingerprint(ds, progress=False)["problems"] == []  # a test case needs no label


def test_bids_channels_and_label_can_be_named(tmp_path):
    make_bids(tmp_path / "bids")
    ds = open_dataset(tmp_path / "bids", image_names="T1w", label_name="label-brain_mask")
    assert ds.layout == "bids" and ds.channel_names == ["T1w"]
    assert ds.case("sub-03").label.name == "sub-03_label-brain_mask.nii.gz"
