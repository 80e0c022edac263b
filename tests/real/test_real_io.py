"""Every reader on the real files in ../shared/data (skipped where that folder does not exist)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsight import io

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available")
TCIA = DATA / "tcia-pgbm-001"


def test_tcia_three_series_share_one_geometry():
    t1, flair, mask = (io.read(TCIA / name) for name in ("T1post", "FLAIR", "MaskTumor"))
    assert t1.spatial_shape == flair.spatial_shape == mask.spatial_shape == (260, 320, 25)
    assert t1.same_geometry(flair) and t1.same_geometry(mask)
    assert np.allclose(t1.spacing[:2], (0.6875, 0.6875))
    assert t1.meta["Modality"] == "MR" and t1.meta["n_files"] == 25
    labels = np.unique(mask.array)
    assert labels[0] == 0 and len(labels) >= 2


def test_tcia_mask_lies_on_the_tumour():
    """If series were misaligned the mask would fall outside the head or on ordinary tissue. It must lie
    wholly inside the head, on tissue brighter than the rest of the head in the same slices in both FLAIR
    (oedema) and post-contrast T1 (enhancement)."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    t1, flair, mask = (io.read(TCIA / name).array[0] for name in ("T1post", "FLAIR", "MaskTumor"))
    tumour = mask > 0
    head = ndi.binary_fill_holes(t1 > threshold_otsu(t1), structure=np.ones((3, 3, 1)))
    assert head[tumour].all()
    same_slices = np.zeros_like(tumour)
    same_slices[:, :, tumour.any(axis=(0, 1))] = True
    rest = head & same_slices & ~tumour
    assert flair[tumour].mean() > 1.3 * flair[rest].mean()
    assert t1[tumour].mean() > 1.1 * t1[rest].mean()


def test_tcia_matches_monai_pydicom_reader_and_converts(tmp_path):
    from monai.data import PydicomReader

    reader = PydicomReader()
    data, meta = reader.get_data(reader.read(str(TCIA / "FLAIR")))
    scan = io.read(TCIA / "FLAIR")
    assert np.allclose(scan.affine, meta["affine"], atol=1e-4)
    assert np.array_equal(scan.array[0], data)
    back = io.read(io.write(scan, tmp_path / "flair.nii.gz"))
    assert np.allclose(back.affine, scan.affine, atol=1e-4) and np.array_equal(back.array, scan.array)


def test_hippocampus_nifti():
    scan = io.read(DATA / "hippocampus" / "labelsTr" / "hippocampus_004.nii.gz")
    assert scan.ndim == 3 and set(np.unique(scan.array)) <= {0, 1, 2}
    assert np.allclose(scan.spacing, (1.0, 1.0, 1.0))


def test_brats_nifti_full_size():
    case = next((DATA / "brats2015" / "train").iterdir())
    scan = io.read(case / "Flair_subtrMeanDivStd.nii.gz")
    assert scan.spatial_shape == (240, 240, 155)


def test_monuseg_png_rgb_and_mask():
    image = next((DATA / "monuseg" / "Train_Folder" / "img").glob("*.png"))
    scan = io.read(image)
    assert scan.ndim == 2 and scan.channels == 3 and scan.spatial_shape == (1000, 1000)
    mask = io.read(DATA / "monuseg" / "Train_Folder" / "labelcol" / image.name)
    assert set(np.unique(mask.array)) <= {0, 255}
