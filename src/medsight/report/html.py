"""A one-page HTML report of an evaluation: summary, per-case table, overlays of best and worst cases.

The page has inline CSS and no scripts; the overlay PNGs sit in ``overlays/`` beside ``report.html``
and are referenced relatively, so the folder can be moved or zipped as a whole.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from medsight.errors import MedsightError
from medsight.evaluate import EvaluationResult

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f3f7; } td.text, th.text { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
.meta { color: #555; font-size: 0.9em; } .note { background: #fff7e0; border-left: 4px solid #f0b400; padding: 0.5em 1em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ccc; }
figcaption { font-size: 0.9em; color: #444; }
.scroll { max-height: 32em; overflow-y: auto; display: inline-block; }
"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4f}")
    return html.escape(str(value))


def _table(df, text_columns=("case", "label", "metric")) -> str:
    head = "".join(
        f'<th class="{"text" if c in text_columns else ""}">{html.escape(str(c))}</th>' for c in df.columns
    )
    body = []
    for row in df.itertuples(index=False):
        cells = "".join(
            f'<td class="{"text" if c in text_columns else ""}">{_fmt(v)}</td>'
            for c, v in zip(df.columns, row, strict=True)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _find_image(images_dir: Path, case: str) -> Path | None:
    """The image of ``case``: same case id, or nnU-Net's first channel ``<case>_0000``."""
    from medsight.io import FORMATS

    suffixes = [s for fmt in FORMATS.values() for s in fmt.suffixes]
    for stem in (case, f"{case}_0000"):
        for suffix in suffixes:
            if (images_dir / f"{stem}{suffix}").is_file():
                return images_dir / f"{stem}{suffix}"
        if (images_dir / stem).is_dir():
            return images_dir / stem
    return None


def _pick_cases(result: EvaluationResult, n_cases: int) -> list[tuple[str, str, float]]:
    """(case, 'worst'|'best', score), worst first; a case appears once even if it is both."""
    scores = result.case_scores().dropna().sort_values(kind="stable")
    picked: list[tuple[str, str, float]] = []
    for case, score in scores.head(n_cases).items():
        picked.append((str(case), "worst", float(score)))
    taken = {c for c, _, _ in picked}
    for case, score in scores.iloc[::-1].head(n_cases).items():
        if case not in taken:
            picked.append((str(case), "best", float(score)))
    return picked


def write_report(
    result: EvaluationResult,
    out_dir: str | Path,
    images_dir: str | Path | None = None,
    pred_dir: str | Path | None = None,
    ref_dir: str | Path | None = None,
    n_cases: int = 2,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/report.html`` (and ``out_dir/overlays/*.png``); returns the page's path.

    The ``n_cases`` worst and best cases by mean Dice over labels (mean SSIM for image results) get
    an overlay: the image from ``images_dir`` (same case id or ``<case>_0000``) with the reference in
    green and the prediction in red. Without ``images_dir`` the reference label map itself is the
    grey background, and the page says so. ``pred_dir``/``ref_dir`` default to the result's folders.
    """
    from medsight import io

    out_dir = Path(out_dir)
    page = out_dir / "report.html"
    io.check_writable(page, overwrite)
    files = result.files if pred_dir is None and ref_dir is None else _files_in(result, pred_dir, ref_dir)
    images_dir = Path(images_dir) if images_dir is not None else None
    if images_dir is not None and not images_dir.is_dir():
        raise MedsightError("images folder not found", images_dir)

    picked = _pick_cases(result, n_cases)
    roles = ("_reference", "_prediction") if result.kind == "image" else ("",)
    for case, _, _ in picked:  # refuse before drawing anything
        for role in roles:
            io.check_writable(out_dir / f"overlays/{case}{role}.png", overwrite)
    metric = "Dice" if result.kind == "seg" else "SSIM"
    figures, notes = _draw_overlays(result, picked, files, out_dir, images_dir, metric, overwrite)
    if images_dir is None and result.kind == "seg":
        notes.insert(
            0, "No images were given (--images): overlays show the reference label map as background."
        )
    if result.ignored_predictions:
        notes.append(f"Ignored {len(result.ignored_predictions)} prediction(s) without a reference.")
    io.write_text(page, _page(result, figures, notes, metric), overwrite)
    return page


def _files_in(result: EvaluationResult, pred_dir, ref_dir) -> dict[str, dict[str, Path]]:
    """Case -> prediction and reference files found in other folders than the evaluated ones (each
    defaults to the result's); a case missing from either is left out."""
    pred_dir, ref_dir = Path(pred_dir or result.pred_dir), Path(ref_dir or result.ref_dir)
    files = {}
    for case in result.cases["case"].unique():
        found = {k: _find_image(d, case) for k, d in (("pred", pred_dir), ("ref", ref_dir))}
        if None not in found.values():
            files[case] = found
    return files


def _draw_overlays(result, picked, files, out_dir: Path, images_dir, metric: str, overwrite: bool):
    """Draw the picked cases into ``out_dir/overlays``: (figures as (file, caption), notes on what
    could not be drawn as asked)."""
    from medsight import io
    from medsight.report.overlay import grey_window, overlay_png

    figures, notes = [], []
    for case, which, score in picked:
        if case not in files:
            notes.append(f"No files found for case {case}; no overlay.")
            continue
        pred = io.read(files[case]["pred"])
        ref = io.read(files[case]["ref"])
        caption = f"{which} case <b>{html.escape(case)}</b>: mean {metric} {score:.4f}"
        if result.kind == "image":
            window = grey_window(ref.array[0])  # one grey scale for both, so they compare
            for role, scan in (("reference", ref), ("prediction", pred)):
                name = f"overlays/{case}_{role}.png"
                overlay_png(scan, out_dir / name, title=f"{case}: {role}", overwrite=overwrite, window=window)
                figures.append((name, f"{caption} ({role})"))
            continue
        name = f"overlays/{case}.png"
        overlay_png(
            _background(case, ref, images_dir, notes),
            out_dir / name,
            label=ref,
            prediction=pred,
            title=f"{case} ({which})",
            overwrite=overwrite,
        )
        figures.append((name, caption))
    return figures, notes


def _background(case: str, ref, images_dir: Path | None, notes: list[str]):
    """What the contours of ``case`` are drawn on: its image, or the reference label map (noting why)
    when there is no image of the label's shape."""
    from medsight import io

    image_path = _find_image(images_dir, case) if images_dir is not None else None
    if image_path is None:
        if images_dir is not None:
            notes.append(f"No image for case {case} in {images_dir}; label map shown instead.")
        return ref
    image = io.read(image_path)
    if image.spatial_shape != ref.spatial_shape:
        notes.append(f"Image of {case} has another shape than its label; label map shown instead.")
        return ref
    return image


def _page(result: EvaluationResult, figures, notes: list[str], metric: str) -> str:
    """The HTML of the report: summary, notes, overlays and the per-case table."""
    cases = result.cases
    meta = [
        f"{cases['case'].nunique()} cases",
        f"predictions: {html.escape(str(result.pred_dir))}",
        f"references: {html.escape(str(result.ref_dir))}",
    ]
    if result.kind == "seg":
        meta.append(f"NSD tolerance {result.tolerance_mm} mm; distances in mm")
    conventions = result.summary_dict()["conventions"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>medsight evaluation ({result.kind})</title><style>{CSS}</style></head><body>",
        f"<h1>medsight evaluation ({'segmentation' if result.kind == 'seg' else 'image quality'})</h1>",
        f'<p class="meta">{" &middot; ".join(meta)}</p>',
        *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
        "<h2>Summary</h2>",
        _table(result.summary),
        f'<p class="meta">Conventions: {html.escape(conventions)}.</p>',
        f"<h2>Worst and best cases (by mean {metric})</h2>",
        *(
            f'<figure><img src="{html.escape(name)}" alt="overlay {html.escape(name)}">'
            f"<figcaption>{cap}</figcaption></figure>"
            for name, cap in figures
        ),
        "<h2>Per case</h2>",
        f'<div class="scroll">{_table(cases)}</div>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
