"""`medsight demo` end to end on a tiny budget, and --overwrite touching only what the demo wrote."""

from __future__ import annotations

import pytest

from medsight import MedsightError
from medsight.demo import run_demo


def test_demo_writes_report_and_overwrite_spares_other_files(tmp_path):
    out = tmp_path / "demo"
    page = run_demo(out, cases=5, epochs=1, steps_per_epoch=2)
    assert page == out / "evaluation" / "report.html" and "<table" in page.read_text()
    assert len(list((out / "predictions").glob("*.nii.gz"))) == 1  # 20% of 5 cases validate
    with pytest.raises(MedsightError, match="pass --overwrite"):
        run_demo(out, cases=5, epochs=1, steps_per_epoch=2)
    (out / "notes.txt").write_text("mine")
    run_demo(out, cases=5, epochs=1, steps_per_epoch=2, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "evaluation" / "report.html").exists()
