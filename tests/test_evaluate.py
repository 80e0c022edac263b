"""Metrics checked against values worked out by hand, and folder evaluation on NIfTI files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from medsight import io
from medsight.errors import MedsightError
from medsight.evaluate import evaluate_folders, image_metrics, segmentation_metrics
from medsight.scan import Scan

MEDSIGHT = Path(sys.executable).parent / "medsight"


# -- segmentation metrics by hand -------------------------------------------------------------
def test_dice_iou_of_two_overlapping_squares():
    # A: rows 0-3 x cols 0-3 (16 px); B: rows 2-5 x cols 2-5 (16 px); A∩B: rows 2-3 x cols 2-3 (4 px)
    ref = np.zeros((8, 8), int)
    pred = np.zeros((8, 8), int)
    ref[0:4, 0:4] = 1
    pred[2:6, 2:6] = 1
    m = segmentation_metrics(pred, ref)["1"]
    assert m["dice"] == pytest.approx(2 * 4 / (16 + 16))  # 0.25
    assert m["iou"] == pytest.approx(4 / (16 + 16 - 4))  # 1/7
    assert (m["ref_voxels"], m["pred_voxels"], m["overlap_voxels"]) == (16, 16, 4)


def test_small_cube_shifted_one_voxel_anisotropic():
    # 2x2x2 cubes (every voxel is on the surface), shifted by 1 voxel along axis 0 whose spacing is 2 mm.
    # Each mask: 4 voxels on the shared layer (distance 0) and 4 one layer away (distance 2 mm).
    ref = np.zeros((6, 6, 6), int)
    pred = np.zeros((6, 6, 6), int)
    ref[0:2, 0:2, 0:2] = 1
    pred[1:3, 0:2, 0:2] = 1
    spacing = (2.0, 0.5, 0.5)
    m = segmentation_metrics(pred, ref, spacing, tolerance_mm=1.0)["1"]
    assert m["dice"] == pytest.approx(2 * 4 / 16)
    assert m["iou"] == pytest.approx(4 / 12)
    assert m["hd95_mm"] == pytest.approx(2.0)  # 95th percentile of [0,0,0,0,2,2,2,2]
    assert m["assd_mm"] == pytest.approx(1.0)  # (8 * 0 + 8 * 2) / 16
    assert m["nsd"] == pytest.approx(0.5)  # 1 mm tolerance covers only the zeros
    assert segmentation_metrics(pred, ref, spacing, tolerance_mm=2.0)["1"]["nsd"] == pytest.approx(1.0)


def test_four_cube_shifted_one_voxel_anisotropic():
    # 4x4x4 cubes shifted by 1 along axis 0 (1.5 mm), in-plane spacing 1 mm. Each cube has 56 surface
    # voxels (64 minus the 2x2x2 core). From one cube's surface to the other's:
    #  - 16 voxels of the far face: 1.5 mm (one step along axis 0);
    #  - 4 core voxels of the near face, not on the other surface: 1 mm (one in-plane step to its rim);
    #  - the other 36 lie on the other surface too: 0 mm.
    ref = np.zeros((8, 8, 8), int)
    pred = np.zeros((8, 8, 8), int)
    ref[1:5, 1:5, 1:5] = 1
    pred[2:6, 1:5, 1:5] = 1
    spacing = (1.5, 1.0, 1.0)
    m = segmentation_metrics(pred, ref, spacing, tolerance_mm=1.0)["1"]
    assert m["dice"] == pytest.approx(2 * 48 / 128)
    assert m["iou"] == pytest.approx(48 / 80)
    assert m["assd_mm"] == pytest.approx((16 * 1.5 + 4 * 1.0) / 56)  # 0.5, same both ways
    assert m["hd95_mm"] == pytest.approx(1.5)  # 95th percentile falls among the 16 values of 1.5
    assert m["nsd"] == pytest.approx((36 + 4) / 56)
    assert segmentation_metrics(pred, ref, spacing, tolerance_mm=1.5)["1"]["nsd"] == pytest.approx(1.0)
    # isotropic 1 mm: every distance is 1 or 0, so 1 mm tolerance covers everything
    assert segmentation_metrics(pred, ref, (1, 1, 1), tolerance_mm=1.0)["1"]["nsd"] == pytest.approx(1.0)


def test_single_pass_surface_metrics_agree_with_monai_compute_functions():
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"), -1)
    ref = (np.linalg.norm(grid - [9, 10, 8], axis=-1) < 6).astype(int)
    pred = ((np.linalg.norm(grid - [11, 9, 9], axis=-1) + rng.normal(0, 0.8, ref.shape)) < 5.5).astype(int)
    spacing = [0.7, 1.2, 2.5]
    mine = segmentation_metrics(pred, ref, spacing, tolerance_mm=1.5)["1"]

    p, r = (torch.from_numpy(a.astype(np.float32))[None, None] for a in (pred, ref))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)
        assd = compute_average_surface_distance(
            p, r, include_background=True, symmetric=True, spacing=spacing
        )
        nsd = compute_surface_dice(p, r, [1.5], include_background=True, spacing=spacing)
    assert mine["hd95_mm"] == pytest.approx(hd.item(), rel=1e-5)
    assert mine["assd_mm"] == pytest.approx(assd.item(), rel=1e-5)
    assert mine["nsd"] == pytest.approx(nsd.item(), rel=1e-5)


@pytest.mark.parametrize(
    "pred_on, ref_on, expected",
    [
        (False, False, {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95_mm": 0.0, "assd_mm": 0.0}),
        (True, False, {"dice": 0.0, "iou": 0.0, "nsd": 0.0, "hd95_mm": math.nan, "assd_mm": math.nan}),
        (False, True, {"dice": 0.0, "iou": 0.0, "nsd": 0.0, "hd95_mm": math.nan, "assd_mm": math.nan}),
    ],
    ids=["both-empty", "reference-empty", "prediction-empty"],
)
def test_empty_mask_conventions(pred_on, ref_on, expected):
    pred = np.zeros((5, 5, 5), int)
    ref = np.zeros((5, 5, 5), int)
    pred[1:3, 1:3, 1:3] = pred_on
    ref[2:4, 2:4, 2:4] = ref_on
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI's empty-mask warnings must not leak
        m = segmentation_metrics(pred, ref, labels={1: "lesion"})["lesion"]
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(m[key]), key
        else:
            assert m[key] == value, key


def test_labels_discovered_from_reference_and_named():
    ref = np.zeros((6, 6), int)
    ref[0:2, 0:2] = 1
    ref[3:5, 3:5] = 3
    pred = ref.copy()
    pred[0, 5] = 7  # a value absent from the reference is not a label
    assert list(segmentation_metrics(pred, ref)) == ["1", "3"]
    named = segmentation_metrics(pred, ref, labels={3: "tumour"})
    assert list(named) == ["tumour"] and named["tumour"]["dice"] == 1.0


def test_segmentation_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(np.zeros((4, 4)), np.ones((4, 4)), spacing=(1, 1, 1))


# -- image metrics ------------------------------------------------------------------------------
def test_psnr_by_hand():
    ref = np.zeros((16, 16))
    ref[0, 0] = 10  # data range 10
    pred = ref.copy()
    pred[4:8, 4:8] += 1  # 16 of 256 pixels off by 1: MSE = 1/16
    expected = 10 * math.log10(10**2 / (16 / 256))
    assert image_metrics(pred, ref)["psnr"] == pytest.approx(expected)
    assert image_metrics(pred, ref, data_range=20)["psnr"] == pytest.approx(10 * math.log10(400 / (1 / 16)))


def test_ssim_identical_is_one_and_psnr_infinite():
    rng = np.random.default_rng(1)
    img = rng.random((20, 24))
    m = image_metrics(img, img)
    assert m["ssim"] == pytest.approx(1.0)
    assert m["psnr"] == math.inf
    assert image_metrics(img + rng.normal(0, 0.2, img.shape), img)["ssim"] < 0.9


def test_ssim_of_two_constant_images_by_formula():
    # no variance anywhere: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 L)^2
    a, b, data_range = 0.2, 0.5, 1.0
    c1 = (0.01 * data_range) ** 2
    m = image_metrics(np.full((12, 12, 12), b), np.full((12, 12, 12), a), data_range=data_range)
    assert m["ssim"] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)


def test_image_metrics_errors():
    with pytest.raises(ValueError, match="constant"):
        image_metrics(np.ones((12, 12)), np.ones((12, 12)))
    with pytest.raises(ValueError, match="at least 11"):
        image_metrics(np.random.rand(8, 20), np.random.rand(8, 20))


# -- folders ------------------------------------------------------------------------------------
AFFINE = Scan.affine_from_spacing((2.0, 1.0, 1.0), origin=(10.0, -5.0, 3.0))


def _save(folder: Path, name: str, arr: np.ndarray, affine=AFFINE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return io.write(Scan.from_spatial(arr.astype(np.uint8), affine), folder / name)


def _cube(shift: int = 0, value: int = 1) -> np.ndarray:
    arr = np.zeros((6, 6, 6), np.uint8)
    arr[1 + shift : 3 + shift, 1:3, 1:3] = value
    return arr


@pytest.fixture
def seg_folders(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    _save(ref, "case_a.nii.gz", _cube())
    _save(pred, "case_a.nii.gz", _cube())  # perfect
    _save(ref, "case_b.nii.gz", _cube())
    _save(pred, "case_b.nii.gz", _cube(shift=1))  # Dice 0.5, HD95 2 mm (axis 0 has 2 mm spacing)
    _save(ref, "case_c.nii.gz", _cube())
    _save(pred, "case_c.nii.gz", np.zeros((6, 6, 6)))  # missed: Dice 0, HD95 undefined
    return pred, ref


def test_evaluate_folders_rows_and_summary(seg_folders):
    result = evaluate_folders(*seg_folders, progress=False)
    cases = result.cases.set_index("case")
    assert list(cases.index) == ["case_a", "case_b", "case_c"]
    assert list(cases["dice"]) == pytest.approx([1.0, 0.5, 0.0])
    assert cases.loc["case_b", "hd95_mm"] == pytest.approx(2.0)  # spacing came from the reference
    assert cases.loc["case_b", "assd_mm"] == pytest.approx(1.0)
    assert math.isnan(cases.loc["case_c", "hd95_mm"])

    summary = result.summary.set_index("metric")
    dice = summary.loc["dice"]
    assert (dice["mean"], dice["median"], dice["n"], dice["n_nan"]) == (pytest.approx(0.5), 0.5, 3, 0)
    assert dice["std"] == pytest.approx(math.sqrt(((0.5**2) + 0 + 0.5**2) / 3))  # population std
    hd = summary.loc["hd95_mm"]
    assert (hd["mean"], hd["n"], hd["n_nan"]) == (pytest.approx(1.0), 2, 1)  # mean of 0 and 2, NaN left out


def test_write_outputs_and_refuse_overwrite(seg_folders, tmp_path):
    result = evaluate_folders(*seg_folders, progress=False)
    out = tmp_path / "eval"
    result.write(out)

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=no_nan)
    assert summary["summary"]["1"]["hd95_mm"]["n_nan"] == 1
    assert summary["summary"]["1"]["dice"]["mean"] == pytest.approx(0.5)
    assert summary["n_cases"] == 3
    csv = (out / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("case,label,label_value,dice,iou,hd95_mm,assd_mm,nsd")
    assert len(csv) == 4 and "NaN" in csv[3]
    assert "| 1 | dice | 0.5000 |" in (out / "summary.md").read_text()

    with pytest.raises(MedsightError, match="already exists"):
        result.write(out)
    result.write(out, overwrite=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_geometry_mismatch_names_the_file(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    _save(ref, "x.nii.gz", _cube())
    moved = Scan.affine_from_spacing((2.0, 1.0, 1.0), origin=(12.0, -5.0, 3.0))
    _save(pred, "x.nii.gz", _cube(), affine=moved)
    with pytest.raises(MedsightError, match="geometry differs") as err:
        evaluate_folders(pred, ref, progress=False)
    assert err.value.path == pred / "x.nii.gz"

    _save(pred, "y.nii.gz", np.zeros((6, 6, 5)))
    _save(ref, "y.nii.gz", np.zeros((6, 6, 6)))
    (pred / "x.nii.gz").unlink()
    _save(pred, "x.nii.gz", _cube())
    with pytest.raises(MedsightError, match=r"shape \[6, 6, 5\]"):
        evaluate_folders(pred, ref, progress=False)


def test_missing_predictions_listed_and_extras_ignored(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for name in ("a", "b", "c"):
        _save(ref, f"{name}.nii.gz", _cube())
    _save(pred, "a.nii.gz", _cube())
    with pytest.raises(MedsightError, match="2 reference case.*b, c"):
        evaluate_folders(pred, ref, progress=False)

    _save(pred, "b.nii.gz", _cube())
    _save(pred, "c.npz", _cube())  # any supported format pairs by case id
    _save(pred, "extra.nii.gz", _cube())
    with pytest.warns(UserWarning, match="extra"):
        result = evaluate_folders(pred, ref, progress=False)
    assert result.ignored_predictions == ["extra"]
    assert sorted(result.cases["case"]) == ["a", "b", "c"]


def test_label_names_from_dataset_json(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "labelsTr"
    _save(ref, "a.nii.gz", _cube(value=2))
    _save(pred, "a.nii.gz", _cube(value=2))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "2": "posterior"}}))
    result = evaluate_folders(pred, ref, progress=False)
    assert list(result.cases["label"]) == ["posterior"]
    assert result.labels == {2: "posterior"}


def test_image_mode(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    base = np.zeros((12, 12, 12))
    base[0, 0, 0] = 100
    noisy = base.copy()
    noisy[:, :, :6] += 2  # half the voxels off by 2: MSE 2
    _save(ref, "v.nii.gz", base)
    _save(pred, "v.nii.gz", noisy)
    result = evaluate_folders(pred, ref, kind="image", progress=False)
    row = result.cases.iloc[0]
    assert row["psnr"] == pytest.approx(10 * math.log10(100**2 / 2))
    assert 0 < row["ssim"] < 1
    assert list(result.summary["metric"]) == ["psnr", "ssim"]


# -- command line -------------------------------------------------------------------------------
def test_cli_missing_prediction_exits_2(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    _save(ref, "a.nii.gz", _cube())
    _save(pred, "b.nii.gz", _cube())
    run = subprocess.run(
        [str(MEDSIGHT), "evaluate", "--pred", str(pred), "--ref", str(ref), "--no-report"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "no prediction for 1 reference case(s): a" in lines[0]
    assert not (tmp_path / "pred_evaluation").exists()


def test_cli_existing_output_exits_2(tmp_path):
    pred, ref, out = tmp_path / "pred", tmp_path / "ref", tmp_path / "out"
    _save(ref, "a.nii.gz", _cube())
    _save(pred, "a.nii.gz", _cube())
    out.mkdir()
    (out / "summary.json").write_text("{}")
    run = subprocess.run(
        [str(MEDSIGHT), "evaluate", "--pred", str(pred), "--ref", str(ref), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "already exists" in run.stderr and (out / "summary.json").read_text() == "{}"
