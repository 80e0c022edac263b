"""Super-resolution comparison figure: low-res | interpolated | plain | semantic | high-res crops side by
side, with their absolute-error maps underneath (one colour scale for every map), and a small HTML page
linking it with the PSNR/SSIM of each panel."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from medsight.scan import Scan

CROP = 96  # pixels of the high-resolution grid shown per panel


def _on_grid(scan: Scan, shape: tuple[int, ...]) -> np.ndarray:
    """``(C, *shape)``: a coarser scan repeated (nearest) onto the fine grid, as a viewer shows it."""
    arr = scan.array
    for axis, (n, m) in enumerate(zip(scan.spatial_shape, shape, strict=True)):
        arr = np.repeat(arr, max(m // n, 1), axis=axis + 1)
    return arr[(slice(None),) + tuple(slice(0, m) for m in shape)]


def _cut(arr: np.ndarray, index: int | None, window: tuple[slice, slice]) -> np.ndarray:
    """A 2D (H, W[, C]) picture: the coronal plane ``index`` of a volume (it holds the slice axis, so
    thick-slice blur shows), cropped to ``window``."""
    plane = arr if index is None else arr[:, :, index]
    plane = plane[(slice(None),) + window]
    return (
        np.rot90(np.moveaxis(plane, 0, -1)).squeeze(-1)
        if plane.shape[0] == 1
        else np.rot90(np.moveaxis(plane, 0, -1))
    )


def _view(high: Scan, mask: np.ndarray | None) -> tuple[int | None, tuple[slice, slice]]:
    fg = mask if mask is not None and mask.any() else np.ones(high.spatial_shape, bool)
    index = None
    if high.ndim == 3:
        index = int(np.argmax(fg.sum(axis=(0, 2))))
        fg = fg[:, index]
    centre = [int(np.mean(np.nonzero(fg)[a])) for a in range(2)]
    window = []
    for c, n in zip(centre, fg.shape, strict=True):
        start = int(np.clip(c - CROP // 2, 0, max(n - CROP, 0)))
        window.append(slice(start, start + CROP))
    return index, tuple(window)


def comparison_png(
    low: Scan, panels: dict[str, Scan], high: Scan, path: str | Path, mask=None, title: str = ""
) -> Path:
    """Write the figure: ``panels`` (name -> scan on the fine grid) between the low-res input and the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    index, window = _view(high, mask)
    ref = high.array.astype(np.float32)
    lo, hi = np.percentile(ref, (0.5, 99.5))
    shown = {"low-res": _on_grid(low, high.spatial_shape), **{k: v.array for k, v in panels.items()}}
    shown["high-res"] = ref
    errors = {
        k: np.abs(v.astype(np.float32) - ref) for k, v in shown.items() if k not in ("low-res", "high-res")
    }
    emax = max((float(np.percentile(e, 99.5)) for e in errors.values()), default=1.0) or 1.0
    fig, axes = plt.subplots(2, len(shown), figsize=(2.4 * len(shown), 5.0), squeeze=False)
    for col, (name, arr) in enumerate(shown.items()):
        picture = np.clip((_cut(arr, index, window) - lo) / max(hi - lo, 1e-6), 0, 1)
        axes[0, col].imshow(picture, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[0, col].set_title(name, fontsize=9)
        if name in errors:
            err = _cut(errors[name], index, window)
            err = err.mean(axis=-1) if err.ndim == 3 else err
            im = axes[1, col].imshow(err, cmap="magma", vmin=0, vmax=emax, interpolation="nearest")
            axes[1, col].set_title(f"|error| {name}", fontsize=8)
        for row in (0, 1):
            axes[row, col].axis("off")
    if errors:
        fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8, label="absolute error")
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def compare_report(
    low: Scan, outputs: dict[str, Scan], high: Scan, predictor, out: str | Path, overwrite=False
):
    """``<out>_compare.png`` and ``<out>_compare.html`` for `medsight sr predict --reference`: the
    interpolation and the outputs against the reference, with PSNR/SSIM over the image."""
    from medsight.errors import MedsightError
    from medsight.evaluate import image_metrics
    from medsight.io import check_writable, write_text
    from medsight.tasks.sr import interpolate_scan

    out = Path(out)
    stem = out.name.split(".")[0]
    png, page = out.with_name(f"{stem}_compare.png"), out.with_name(f"{stem}_compare.html")
    check_writable(page, overwrite)
    for scan in outputs.values():
        if scan.array.shape != high.array.shape:
            raise MedsightError(
                f"the reference's shape {list(high.spatial_shape)} differs from the output's "
                f"{list(scan.spatial_shape)} (the reference must be the scan the low-res input came from)",
                high.path,
            )
    panels = {"interpolated": interpolate_scan(low, predictor.scale, predictor.mode, predictor.slice_axis)}
    panels.update(outputs)
    channel = 0 if high.channels > 1 else None
    ref = high.array.astype(np.float64) if channel == 0 else high.array[0].astype(np.float64)
    rows = []
    for name, scan in panels.items():
        pred = scan.array.astype(np.float64) if channel == 0 else scan.array[0].astype(np.float64)
        data_range = float(ref.max() - ref.min()) or 1.0
        mse = float(np.mean((pred - ref) ** 2))
        psnr = f"{10 * np.log10(data_range**2 / mse):.2f}" if mse > 0 else "inf"
        try:
            ssim = f"{image_metrics(pred, ref, data_range=data_range, channel_axis=channel)['ssim']:.4f}"
        except ValueError:  # smaller than SSIM's window along an axis
            ssim = "n/a"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{psnr}</td><td>{ssim}</td></tr>")
    comparison_png(low, panels, high, png, title=stem)
    body = (
        f"<html><head><meta charset='utf-8'><title>{html.escape(stem)}: super-resolution</title></head><body>"
        f"<h1>{html.escape(stem)}</h1><table border=1><tr><th>image</th><th>PSNR (dB)</th><th>SSIM</th></tr>"
        + "".join(rows)
        + f"</table><p><img src='{html.escape(png.name)}'></p></body></html>\n"
    )
    write_text(page, body, overwrite=True)
    return page


def figures_page(path: str | Path, title: str, sections: dict[str, Path], table_markdown: str = "") -> Path:
    """An HTML page: the results table (markdown, shown as preformatted text) and one comparison figure
    per section, linked by relative path."""
    from medsight.io import write_text

    path = Path(path)
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    if table_markdown:
        parts.append(f"<pre>{html.escape(table_markdown)}</pre>")
    for name, png in sections.items():
        rel = Path(png).resolve().relative_to(path.parent.resolve())
        parts.append(f"<h2>{html.escape(name)}</h2><p><img src='{html.escape(str(rel))}'></p>")
    parts.append("</body></html>\n")
    return write_text(path, "".join(parts), overwrite=True)
