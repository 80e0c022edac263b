"""The task registry (which task wrote a checkpoint, and its predictor) and the reader registry."""

from __future__ import annotations

import numpy as np
import pytest

from medsight import MedsightError, Scan, io
from medsight.io import registry as formats
from medsight.tasks.registry import TASKS, get_task, register_task, task_of


def test_task_recorded_or_inferred_for_older_checkpoints():
    assert task_of({"task": "segmentation", "model": {"kind": "fewshot-2d"}}) == "segmentation"
    # written before checkpoints recorded their task: as the trainers left them
    assert task_of({"method": "textseg", "model": {"name": "lvit"}}) == "textseg"
    assert task_of({"model": {"name": "fewshot-prototype", "kind": "fewshot-2d"}}) == "fewshot"
    assert task_of({"model": {"name": "unet3d", "kind": "3d"}}) == "segmentation"
    with pytest.raises(MedsightError, match="unknown task 'superres'"):
        get_task("superres")


def test_a_registered_task_gets_its_predictor(tmp_path, monkeypatch):
    import torch

    from medsight.engine import checkpoint
    from medsight.tasks.registry import load_predictor

    monkeypatch.setitem(TASKS, "echo", TASKS["segmentation"])  # restored after the test
    register_task("echo", None, lambda path, **options: ("echo", path, options))
    payload = {"task": "echo", "model": {"name": "x"}, "state_dict": {}, "labels": {}, "preprocessing": {}}
    checkpoint.save(tmp_path / "echo.pt", payload)
    assert load_predictor(tmp_path / "echo.pt", device="cpu") == (
        "echo",
        tmp_path / "echo.pt",
        {"device": "cpu"},
    )
    assert torch.load(tmp_path / "echo.pt", weights_only=False)["task"] == "echo"


def test_a_registered_reader_is_chosen_by_suffix(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "FORMATS", dict(formats.FORMATS))
    seen = []

    def reader(path, **options):
        seen.append(path)
        return Scan(np.ones((1, 2, 3, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))

    formats.register((".toy",), reader, name="toy")
    (tmp_path / "a.toy").write_bytes(b"x")
    scan = io.read(tmp_path / "a.toy")
    assert seen == [tmp_path / "a.toy"] and scan.spatial_shape == (2, 3, 4) and scan.meta["format"] == "toy"
    with pytest.raises(MedsightError, match="cannot write this format"):
        io.write(scan, tmp_path / "b.toy")
    with pytest.raises(ValueError, match=r"taken: \.nii\.gz \(nifti\)"):
        formats.register((".nii.gz",), reader)
