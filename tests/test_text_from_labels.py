"""Sentences from label maps: patient-side words from the affine, orientation independence, size, pieces."""

from __future__ import annotations

import numpy as np
import pytest

from medsight.errors import MedsightError
from medsight.scan import Scan
from medsight.text_from_labels import describe_labels, label_facts, label_sizes, tercile_bins

NAMES = {1: "anterior hippocampus"}


def _ras_phantom(x_slice=slice(3, 7), spacing=(1.0, 1.0, 2.0)):
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[x_slice, 8:12, 8:12] = 1  # centred in y and z, off-centre in x
    return Scan.from_spatial(arr, Scan.affine_from_spacing(spacing))


def test_minus_x_in_ras_is_the_patients_right():
    # identity-oriented (RAS) grid: voxels 3..6 sit at world x 3..6, below the image centre 9.5, i.e.
    # towards -x, which in RAS is the patient's RIGHT (+x is the patient's left).
    text = describe_labels(_ras_phantom(), NAMES)
    assert text == "the anterior hippocampus lies on the right side; one piece"
    assert "left side" in describe_labels(_ras_phantom(slice(13, 17)), NAMES)


def test_las_and_ras_affines_of_the_same_physical_label_give_the_same_sentence():
    ras = _ras_phantom()
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = 19.0  # LAS voxel i sits at world x = 19 - i
    las = Scan(ras.array[:, ::-1].copy(), flip @ ras.affine)
    assert las.orientation == "LAS"
    np.testing.assert_allclose(las.voxel_to_world([16 - 0, 9, 9]), ras.voxel_to_world([3, 9, 9]))
    assert describe_labels(las, NAMES) == describe_labels(ras, NAMES)


def test_anterior_superior_and_size_bins():
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[8:12, 14:18, 15:19] = 1  # +y (anterior) and +z (superior) of the centre, central in x
    scan = Scan.from_spatial(arr, Scan.affine_from_spacing((1.0, 1.0, 2.0)))
    # 4 * 4 * 4 voxels of 1 x 1 x 2 mm = 128 mm^3
    assert label_sizes(scan, NAMES) == {"anterior hippocampus": 128.0}
    text = describe_labels(scan, NAMES, size_bins={"anterior hippocampus": (100.0, 200.0)})
    assert text == "the anterior hippocampus lies anterior and superior; it is medium-sized; one piece"
    assert "it is large" in describe_labels(scan, NAMES, size_bins={"anterior hippocampus": (10.0, 50.0)})
    assert "it is small" in describe_labels(scan, NAMES, size_bins={"anterior hippocampus": (200.0, 300.0)})


def test_pieces_use_full_connectivity_and_absent_labels_are_said():
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[9, 9, 9] = arr[10, 10, 10] = 1  # corner contact: one piece
    arr[2, 2, 2] = 1  # a separate piece
    facts = label_facts(Scan.from_spatial(arr), {1: "lesion", 2: "core"})
    assert facts[0].pieces == 2 and not facts[1].present
    assert describe_labels(Scan.from_spatial(arr), {1: "lesion", 2: "core"}).endswith(
        "two pieces. no core is visible"
    )


def test_picture_words_and_tercile_bins():
    arr = np.zeros((30, 30), np.uint8)
    arr[2:6, 3:7] = 1  # upper left of the picture
    arr[14:16, 20:28] = 2  # middle row, right
    text = describe_labels(Scan.from_spatial(arr), {1: "nucleus", 2: "gland"})
    assert (
        text
        == "the nucleus lies in the upper left part; one piece. the gland lies in the right part; one piece"
    )
    assert tercile_bins({"a": [1.0, 2.0, 3.0, 4.0]}) == {"a": (2.0, 3.0)}  # numpy linear quantiles of 1..4


def test_multichannel_label_map_is_refused():
    with pytest.raises(MedsightError, match="one channel"):
        describe_labels(Scan(np.zeros((2, 4, 4))), NAMES)


def test_one_slice_of_a_volume_kept_3d_uses_patient_words():
    # an axial slice passed as a 3D scan with one slice keeps its affine, hence RAS words
    vol = _ras_phantom()
    one = Scan(vol.array[:, :, :, 9:10], vol.affine.copy())
    one.affine[:3, 3] += 9 * vol.affine[:3, 2]  # slice 9 becomes voxel 0: origin moves with it
    assert describe_labels(one, NAMES) == "the anterior hippocampus lies on the right side; one piece"
