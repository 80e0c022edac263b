"""DICOM study layout: series folders as channels and label, on synthetic series and the real TCIA study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_factory import write_series
from medsight.datasets import detect_layout, fingerprint, open_dataset

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _study(root: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    write_series(root / "T1", rng.integers(0, 500, (4, 6, 5)))
    write_series(root / "FLAIR", rng.integers(0, 500, (4, 6, 5)))
    mask = np.zeros((4, 6, 5), int)
    mask[1:3, 2:4, 2:4] = 1
    write_series(root / "seg", mask)


def test_one_study_is_one_case_with_two_channels(tmp_path):
    _study(tmp_path / "patient1", 0)
    assert detect_layout(tmp_path / "patient1") == "dicom-study"
    ds = open_dataset(tmp_path / "patient1")
    assert ds.channel_names == ["FLAIR", "T1"] and len(ds) == 1
    image, label = ds.load_case(ds.cases[0])
    assert image.channels == 2 and image.spatial_shape == (5, 6, 4)
    assert int(label.array.sum()) == 2 * 2 * 2


def test_folder_of_studies_gives_one_case_each(tmp_path):
    for i in range(3):
        _study(tmp_path / f"patient{i}", i)
    ds = open_dataset(tmp_path)
    assert ds.layout == "dicom-study" and ds.case_ids == ["patient0", "patient1", "patient2"]
    facts = fingerprint(ds, progress=False)
    assert {r["value"]: r["voxels"] for r in facts["label_values"]}[1] == 3 * 8 and not facts["problems"]


@pytest.mark.skipif(not (DATA / "tcia-pgbm-001").is_dir(), reason="../shared/data is not available")
def test_real_tcia_study():
    ds = open_dataset(DATA / "tcia-pgbm-001")
    # channels are named by SeriesDescription (the FLAIR folder's series says "FLAIR_reg")
    assert ds.layout == "dicom-study" and ds.channel_names == ["FLAIR_reg", "T1post"]
    assert ds.cases[0].label.name == "MaskTumor"
    facts = fingerprint(ds, progress=False)
    assert facts["cases"] == 1 and not facts["problems"]
    assert [r["value"] for r in facts["label_values"]] == [0, 1]
