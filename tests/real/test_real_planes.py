"""Anatomy-oriented views on real scans from ../shared/data (skipped without it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsight import io
from medsight.errors import MedsightError
from medsight.transforms.planes import (
    anatomical_frame,
    angle_error_deg,
    intersection_line,
    line_from_heatmap,
    sample_views,
    views_from_dicom_study,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available"),
]


def test_hippocampus_views_lie_in_the_crop_and_their_targets_match_the_geometry():
    images = sorted((DATA / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:4]
    rng = np.random.default_rng(0)
    for path in images:
        scan = io.read(path)
        frame = anatomical_frame(scan, cross_axes="world")
        # the crops are longest along their second voxel axis (about 51 of 35 x 51 x 35 mm): anterior-posterior,
        # clearly so (the two smaller spreads are often within 10 %, hence the world cross axes)
        assert abs(frame.axes[0][1]) > 0.8 and frame.sd[0] > 1.1 * frame.sd[1]
        assert frame.axes[1][0] > 0.9  # right
        views = sample_views(scan, rng, 8, 2, (40, 40), 1.0, 10.0, 3.0, sigma_px=2.0, frame=frame)
        assert (views.stack_images != 0).mean() > 0.6  # mostly inside the crop, not padding
        for s in (0, 4, 7):
            for k in range(2):
                true = intersection_line(views.stack_planes[s], views.long_planes[k])
                assert angle_error_deg(line_from_heatmap(views.heatmaps[s, k]), true) < 1.0


def test_the_tcia_study_has_no_oblique_series_and_is_refused_in_one_line():
    study = DATA / "tcia-pgbm-001"
    with pytest.raises(MedsightError, match="parallel") as err:
        views_from_dicom_study([study / "T1post", study / "FLAIR", study / "MaskTumor"])
    assert "\n" not in str(err.value)
