"""Dataset layouts, splits and the fingerprint on tiny synthetic datasets built in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medsight import MedsightError
from medsight.datasets import (
    Case,
    Dataset,
    detect_layout,
    fingerprint,
    open_dataset,
    split_dataset,
    train_val_split,
)

SPACING = (0.5, 1.0, 2.0)
AFFINE = np.diag([*SPACING, 1.0])
SHAPE = (6, 5, 4)


def write_nii(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def image_volume(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, shape).astype(np.float32)


def label_volume(shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[1:3, 1:3, 1:3] = 1  # 8 voxels
    lab[4, 0:2, 0:3] = 2  # 6 voxels
    return lab


def make_msd(root: Path, ids: list[str], channels: int = 1) -> dict[str, np.ndarray]:
    written = {}
    entries = []
    for n, case_id in enumerate(ids):
        if channels == 1:
            arr = image_volume(n)
        else:
            arr = np.stack([image_volume(10 * n + c) for c in range(channels)], axis=-1)  # NIfTI 4D: X,Y,Z,C
        written[case_id] = arr
        write_nii(root / "imagesTr" / f"{case_id}.nii.gz", arr)
        write_nii(root / "labelsTr" / f"{case_id}.nii.gz", label_volume())
        entries.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    modality = {str(c): name for c, name in enumerate(["FLAIR", "T1w", "T2w"][:channels])}
    meta = {
        "name": "toy",
        "tensorImageSize": "4D" if channels > 1 else "3D",
        "modality": modality,
        "labels": {"0": "background", "1": "left", "2": "right"},
        "numTraining": len(ids),
        "training": entries,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return written


def make_nnunet(root: Path, ids: list[str]) -> dict[str, list[np.ndarray]]:
    written = {}
    for n, case_id in enumerate(ids):
        written[case_id] = [image_volume(100 + 2 * n), image_volume(101 + 2 * n)]
        for c, arr in enumerate(written[case_id]):
            write_nii(root / "imagesTr" / f"{case_id}_{c:04d}.nii.gz", arr)
        write_nii(root / "labelsTr" / f"{case_id}.nii.gz", label_volume())
    meta = {
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "peripheral": 1, "transition": 2},
        "numTraining": len(ids),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return written


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_lvit(root: Path, sheet: str = "xlsx") -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    written = {}
    rng = np.random.default_rng(7)
    for folder, names in (("Train_Folder", ["b", "a", "c"]), ("Val_Folder", ["d", "e"])):
        rows = []
        for name in names:
            rgb = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
            mask = np.zeros((8, 10), np.uint8)
            mask[2:5, 3:7] = 255
            write_png(root / folder / "img" / f"{name}.png", rgb)
            write_png(root / folder / "labelcol" / f"{name}.png", mask)
            text = f"nuclei dense in part {name}"
            written[name] = (rgb, mask, text)
            rows.append({"Image": f"{name}.png", "Description": text})
        table = pd.DataFrame(rows[::-1])  # sheet order differs from file order on purpose
        prefix = folder.split("_")[0]
        if sheet == "xlsx":
            table.to_excel(root / folder / f"{prefix}_text.xlsx", index=False)
        else:
            table.to_csv(root / folder / f"{prefix}_text.csv", index=False)
    return written


def make_case_folders(root: Path) -> dict[str, dict[str, np.ndarray]]:
    written = {}
    for n, (split, case_id) in enumerate([("train", "pat1"), ("train", "pat2"), ("validation", "pat3")]):
        folder = root / split / case_id
        arrays = {"t1": image_volume(200 + n), "flair": image_volume(300 + n), "seg": label_volume()}
        for role, arr in arrays.items():
            write_nii(folder / f"{case_id}_{role}.nii.gz", arr)
        write_nii(folder / "brainmask.nii.gz", np.ones(SHAPE, np.uint8))
        (folder / "License.txt").write_text("CC BY")
        written[case_id] = arrays
    return written


# -- layouts ---------------------------------------------------------------------------------
def test_detects_each_layout(tmp_path):
    make_msd(tmp_path / "msd", ["c1", "c2"])
    make_nnunet(tmp_path / "nn", ["c1", "c2"])
    make_lvit(tmp_path / "lvit")
    make_case_folders(tmp_path / "folders")
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "manifest.csv").write_text("image,label\na.nii.gz,b.nii.gz\n")
    assert detect_layout(tmp_path / "msd") == "msd"
    assert detect_layout(tmp_path / "nn") == "nnunet"
    assert detect_layout(tmp_path / "lvit") == "lvit"
    assert detect_layout(tmp_path / "folders") == "case-folders"
    assert detect_layout(tmp_path / "csv") == "csv"
    assert detect_layout(tmp_path / "csv" / "manifest.csv") == "csv"
    (tmp_path / "nothing").mkdir()
    with pytest.raises(MedsightError, match="no known dataset layout"):
        detect_layout(tmp_path / "nothing")


def test_msd_cases_labels_and_geometry(tmp_path):
    written = make_msd(tmp_path, ["toy_003", "toy_001", "toy_002"])
    ds = open_dataset(tmp_path)
    assert ds.layout == "msd" and ds.dim == 3
    assert ds.case_ids == ["toy_003", "toy_001", "toy_002"]  # the json's order
    assert ds.labels == {0: "background", 1: "left", 2: "right"}
    assert ds.channel_names == ["FLAIR"]
    image, label = ds.load_case(ds.case("toy_001"))
    assert image.array.shape == (1, *SHAPE)
    np.testing.assert_array_equal(image.array[0], written["toy_001"])
    np.testing.assert_array_equal(label.array[0], label_volume())
    assert image.spacing == pytest.approx(SPACING)


def test_msd_texts_extension(tmp_path):
    make_msd(tmp_path, ["c1", "c2"])
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["texts"] = {"c2": "a lesion at the top"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = open_dataset(tmp_path)
    assert [c.text for c in ds.cases] == [None, "a lesion at the top"]
    assert fingerprint(ds, progress=False)["texts"] == {"with_text": 1, "without_text": 1}


def test_msd_multichannel_4d_nifti_is_channel_first(tmp_path):
    written = make_msd(tmp_path, ["m1", "m2"], channels=3)
    ds = open_dataset(tmp_path)
    assert ds.channel_names == ["FLAIR", "T1w", "T2w"]
    image, _ = ds.load_case(ds.cases[1])
    assert image.array.shape == (3, *SHAPE)
    for c in range(3):
        np.testing.assert_array_equal(image.array[c], written["m2"][..., c])


def test_msd_json_over_nnunet_v1_channel_files(tmp_path):
    """nnU-Net v1 kept the MSD json but stored <case>_0000.nii.gz: follow those files."""
    (tmp_path / "imagesTr").mkdir()
    arr0, arr1 = image_volume(1), image_volume(2)
    write_nii(tmp_path / "imagesTr" / "k_0000.nii.gz", arr0)
    write_nii(tmp_path / "imagesTr" / "k_0001.nii.gz", arr1)
    write_nii(tmp_path / "labelsTr" / "k.nii.gz", label_volume())
    meta = {"modality": {"0": "CT", "1": "PET"}, "labels": {"0": "bg", "1": "x", "2": "y"},
            "training": [{"image": "./imagesTr/k.nii.gz", "label": "./labelsTr/k.nii.gz"}]}  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = open_dataset(tmp_path)
    assert ds.layout == "msd"
    image, _ = ds.load_case(ds.cases[0])
    np.testing.assert_array_equal(image.array, np.stack([arr0, arr1]))


def test_nnunet_channels_stack_in_suffix_order(tmp_path):
    written = make_nnunet(tmp_path, ["prostate_02", "prostate_01"])
    ds = open_dataset(tmp_path)
    assert ds.layout == "nnunet"
    assert ds.case_ids == ["prostate_01", "prostate_02"]
    assert ds.labels == {0: "background", 1: "peripheral", 2: "transition"}
    assert ds.channel_names == ["T2", "ADC"]
    image, label = ds.load_case(ds.case("prostate_02"))
    np.testing.assert_array_equal(image.array[0], written["prostate_02"][0])
    np.testing.assert_array_equal(image.array[1], written["prostate_02"][1])
    np.testing.assert_array_equal(label.array[0], label_volume())


def test_channels_with_different_geometry_are_refused(tmp_path):
    make_nnunet(tmp_path, ["a"])
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    write_nii(tmp_path / "imagesTr" / "a_0001.nii.gz", image_volume(9), shifted)
    ds = open_dataset(tmp_path)
    with pytest.raises(MedsightError, match="a_0001.nii.gz"):
        ds.load_case(ds.cases[0])


@pytest.mark.parametrize("sheet", ["xlsx", "csv"])
def test_lvit_splits_texts_and_label_mapping(tmp_path, sheet):
    written = make_lvit(tmp_path, sheet)
    ds = open_dataset(tmp_path)
    assert ds.layout == "lvit" and ds.dim == 2
    assert ds.splits == {"train": ["a", "b", "c"], "val": ["d", "e"]}
    assert ds.labels == {0: "background", 1: "foreground"}
    assert ds.label_mapping == {255: 1}
    assert ds.channel_names == ["R", "G", "B"]
    for case in ds.cases:
        assert case.text == written[case.case_id][2]
    image, label = ds.load_case(ds.case("c"))
    rgb, mask, _ = written["c"]
    np.testing.assert_array_equal(image.array, np.moveaxis(rgb, -1, 0))
    np.testing.assert_array_equal(label.array[0], (mask == 255).astype(np.uint8))


def test_case_folders_auto_detect_channels_and_label(tmp_path):
    written = make_case_folders(tmp_path)
    ds = open_dataset(tmp_path)
    assert ds.layout == "case-folders"
    # brainmask is a helper mask, License.txt is not a scan, seg is the label
    assert ds.channel_names == ["flair", "t1"]
    assert ds.splits == {"train": ["pat1", "pat2"], "val": ["pat3"]}
    assert ds.labels == {}  # undeclared: the fingerprint discovers the values
    image, label = ds.load_case(ds.case("pat2"))
    np.testing.assert_array_equal(image.array, np.stack([written["pat2"]["flair"], written["pat2"]["t1"]]))
    np.testing.assert_array_equal(label.array[0], label_volume())


def test_case_folders_explicit_names(tmp_path):
    written = make_case_folders(tmp_path)
    ds = open_dataset(tmp_path, image_names=["t1"], label_name="brainmask")
    assert ds.channel_names == ["t1"]
    image, label = ds.load_case(ds.case("pat1"))
    np.testing.assert_array_equal(image.array[0], written["pat1"]["t1"])
    assert label.array.min() == 1


def test_case_folders_ambiguous_label_needs_a_name(tmp_path):
    make_case_folders(tmp_path)
    for folder in (tmp_path / "train").iterdir():
        write_nii(folder / "labels.nii.gz", label_volume())
    with pytest.raises(MedsightError, match="--label-name"):
        open_dataset(tmp_path)


def test_csv_manifest_relative_paths_and_channels(tmp_path):
    a0, a1, b0, b1 = (image_volume(s) for s in range(4))
    write_nii(tmp_path / "img" / "a0.nii.gz", a0)
    write_nii(tmp_path / "img" / "a1.nii.gz", a1)
    write_nii(tmp_path / "img" / "b0.nii.gz", b0)
    write_nii(tmp_path / "img" / "b1.nii.gz", b1)
    write_nii(tmp_path / "lab" / "a.nii.gz", label_volume())
    (tmp_path / "list.csv").write_text(
        "image,label,text,split\n"
        "img/a0.nii.gz;img/a1.nii.gz,lab/a.nii.gz,a small lesion,Train\n"
        "img/b0.nii.gz; img/b1.nii.gz,,,test\n"
    )
    ds = open_dataset(tmp_path / "list.csv")
    assert ds.layout == "csv" and ds.channel_names == ["ch0", "ch1"]
    assert [(c.case_id, c.split, c.text) for c in ds.cases] == [
        ("a0", "train", "a small lesion"),
        ("b0", "test", None),
    ]
    image, label = ds.load_case(ds.cases[0])
    np.testing.assert_array_equal(image.array, np.stack([a0, a1]))
    image_b, label_b = ds.load_case(ds.cases[1])
    np.testing.assert_array_equal(image_b.array, np.stack([b0, b1]))
    assert label_b is None
    assert fingerprint(ds, progress=False)["problems"] == []  # a test case without label is fine


def test_unknown_option_and_layout_are_refused(tmp_path):
    make_msd(tmp_path, ["c1"])
    with pytest.raises(MedsightError, match="image_names"):
        open_dataset(tmp_path, layout="msd", image_names=["x"])
    with pytest.raises(MedsightError, match="unknown layout"):
        open_dataset(tmp_path, layout="bogus")


def test_empty_dataset_raises(tmp_path):
    make_msd(tmp_path, [])
    with pytest.raises(MedsightError, match="no cases"):
        open_dataset(tmp_path)
    with pytest.raises(MedsightError, match="no cases"):
        fingerprint(Dataset(tmp_path, "msd", []), progress=False)


# -- splits ----------------------------------------------------------------------------------
def test_split_is_deterministic_and_order_independent():
    ids = [f"case_{i:02d}" for i in range(10)]
    train, val = train_val_split(ids, val_fraction=0.2, seed=3)
    assert (train, val) == train_val_split(list(reversed(ids)), val_fraction=0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == ids and not set(train) & set(val)
    assert val == sorted(val) and train == sorted(train)
    seeds_vals = {tuple(train_val_split(ids, 0.2, seed=s)[1]) for s in range(10)}
    assert len(seeds_vals) > 1  # the seed matters


def test_split_matches_a_seeded_permutation_of_sorted_ids():
    ids = ["d", "b", "e", "a", "c"]
    order = np.random.default_rng(11).permutation(5)
    expected_val = sorted(np.array(sorted(ids))[order[:1]].tolist())  # round(5 * 0.2) = 1
    assert train_val_split(ids, 0.2, seed=11)[1] == expected_val


def test_split_honours_layout_split_and_excludes_test():
    given = {"a": "train", "b": "val", "c": "train", "d": "test", "e": "val"}
    assert train_val_split(given, 0.5, seed=0, given=given) == (["a", "c"], ["b", "e"])
    only_test = {"a": None, "b": None, "c": "test"}
    train, val = train_val_split(only_test, 0.5, seed=0, given=only_test)
    assert sorted(train + val) == ["a", "b"] and len(val) == 1


def test_split_dataset_uses_lvit_folders(tmp_path):
    make_lvit(tmp_path)
    assert split_dataset(open_dataset(tmp_path)) == (["a", "b", "c"], ["d", "e"])


def test_split_refuses_duplicates():
    with pytest.raises(MedsightError, match="duplicate"):
        train_val_split(["a", "a", "b"])


# -- fingerprint -----------------------------------------------------------------------------
def test_fingerprint_numbers_on_a_clean_dataset(tmp_path):
    written = make_msd(tmp_path, ["c1", "c2", "c3"])
    affine = np.diag([0.8, 0.8, 3.0, 1.0])  # one case with other spacing and shape
    written["c3"] = image_volume(5, (7, 5, 4))
    write_nii(tmp_path / "imagesTr" / "c3.nii.gz", written["c3"], affine)
    write_nii(tmp_path / "labelsTr" / "c3.nii.gz", np.zeros((7, 5, 4), np.uint8), affine)
    facts = fingerprint(open_dataset(tmp_path), progress=False)
    assert facts["problems"] == []
    assert facts["layout"] == "msd" and facts["cases"] == 3 and facts["cases_per_split"] == {"unsplit": 3}
    assert facts["shapes"]["unique"] == [{"shape": [6, 5, 4], "cases": 2}, {"shape": [7, 5, 4], "cases": 1}]
    assert facts["spacings"]["min"] == [0.5, 0.8, 2.0] and facts["spacings"]["max"] == [0.8, 1.0, 3.0]
    assert facts["spacings"]["median"] == [0.5, 1.0, 2.0]
    n = int(np.prod(SHAPE))
    # two cases with 8 voxels of 1 and 6 of 2; c3 all background
    assert facts["label_values"] == [
        {"value": 0, "voxels": 2 * (n - 14) + 140, "cases": 3},
        {"value": 1, "voxels": 16, "cases": 2},
        {"value": 2, "voxels": 12, "cases": 2},
    ]
    assert facts["cases_with_empty_label"] == 1
    voxels = np.concatenate([a.ravel().astype(np.float64) for a in written.values()])
    stats = facts["intensity"][0]
    assert stats["channel"] == "FLAIR" and stats["voxels"] == voxels.size
    assert stats["mean"] == pytest.approx(voxels.mean()) and stats["std"] == pytest.approx(voxels.std())
    assert stats["p0_5"] == pytest.approx(np.percentile(voxels, 0.5))
    assert stats["p99_5"] == pytest.approx(np.percentile(voxels, 99.5))
    assert facts["declared_labels"] == {"0": "background", "1": "left", "2": "right"}


def test_fingerprint_finds_every_planted_problem(tmp_path):
    ids = ["ok", "nolabel", "noimage", "shape", "affine", "outside", "fraction", "nan", "flat", "corrupt"]
    make_msd(tmp_path, ids)
    img, lab = tmp_path / "imagesTr", tmp_path / "labelsTr"
    (lab / "nolabel.nii.gz").unlink()
    (img / "noimage.nii.gz").unlink()
    write_nii(lab / "shape.nii.gz", np.zeros((6, 5, 3), np.uint8))
    moved = AFFINE.copy()
    moved[:3, 3] = [10.0, 0.0, 0.0]
    write_nii(lab / "affine.nii.gz", label_volume(), moved)
    bad_values = label_volume()
    bad_values[0, 0, 0] = 5
    write_nii(lab / "outside.nii.gz", bad_values)
    fractional = label_volume().astype(np.float32)
    fractional[0, 0, 0] = 0.5
    write_nii(lab / "fraction.nii.gz", fractional)
    with_nan = image_volume(1)
    with_nan[0, 0, 0] = np.nan
    with_nan[1, 0, 0] = np.inf
    write_nii(img / "nan.nii.gz", with_nan)
    write_nii(img / "flat.nii.gz", np.full(SHAPE, 7.0, np.float32))
    (img / "corrupt.nii.gz").write_bytes(b"this is not a nifti file")

    facts = fingerprint(open_dataset(tmp_path), progress=False)
    found = {(p["case"], p["problem"].split(":")[0].split(" (")[0]) for p in facts["problems"]}
    assert found == {
        ("nolabel", "missing label file"),
        ("noimage", "missing image"),
        ("shape", "image/label shape mismatch"),
        ("affine", "image/label geometry mismatch"),
        ("outside", "label values outside the declared classes [0, 1, 2]"),
        ("fraction", "non-integer label values"),
        ("nan", "2 NaN/inf intensities in channel FLAIR"),
        ("flat", "constant"),
        ("corrupt", "unreadable"),
    }
    by_case = {p["case"]: p for p in facts["problems"]}
    assert by_case["corrupt"]["file"] == str(img / "corrupt.nii.gz")
    assert by_case["outside"]["problem"].endswith("[5]")
    assert "0.5" in by_case["fraction"]["problem"]
    # raw label values are still tallied, including the out-of-class and fractional ones
    assert {v["value"] for v in facts["label_values"]} == {0, 0.5, 1, 2, 5}


def test_fingerprint_reports_raw_lvit_values_and_mapped_check(tmp_path):
    make_lvit(tmp_path)
    write_png(tmp_path / "Val_Folder" / "labelcol" / "e.png", np.full((8, 10), 128, np.uint8))
    (tmp_path / "Val_Folder" / "img" / "d.png").unlink()
    facts = fingerprint(open_dataset(tmp_path), progress=False)
    assert {v["value"] for v in facts["label_values"]} == {0, 128, 255}
    assert facts["texts"] == {"with_text": 5, "without_text": 0}
    assert facts["cases_per_split"] == {"train": 3, "val": 2}
    problems = {(p["case"], p["problem"].split(":")[0]) for p in facts["problems"]}
    # 255 maps to the declared class 1, so only 128 is outside; the sheet still lists the deleted d.png
    assert problems == {("e", "label values outside the declared classes [0, 1]"), ("d", "missing image")}


def test_fingerprint_max_cases_reads_only_the_first(tmp_path):
    make_msd(tmp_path, ["c1", "c2", "c3"])
    (tmp_path / "labelsTr" / "c3.nii.gz").unlink()
    facts = fingerprint(open_dataset(tmp_path), max_cases=2, progress=False)
    assert facts["cases"] == 3 and facts["cases_inspected"] == 2 and facts["problems"] == []


def test_case_folder_missing_channel_is_reported(tmp_path):
    make_case_folders(tmp_path)
    (tmp_path / "train" / "pat2" / "pat2_t1.nii.gz").unlink()
    facts = fingerprint(open_dataset(tmp_path), progress=False)
    assert [(p["case"], p["problem"]) for p in facts["problems"]] == [("pat2", "missing image")]
    assert facts["problems"][0]["file"].endswith("pat2_t1.nii.gz")


def test_dataset_case_lookup(tmp_path):
    ds = Dataset(tmp_path, "csv", [Case("x", [tmp_path / "x.nii.gz"])])
    assert ds.case("x").case_id == "x"
    with pytest.raises(MedsightError, match="no case 'y'"):
        ds.case("y")


# -- CLI -------------------------------------------------------------------------------------
def test_cli_inspect_exit_codes_and_output(tmp_path, run_cli):
    make_msd(tmp_path / "msd", ["c1", "c2"])
    (tmp_path / "msd" / "labelsTr" / "c2.nii.gz").unlink()
    result = run_cli("data", "inspect", str(tmp_path / "msd"), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "missing label file" in result.stdout and "1 problem(s) found" in result.stdout

    result = run_cli("data", "inspect", str(tmp_path / "msd"), "--json")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["cases"] == 2 and [p["case"] for p in facts["problems"]] == ["c2"]

    (tmp_path / "empty").mkdir()
    result = run_cli("data", "inspect", str(tmp_path / "empty"))
    assert result.returncode == 2 and "no known dataset layout" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_inspect_case_folder_options(tmp_path, run_cli):
    make_case_folders(tmp_path)
    result = run_cli(
        "data", "inspect", str(tmp_path), "--json", "--image-names", "t1,flair", "--label-name", "seg",
        "--max-cases", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["channels"] == ["t1", "flair"] and facts["cases_inspected"] == 1
    assert {v["value"] for v in facts["label_values"]} == {0, 1, 2}
