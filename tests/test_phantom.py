"""The phantom generator: repeatable, honest labels and text, real geometry, readable layouts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medsight import io
from medsight.datasets.phantom import (
    LABELS_3D,
    TISSUE_INTENSITY_3D,
    describe,
    make_phantom_2d,
    make_phantom_3d,
    write_phantom_dataset,
)
from medsight.errors import MedsightError
from medsight.scan import Scan


@pytest.fixture(scope="module")
def phantom3d():
    return make_phantom_3d(0)


@pytest.fixture(scope="module")
def clean3d():
    """Seed 0 again without noise or bias: the tissue intensities after partial-volume blur only."""
    return make_phantom_3d(0, noise=0.0, bias=0.0)


# -- repeatability -----------------------------------------------------------------------------
def test_same_seed_gives_identical_phantoms(phantom3d):
    image, label, text = make_phantom_3d(0)
    np.testing.assert_array_equal(image.array, phantom3d[0].array)
    np.testing.assert_array_equal(label.array, phantom3d[1].array)
    assert text == phantom3d[2]
    first, second = make_phantom_2d(5), make_phantom_2d(5)
    np.testing.assert_array_equal(first[0].array, second[0].array)
    np.testing.assert_array_equal(first[1].array, second[1].array)


def test_different_seeds_differ(phantom3d):
    image, label, _ = make_phantom_3d(1)
    assert not np.array_equal(label.array, phantom3d[1].array)
    assert not np.allclose(image.array, phantom3d[0].array)
    assert not np.array_equal(make_phantom_2d(1)[1].array, make_phantom_2d(2)[1].array)


# -- labels --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 7, 123])
def test_every_requested_structure_is_present(seed):
    for n_structures in (1, 3):
        image, label, _ = make_phantom_3d(seed, shape=(48, 56, 32), n_structures=n_structures)
        assert label.array.dtype == np.uint8
        assert image.spatial_shape == label.spatial_shape == (48, 56, 32)
        assert set(np.unique(label.array)) == set(range(n_structures + 1))


def test_tissues_have_their_mri_contrast(phantom3d, clean3d):
    label = phantom3d[1].array[0]
    clean = clean3d[0].array[0]
    core = {v: ndimage.binary_erosion(label == v) for v in LABELS_3D}
    # fluid is dark, an enhancing vessel bright, tumour in between, as in contrast-enhanced T1
    assert (
        clean[core[1]].mean()
        < clean[core[3]].mean()
        < TISSUE_INTENSITY_3D["parenchyma"]
        < clean[core[2]].mean()
    )


def test_2d_nuclei_are_separate_and_purple():
    image, label, text = make_phantom_2d(3, n_structures=12)
    assert image.array.shape == (3, 128, 128) and image.array.dtype == np.uint8
    assert set(np.unique(label.array)) == {0, 1}
    from skimage.measure import label as connected

    assert connected(label.array[0], connectivity=2).max() == 12
    assert "(12 nuclei" in text
    red, _, blue = image.array.astype(float)
    nuclei = label.array[0] == 1
    # haematoxylin absorbs red more than eosin does: nuclei are darker in red and bluer than stroma
    assert red[nuclei].mean() < red[~nuclei].mean() - 40
    assert (blue - red)[nuclei].mean() > (blue - red)[~nuclei].mean()
    grey, _, _ = make_phantom_2d(3, n_structures=12, rgb=False)
    assert grey.array.shape == (1, 128, 128)


# -- geometry ------------------------------------------------------------------------------------
def test_anisotropic_spacing_survives_a_nifti_round_trip(tmp_path):
    image, label, _ = make_phantom_3d(2, shape=(40, 36, 24), spacing=(0.8, 0.8, 3.0))
    io.write(image, tmp_path / "image.nii.gz")
    io.write(label, tmp_path / "label.nii.gz")
    back_image, back_label = io.read(tmp_path / "image.nii.gz"), io.read(tmp_path / "label.nii.gz")
    for scan in (back_image, back_label):
        np.testing.assert_allclose(scan.spacing, (0.8, 0.8, 3.0), atol=1e-6)
        assert scan.orientation == "RAS"
    # centred on world 0: the origin is minus half the field of view, (n - 1) / 2 * spacing
    np.testing.assert_allclose(back_image.origin, [-15.6, -14.0, -34.5], atol=1e-5)
    np.testing.assert_array_equal(back_label.array, label.array)
    assert back_label.array.dtype == np.uint8


# -- noise and bias ------------------------------------------------------------------------------
def test_rician_noise_is_present_in_a_uniform_tissue(phantom3d, clean3d):
    cyst_core = ndimage.binary_erosion(phantom3d[1].array[0] == 1)
    assert cyst_core.sum() > 10
    # fluid at 120 with sigma 25 is far from the Rician floor, so its spread is close to sigma
    assert 0.6 * 25 < phantom3d[0].array[0][cyst_core].std() < 1.5 * 25
    assert clean3d[0].array[0][cyst_core].std() < 0.2 * 25  # only residual partial-volume blur


def _end_to_end_change(image: np.ndarray, clean: np.ndarray, tissue: np.ndarray) -> float:
    """Largest relative change, over the three axes, of a tissue's mean between the first and last
    third of the image, after dividing out the noise-free image (which carries the tissue texture)."""
    ratio = np.divide(image, clean, out=np.ones_like(clean), where=tissue)
    changes = []
    for axis, n in enumerate(tissue.shape):
        index = np.indices(tissue.shape)[axis]
        first, last = tissue & (index < n // 3), tissue & (index >= n - n // 3)
        changes.append(abs(ratio[last].mean() / ratio[first].mean() - 1))
    return max(changes)


def test_bias_field_changes_a_tissue_between_the_ends_of_the_image(phantom3d, clean3d):
    clean = clean3d[0].array[0].astype(float)
    parenchyma = (phantom3d[1].array[0] == 0) & (np.abs(clean / TISSUE_INTENSITY_3D["parenchyma"] - 1) < 0.08)
    assert parenchyma.sum() > 1000
    assert _end_to_end_change(phantom3d[0].array[0], clean, parenchyma) > 0.05
    unbiased = make_phantom_3d(0, bias=0.0)[0].array[0]
    assert _end_to_end_change(unbiased, clean, parenchyma) < 0.02


# -- text ----------------------------------------------------------------------------------------
def test_describe_a_cube_in_a_known_corner():
    label = np.zeros((40, 40, 20), np.uint8)
    label[0:10, 0:10, 0:4] = 1  # 10 x 10 x 4 voxels of 1 x 1 x 2.5 mm = 1000 mm3 = 1.0 mL
    text = describe(label, (1.0, 1.0, 2.5), {1: "cyst", 2: "vessel"})
    # centroid at 12.5% of every axis; RAS voxel axes: low i = left, low j = posterior, low k = lower.
    # Equivalent-sphere diameter (6 * 1000 / pi) ** (1 / 3) = 12.4 mm.
    assert (
        text
        == "There is one 1.0 mL cyst (12 mm across) in the lower left posterior part. No vessel is visible."
    )


def test_describe_follows_the_affine_direction():
    label = Scan.from_spatial(np.zeros((40, 40, 20), np.uint8), np.diag([-1.0, -1.0, 2.5, 1.0]))
    label.array[0, 0:10, 0:10, 0:4] = 1
    label.array[0, 30:40, 0:10, 16:20] = 1  # a second cube: low j, high i and k
    # i and j run towards the patient's left and back (LPS-like), so low i is right and low j anterior
    text = describe(label, names={1: "cyst"})
    assert (
        text
        == "There are two cysts (1.0 mL and 1.0 mL) in the lower right anterior part and upper left anterior part."
    )


def test_describe_says_where_many_small_structures_crowd():
    label = np.zeros((100, 100), np.uint8)
    for row in (5, 15, 25, 35):
        for col in (60, 80):
            label[row : row + 4, col : col + 4] = 1  # eight 4 x 4 squares, all in the upper right
    text = describe(label, (0.001, 0.001), {1: "nucleus"})
    # 16 pixels of 1 um x 1 um = 16 um2
    assert text == "The nuclei density in the upper right is high (eight nuclei, mean area 16 µm²)."
    spread = np.zeros((100, 100), np.uint8)
    for row in (10, 60):
        for col in (10, 60):
            spread[row : row + 4, col : col + 4] = 1
    assert describe(spread, (0.001, 0.001), {1: "nucleus"}).startswith(
        "The nuclei are evenly distributed (four"
    )


def test_phantom_text_matches_its_own_label_map(phantom3d):
    _, label, text = phantom3d
    count = ndimage.label(label.array[0] == 3, structure=np.ones((3, 3, 3)))[1]
    if count == 1:
        assert re.search(r"There is one [0-9.]+ mL tumour", text)
    else:
        assert f"There are {['two', 'three'][count - 2]} tumours" in text
    assert "cyst" in text and "vessel" in text


# -- datasets on disk ----------------------------------------------------------------------------
def test_msd_dataset_json_lists_existing_files(tmp_path):
    out = write_phantom_dataset(tmp_path / "msd", 3, dim=3, seed=10)
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["modality"] == {"0": "MRI"}
    assert manifest["labels"] == {"0": "background", "1": "cyst", "2": "vessel", "3": "tumour"}
    assert manifest["numTraining"] == len(manifest["training"]) == 3
    assert manifest["training"][0] == {
        "image": "./imagesTr/phantom_000.nii.gz",
        "label": "./labelsTr/phantom_000.nii.gz",
    }
    for entry in manifest["training"]:
        assert (out / entry["image"]).is_file() and (out / entry["label"]).is_file()
    import pandas as pd

    texts = pd.read_csv(out / "texts.csv")
    assert list(texts.columns) == ["case", "Description"]
    assert list(texts["case"]) == ["phantom_000", "phantom_001", "phantom_002"]
    label = io.read(out / "labelsTr" / "phantom_001.nii.gz")
    # the stored sentence is what the stored label map says
    assert texts["Description"][1] == describe(label, names=LABELS_3D) == manifest["texts"]["phantom_001"]


def test_lvit_layout_matches_the_monuseg_layout(tmp_path):
    import pandas as pd

    out = write_phantom_dataset(tmp_path / "lvit", 5, dim=2, seed=3)
    train = pd.read_excel(out / "Train_Folder" / "Train_text.xlsx", sheet_name=None)
    val = pd.read_excel(out / "Val_Folder" / "Val_text.xlsx", sheet_name=None)
    assert list(train) == ["Sheet1"] and list(train["Sheet1"].columns) == ["Image", "Description"]
    assert list(train["Sheet1"]["Image"]) == [f"phantom_{i:03d}.png" for i in range(4)]
    assert list(val["Sheet1"]["Image"]) == ["phantom_004.png"]  # 20% of 5 cases
    for folder, sheet in (("Train_Folder", train), ("Val_Folder", val)):
        for name in sheet["Sheet1"]["Image"]:
            picture = io.read(out / folder / "img" / name)
            mask = io.read(out / folder / "labelcol" / name)
            assert picture.array.shape == (3, 128, 128)
            assert set(np.unique(mask.array)) == {0, 255}
    expected = make_phantom_2d(3 + 4)[1].array[0] > 0
    np.testing.assert_array_equal(
        io.read(out / "Val_Folder" / "labelcol" / "phantom_004.png").array[0] == 255, expected
    )


def test_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    out = write_phantom_dataset(tmp_path / "d", 3, dim=3)
    with pytest.raises(MedsightError, match="not empty"):
        write_phantom_dataset(out, 2, dim=3)
    write_phantom_dataset(out, 2, dim=3, overwrite=True)
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "phantom_000.nii.gz",
        "phantom_001.nii.gz",
    ]
    with pytest.raises(MedsightError):
        write_phantom_dataset(tmp_path / "e", 2, dim=2, layout="msd")


def test_cli_writes_a_dataset(tmp_path: Path):
    from typer.testing import CliRunner

    from medsight.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["phantom", str(tmp_path / "p"), "--cases", "2", "--dim", "2", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "Val_Folder" / "img" / "phantom_001.png").is_file()
    again = runner.invoke(app, ["phantom", str(tmp_path / "p"), "--cases", "2", "--dim", "2"])
    assert isinstance(again.exception, MedsightError)
