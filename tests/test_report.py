"""Overlay pictures, training curves and the HTML report (no browser needed)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsight import io
from medsight.errors import MedsightError
from medsight.scan import Scan


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(int)


def _count_colour(rgb: np.ndarray, colour: str) -> int:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if colour == "green":
        return int(((g > 150) & (r < 100) & (b < 100)).sum())
    return int(((r > 150) & (g < 100) & (b < 100)).sum())


def _disc(shape, centre, radius) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (np.linalg.norm(grid - centre, axis=-1) < radius).astype(np.uint8)


def test_overlay_2d_grey_size_and_contours(tmp_path):
    from medsight.report.overlay import overlay_png

    rng = np.random.default_rng(0)
    image = Scan.from_spatial(rng.normal(100, 20, (64, 80)))
    label = Scan.from_spatial(_disc((64, 80), (30, 40), 12))
    pred = Scan.from_spatial(_disc((64, 80), (34, 44), 12))
    out = overlay_png(image, tmp_path / "o.png", label=label, prediction=pred, title="case 1")
    rgb = _rgb(out)
    assert rgb.shape[:2] == (500, 500)  # one 5-inch panel at 100 dpi
    assert rgb.std() > 10  # not blank
    assert _count_colour(rgb, "green") > 50 and _count_colour(rgb, "red") > 50

    with pytest.raises(MedsightError, match="already exists"):
        overlay_png(image, out)
    overlay_png(image, out, overwrite=True)  # no label: still a picture
    assert _count_colour(_rgb(out), "green") < _count_colour(rgb, "green")


def test_overlay_2d_rgb_keeps_colour(tmp_path):
    from medsight.report.overlay import overlay_png

    arr = np.zeros((3, 40, 40), np.uint8)
    arr[2] = 200  # a blue picture
    out = overlay_png(Scan(arr), tmp_path / "rgb.png")
    rgb = _rgb(out)
    blue = (rgb[..., 2] > 150) & (rgb[..., 0] < 60) & (rgb[..., 1] < 60)
    assert blue.sum() > 10000


def test_overlay_volume_three_views(tmp_path):
    from medsight.report.overlay import overlay_png

    shape = (40, 48, 12)
    affine = Scan.affine_from_spacing((1.0, 1.0, 4.0))
    image = Scan.from_spatial(np.random.default_rng(2).random(shape), affine)
    label = Scan.from_spatial(_disc(shape, (20, 24, 6), 6), affine)
    pred = Scan.from_spatial(np.zeros(shape, np.uint8), affine)
    out = overlay_png(image, tmp_path / "v.png", label=label, prediction=pred)
    rgb = _rgb(out)
    assert rgb.shape[:2] == (500, 1500)  # three panels side by side
    green_per_panel = [_count_colour(rgb[:, i * 500 : (i + 1) * 500], "green") for i in range(3)]
    assert all(n > 20 for n in green_per_panel), green_per_panel  # every view cuts through the label
    assert (
        _count_colour(rgb[:, :1300], "red") == 0
    )  # empty prediction: no red contour (legend sits bottom right)

    # an axial slice far from the label: no green in the axial panel
    overlay_png(image, tmp_path / "s.png", label=label, slice_index=0)
    assert _count_colour(_rgb(tmp_path / "s.png")[:, :500], "green") == 0


def test_overlay_shape_mismatch_is_an_error(tmp_path):
    from medsight.report.overlay import overlay_png

    with pytest.raises(MedsightError, match="shape"):
        overlay_png(
            Scan.from_spatial(np.zeros((10, 10))),
            tmp_path / "x.png",
            label=Scan.from_spatial(np.zeros((9, 10))),
        )
    assert not (tmp_path / "x.png").exists()


def test_canonical_view_follows_the_affine():
    from medsight.report.overlay import _canonical

    # LPS-like affine: voxel axis 0 runs to the patient's left, axis 1 to posterior, axis 2 superior
    affine = np.diag([-1.0, -2.0, 3.0, 1.0])
    arr = np.zeros((4, 5, 6))
    arr[0, 0, 0] = 1  # the most right, most anterior, most inferior voxel
    canon, spacing, _ = _canonical(Scan.from_spatial(arr, affine))
    assert canon.shape == (1, 4, 5, 6)
    assert canon[0, 3, 4, 0] == 1  # RAS: largest x (right) and y (anterior), smallest z
    assert spacing == (1.0, 2.0, 3.0)

    # axes permuted: voxel axis 0 is superior, 1 is right, 2 is anterior
    perm = np.zeros((4, 4))
    perm[2, 0], perm[0, 1], perm[1, 2], perm[3, 3] = 5.0, 1.0, 2.0, 1.0
    canon, spacing, _ = _canonical(Scan.from_spatial(np.zeros((7, 8, 9)), perm))
    assert canon.shape == (1, 8, 9, 7) and spacing == (1.0, 2.0, 5.0)


def test_plot_curves(tmp_path):
    from medsight.report.curves import plot_curves

    history = [{"epoch": e, "train_loss": 1 / (e + 1), "val_dice": e / 10, "note": "x"} for e in range(5)]
    out = plot_curves(history, tmp_path / "curves.png")
    rgb = _rgb(out)
    assert rgb.shape[:2] == (400, 1000) and rgb.std() > 5
    with pytest.raises(MedsightError):
        plot_curves(history, out)


# -- HTML report -------------------------------------------------------------------------------
AFFINE = Scan.affine_from_spacing((1.0, 1.0, 2.0))


def _save(folder: Path, name: str, arr: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    io.write(Scan.from_spatial(arr, AFFINE), folder / name)


@pytest.fixture
def evaluated(tmp_path):
    from medsight.evaluate import evaluate_folders

    shape = (24, 24, 10)
    pred, ref, images = tmp_path / "pred", tmp_path / "ref", tmp_path / "images"
    for n, shift in enumerate([0, 2, 5]):
        case = f"case{n}"
        _save(ref, f"{case}.nii.gz", _disc(shape, (12, 12, 5), 6))
        _save(pred, f"{case}.nii.gz", _disc(shape, (12 + shift, 12, 5), 6))
        _save(images, f"{case}_0000.nii.gz", np.random.default_rng(n).random(shape).astype(np.float32))
    return evaluate_folders(pred, ref, progress=False), images


def test_report_with_images(evaluated, tmp_path):
    from medsight.report.html import write_report

    result, images = evaluated
    page = write_report(result, tmp_path / "out", images_dir=images, n_cases=1)
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count("<table") == 2
    assert "hd95_mm" in text and "case1" in text
    sources = re.findall(r'<img src="([^"]+)"', text)
    # case2 (shift 5) is the worst by Dice, case0 (perfect) the best
    assert sources == ["overlays/case2.png", "overlays/case0.png"]
    for src in sources:
        assert (page.parent / src).stat().st_size > 1000
    assert "No images were given" not in text

    with pytest.raises(MedsightError, match="already exists"):
        write_report(result, tmp_path / "out", images_dir=images, n_cases=1)
    write_report(result, tmp_path / "out", images_dir=images, n_cases=1, overwrite=True)


def test_report_without_images_says_so(evaluated, tmp_path):
    from medsight.report.html import write_report

    result, _ = evaluated
    page = write_report(result, tmp_path / "plain", n_cases=5)
    text = page.read_text()
    assert "No images were given" in text
    assert len(re.findall(r'<img src="overlays/case\d\.png"', text)) == 3  # each case once


def test_cli_evaluate_and_overlay(evaluated, tmp_path):
    from typer.testing import CliRunner

    from medsight.cli.main import app

    result, images = evaluated
    out = tmp_path / "cli"
    run = CliRunner().invoke(
        app,
        ["evaluate", "--pred", str(result.pred_dir), "--ref", str(result.ref_dir), "--images", str(images)]
        + ["-o", str(out), "--tolerance", "2"],
    )
    assert run.exit_code == 0, run.output
    assert "dice" in run.output
    assert {p.name for p in out.iterdir()} >= {"metrics.csv", "summary.json", "summary.md", "report.html"}

    png = tmp_path / "ov.png"
    run = CliRunner().invoke(
        app,
        ["overlay", str(images / "case1_0000.nii.gz"), "--label", str(result.ref_dir / "case1.nii.gz")]
        + ["--pred", str(result.pred_dir / "case1.nii.gz"), "-o", str(png)],
    )
    assert run.exit_code == 0, run.output
    assert _rgb(png).shape[:2] == (500, 1500)
