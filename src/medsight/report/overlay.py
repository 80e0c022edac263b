"""Overlay pictures: does the mask lie on the structure?

A 2D image gives one panel (RGB shown as RGB). A volume gives three orthogonal views (axial,
coronal, sagittal) through one point: the centre of the reference label, else of the prediction,
else of the volume. Volumes are shown in the scan's closest RAS orientation, radiological
convention (patient's right on the left of the picture), anterior/superior up, with each pixel drawn
at its physical size (sagittal: anterior to the right). Reference contours are green, prediction
contours red and dashed (so a perfect prediction still shows both). The image is windowed to its
1st-99th percentile (first channel of a multi-channel volume), leaving out a flat background (the
corner voxel's value, when it fills over a quarter of the picture).

The picture size is fixed so that reports line up: ``PANEL_INCHES`` per panel at ``DPI``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsight.scan import Scan

__all__ = ["check_png_name", "figure_size_px", "grey_window", "overlay_png"]

DPI = 100
PANEL_INCHES = 5.0
REFERENCE_COLOUR = "#00d000"
PREDICTION_COLOUR = "#ff2020"


def figure_size_px(ndim: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG ``overlay_png`` writes for a 2D or 3D scan."""
    panels = 1 if ndim == 2 else 3
    return int(PANEL_INCHES * panels * DPI), int(PANEL_INCHES * DPI)


def check_png_name(path: str | Path) -> Path:
    """Refuse any name but ``*.png``: the picture is always a PNG (lossless, so thin contours stay
    sharp), and PNG bytes under a .jpg name would mislead every program that opens it."""
    from medsight.errors import MedsightError
    from medsight.io import suffix_of

    path = Path(path)
    if suffix_of(path) != ".png":
        raise MedsightError("overlays are written as PNG; give the output a .png name", path)
    return path


def _check_slice(image: Scan, slice_index: int | tuple[int, int, int]) -> None:
    """An index outside the scan would be clipped to its edge: a picture of another slice than asked."""
    import nibabel as nib

    from medsight.errors import MedsightError

    if image.ndim == 2:
        raise MedsightError("a 2D image has no slices to choose from", image.path)
    if isinstance(slice_index, int):
        axial_axis = int(np.flatnonzero(nib.orientations.io_orientation(image.affine)[:, 0] == 2)[0])
        n = image.spatial_shape[axial_axis]
        if not 0 <= slice_index < n:
            raise MedsightError(
                f"slice {slice_index} is out of range: the scan has {n} axial slices, 0 to {n - 1}",
                image.path,
            )
        return
    shape = list(image.spatial_shape)
    if len(slice_index) != 3 or not all(0 <= i < n for i, n in zip(slice_index, shape, strict=True)):
        raise MedsightError(
            f"voxel {list(slice_index)} is outside the scan (shape {shape}, indices from 0)", image.path
        )


def _canonical(scan: Scan) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Array (C, x, y, z) turned to the closest RAS axes, its spacing, and the orientation used."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(scan.affine)
    to_ras = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    arr = np.stack([nib.orientations.apply_orientation(ch, to_ras) for ch in scan.array])
    spacing = [0.0, 0.0, 0.0]
    for axis, s in enumerate(scan.spacing):
        spacing[int(ornt[axis, 0])] = s
    return arr, (spacing[0], spacing[1], spacing[2]), ornt


def _to_canonical_index(index: tuple[int, int, int], shape, ornt: np.ndarray) -> tuple[int, int, int]:
    out = [0, 0, 0]
    for axis, i in enumerate(index):
        world_axis, sign = int(ornt[axis, 0]), ornt[axis, 1]
        out[world_axis] = int(i) if sign > 0 else int(shape[axis]) - 1 - int(i)
    return out[0], out[1], out[2]


def grey_window(arr: np.ndarray) -> tuple[float, float]:
    """(low, high) grey levels: the 1st and 99th percentiles, a flat background left out."""
    values = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr.ravel()
    if values.size == 0:
        return 0.0, 1.0
    background = values == values.flat[0]  # a corner voxel: air, or the zero outside a skull-stripped brain
    if 0.25 < background.mean() < 1:  # a large flat background would squeeze the window onto it
        values = values[~background]
    lo, hi = np.percentile(values, [1, 99])
    if hi <= lo:  # a mostly-constant picture, e.g. a small label map: fall back to the full range
        lo, hi = float(values.min()), float(values.max())
    return float(lo), float(hi if hi > lo else lo + 1)


def _centre(volumes: list[np.ndarray | None], shape) -> tuple[int, int, int]:
    for vol in volumes:
        if vol is not None and np.any(vol):
            return tuple(int(round(c)) for c in np.argwhere(vol).mean(axis=0))  # type: ignore[return-value]
    return tuple(n // 2 for n in shape)  # type: ignore[return-value]


def _draw_contours(ax, mask2d: np.ndarray | None, colour: str, dashed: bool = False) -> None:
    """Outline every label value of a 2D label map (drawn in display orientation)."""
    if mask2d is None:
        return
    for value in np.unique(mask2d):
        if value == 0:
            continue
        binary = (mask2d == value).astype(float)
        if binary.min() == binary.max():
            continue
        ax.contour(
            binary, levels=[0.5], colors=[colour], linewidths=1.2, linestyles="dashed" if dashed else "solid"
        )


def _show_rgb(arr: np.ndarray) -> np.ndarray:
    rgb = np.moveaxis(arr, 0, -1)
    if rgb.dtype == np.uint8:
        return rgb
    lo, hi = grey_window(rgb)
    return np.clip((rgb.astype(np.float64) - lo) / (hi - lo), 0, 1)


def _label_array(scan: Scan | None, image: Scan, what: str) -> np.ndarray | None:
    """The label's first channel on the image's grid (resampled when its affine differs)."""
    from medsight.scan import align_to

    if scan is None:
        return None
    return align_to(scan, image, what).array[0]


def overlay_png(
    image: Scan,
    path: str | Path,
    label: Scan | None = None,
    prediction: Scan | None = None,
    slice_index: int | tuple[int, int, int] | None = None,
    title: str | None = None,
    overwrite: bool = False,
    window: tuple[float, float] | None = None,
) -> Path:
    """Write a PNG of ``image`` with reference (green) and prediction (red) contours.

    ``slice_index`` (volumes only): an int picks the axial slice, as an index along the scan's own
    voxel axis closest to superior-inferior; a voxel ``(i, j, k)`` picks the crossing point of all
    three views. Label and prediction are put on the image's grid (:func:`medsight.scan.align_to`). ``window`` (low, high) replaces
    the percentile window, e.g. to show a prediction and its reference image on the same scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from medsight.io import atomic_path

    path = check_png_name(path)
    if slice_index is not None:
        _check_slice(image, slice_index)
    ref_arr = _label_array(label, image, "label")
    pred_arr = _label_array(prediction, image, "prediction")
    width, height = figure_size_px(image.ndim)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    try:
        if image.ndim == 2:
            ax = fig.add_subplot(1, 1, 1)
            sy, sx = image.spacing[:2]  # rows, columns
            if image.channels == 3:
                ax.imshow(_show_rgb(image.array), aspect=sy / sx, interpolation="nearest")
            else:
                lo, hi = window or grey_window(image.array[0])
                ax.imshow(
                    image.array[0], cmap="gray", vmin=lo, vmax=hi, aspect=sy / sx, interpolation="nearest"
                )
            _draw_contours(ax, ref_arr, REFERENCE_COLOUR)
            _draw_contours(ax, pred_arr, PREDICTION_COLOUR, dashed=True)
            ax.set_axis_off()
        else:
            _three_views(fig, image, ref_arr, pred_arr, slice_index, window)
        handles = []
        if ref_arr is not None:
            handles.append(Line2D([], [], color=REFERENCE_COLOUR, lw=2, label="reference"))
        if pred_arr is not None:
            handles.append(Line2D([], [], color=PREDICTION_COLOUR, lw=2, ls="--", label="prediction"))
        if handles:
            fig.legend(handles=handles, loc="lower right", fontsize=9, framealpha=0.8)
        if title:
            fig.suptitle(title, fontsize=11)
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86 if title else 0.92, wspace=0.04)
        with atomic_path(path, overwrite) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return path


def _three_views(fig, image: Scan, ref_arr, pred_arr, slice_index, window):
    """Axial, coronal and sagittal panels through one point, in RAS, radiological convention."""
    stack = [image.array[:1]] + [a[None] for a in (ref_arr, pred_arr) if a is not None]
    canon, spacing, ornt = _canonical(Scan(np.concatenate(stack).astype(np.float32), image.affine))
    img = canon[0]
    ref_c = canon[1] if ref_arr is not None else None
    pred_c = canon[1 + (ref_arr is not None)] if pred_arr is not None else None
    centre = list(_centre([ref_c, pred_c], img.shape))
    if isinstance(slice_index, int):
        axial_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
        point = [0, 0, 0]
        point[axial_axis] = slice_index
        centre[2] = _to_canonical_index(tuple(point), image.spatial_shape, ornt)[2]
    elif slice_index is not None:
        centre = list(_to_canonical_index(tuple(slice_index), image.spatial_shape, ornt))
    centre = [int(np.clip(c, 0, n - 1)) for c, n in zip(centre, img.shape, strict=True)]
    lo, hi = window or grey_window(img)
    sx, sy, sz = spacing
    x, y, z = centre
    views = [
        # name, picker, horizontal spacing, vertical spacing
        ("axial", lambda a: a[:, :, z], sx, sy, f"z={z}"),
        ("coronal", lambda a: a[:, y, :], sx, sz, f"y={y}"),
        ("sagittal", lambda a: a[x, :, :], sy, sz, f"x={x}"),
    ]
    for n, (name, pick, h_sp, v_sp, where) in enumerate(views):
        ax = fig.add_subplot(1, 3, n + 1)
        # transpose: first remaining axis runs left-right, second bottom-up (origin lower)
        ax.imshow(pick(img).T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=v_sp / h_sp)
        for arr, colour in ((ref_c, REFERENCE_COLOUR), (pred_c, PREDICTION_COLOUR)):
            if arr is not None:
                _draw_contours(
                    ax, np.rint(pick(arr)).astype(np.int64).T, colour, dashed=colour == PREDICTION_COLOUR
                )
        if name != "sagittal":
            ax.invert_xaxis()  # radiological: patient's right on the picture's left
        ax.set_title(f"{name} ({where})", fontsize=9)
        ax.set_axis_off()
