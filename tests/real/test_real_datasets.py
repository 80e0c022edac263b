"""Dataset layouts and the fingerprint on the real datasets in ../shared/data (skipped without it).

tcia-pgbm-001 (a DICOM study) is covered by tests/test_dicom_study.py and tests/real/test_real_io.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medsight.datasets import fingerprint, open_dataset, split_dataset

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available"),
]


def test_hippocampus_msd():
    root = DATA / "hippocampus"
    ds = open_dataset(root)
    assert ds.layout == "msd" and ds.dim == 3
    training = json.loads((root / "dataset.json").read_text())["training"]
    listed = {Path(e["image"]).name.removesuffix(".nii.gz") for e in training}
    assert len(ds.cases) == 200 and set(ds.case_ids) == listed
    assert ds.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    facts = fingerprint(ds, max_cases=10, progress=False)
    assert facts["problems"] == []
    assert {v["value"] for v in facts["label_values"]} == {0, 1, 2}
    assert facts["spacings"]["median"] == pytest.approx([1.0, 1.0, 1.0], abs=0.05)
    train, val = split_dataset(ds, val_fraction=0.2, seed=0)
    assert len(val) == 40 and len(train) == 160 and (train, val) == split_dataset(ds, 0.2, 0)


def test_monuseg_lvit():
    root = DATA / "monuseg"
    ds = open_dataset(root)
    assert ds.layout == "lvit" and ds.dim == 2
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 24, "val": 6}
    sheet = pd.read_excel(root / "Train_Folder" / "Train_text.xlsx")
    by_name = dict(zip(sheet["Image"], sheet["Description"], strict=True))
    for case in ds.cases:
        if case.split == "train":
            assert case.text == by_name[case.images[0].name]
    facts = fingerprint(ds, max_cases=3, progress=False)
    assert facts["texts"]["with_text"] == 30
    assert {v["value"] for v in facts["label_values"]} == {0, 255}  # raw, as stored
    assert facts["problems"] == []
    image, label = ds.load_case(ds.cases[0])
    assert image.array.shape == (3, 1000, 1000)
    assert set(np.unique(label.array).tolist()) == {0, 1}  # 255 -> 1
    assert split_dataset(ds)[1] == sorted(ds.splits["val"])


def test_brats2015_case_folders():
    ds = open_dataset(DATA / "brats2015")
    assert ds.layout == "case-folders"
    assert len(ds.cases) == 4 and set(ds.splits) == {"train", "val"}
    assert [n.split("_")[0] for n in ds.channel_names] == ["Flair", "T1c"]
    assert all(case.label.name == "OTMultiClass.nii.gz" for case in ds.cases)
    facts = fingerprint(ds, max_cases=1, progress=False)
    assert facts["shapes"]["unique"] == [{"shape": [240, 240, 155], "cases": 1}]
    assert {v["value"] for v in facts["label_values"]} <= {0, 1, 2, 3, 4}
    assert facts["problems"] == []


def test_cli_inspect_real_monuseg():
    result = subprocess.run(
        [sys.executable, "-m", "medsight.cli.main", "data", "inspect", str(DATA / "monuseg"), "--max-cases", "2",
         "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "lvit" in result.stdout and "train 24, val 6" in result.stdout
