"""Inference: slide over every slice (2D/2.5D) or a sliding window (3D), then back to the scan's grid.

The network is seen as a function from an input batch to logits, so the same code serves the torch
model and its ONNX export (onnxruntime).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medsight import progress
from medsight.engine import checkpoint
from medsight.engine.preprocess import Preprocessing, as_picture, as_volume, unlike_spacing
from medsight.engine.sampling import from_working, pad_to, round_up, stack, to_working
from medsight.engine.tta import average_over_views, dihedral_views, mirror_views
from medsight.errors import MedsightError
from medsight.scan import Scan, fill_non_finite

Forward = Callable[[np.ndarray], np.ndarray]


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def slice_probabilities(forward: Forward, image: np.ndarray, slices: int, batch: int = 16) -> np.ndarray:
    """image (C, H, W, S) -> class probabilities (K, H, W, S), one forward per slice stack."""
    h, w, depth = image.shape[1:]
    padded = (round_up(h), round_up(w))
    out = None
    for start in progress.bar(range(0, depth, batch), depth, f"segmenting {depth} slices", unit="batch"):
        idx = range(start, min(depth, start + batch))
        x = np.stack([pad_to(stack(image, s, slices), padded) for s in idx]).astype(np.float32)
        p = softmax(forward(x))[:, :, :h, :w]  # (b, K, H, W)
        if out is None:
            out = np.zeros((p.shape[1], h, w, depth), np.float32)
        out[..., start : start + len(idx)] = np.moveaxis(p, 0, -1)
    return out


def _windows(shape, patch, overlap: float) -> int:
    """How many windows MONAI's sliding window visits (its scan interval is patch * (1 - overlap))."""
    steps = [
        1 if size <= p else math.ceil((size - p) / max(int(p * (1 - overlap)), 1)) + 1
        for size, p in zip(shape, patch, strict=True)
    ]
    return math.prod(steps)


def volume_probabilities(forward: Forward, image: np.ndarray, patch: tuple[int, ...]) -> np.ndarray:
    """image (C, X, Y, Z) -> (K, X, Y, Z) by MONAI's Gaussian-weighted sliding window."""
    import torch
    from monai.inferers import sliding_window_inference

    def predictor(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(forward(t.numpy().astype(np.float32))))

    with torch.no_grad():
        logits = sliding_window_inference(
            torch.from_numpy(image[None].astype(np.float32)),
            patch,
            1,
            predictor,
            overlap=0.25,
            mode="gaussian",
            progress=progress.wanted(_windows(image.shape[1:], patch, 0.25)),
        )
    return softmax(logits.numpy(), axis=1)[0]


def probabilities(
    forward: Forward,
    image: np.ndarray,
    kind: str,
    slices: int,
    patch,
    slice_axis: int | Sequence[int],
    mirror_axes=(),
) -> np.ndarray:
    """Preprocessed image (C, X, Y, Z) -> class probabilities (K, X, Y, Z) on the same grid.

    A slice-wise model slides along ``slice_axis``; given several axes (``train --slice-planes 3``), the
    average of the planes' probabilities. With ``mirror_axes`` (spatial axes), the average over every
    combination of mirroring along them, each mapped back: nnU-Net's test-time mirroring, 2**n passes.
    """
    if mirror_axes:
        return average_over_views(
            lambda view: probabilities(forward, view, kind, slices, patch, slice_axis),
            image,
            mirror_views([1 + a for a in mirror_axes]),  # spatial axis a is array axis 1 + a
        )
    if kind == "3d":
        return volume_probabilities(forward, image, tuple(patch))
    axes = [slice_axis] if isinstance(slice_axis, int) else list(slice_axis)
    total = sum(
        from_working(slice_probabilities(forward, to_working(image, a), slices if kind == "2.5d" else 1), a)
        for a in axes
    )
    return total / len(axes)


def largest_components(labels: np.ndarray) -> np.ndarray:
    """Keep, for each class, only its largest connected component (26-connectivity in 3D)."""
    from skimage.measure import label as connected

    out = np.zeros_like(labels)
    for value in np.unique(labels[labels > 0]):
        comp = connected(labels == value, connectivity=labels.ndim)
        if comp.max() == 0:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[comp == sizes.argmax()] = value
    return out


def _require_segmentation(payload: dict, ckpt_path) -> None:
    """Refuse a checkpoint of another task, naming the command that segments with it."""
    from medsight.tasks.registry import get_task, task_of

    task = get_task(task_of(payload), ckpt_path)
    if task.name != "segmentation":
        raise MedsightError(
            f"is {task.what} ({payload['model']['name']}), not a unet2d/context25d/unet3d checkpoint; "
            f"segment with `{task.command}` instead",
            ckpt_path,
        )


def _stored_values(payload: dict, labels: dict[int, str]) -> dict[int, int]:
    """Class value -> the value the training label files stored it as (0/255 pictures stay 0/255),
    so a prediction compares with the dataset's own masks; the lowest stored value when several map
    to one class."""
    mapping = {int(k): int(v) for k, v in payload.get("label_mapping", {}).items()}
    stored: dict[int, int] = {}
    for raw, value in sorted(mapping.items()):
        stored.setdefault(value, raw)
    return {v: stored.get(v, v) for v in labels}


class Predictor:
    """Everything needed to segment a scan, rebuilt from one checkpoint file.

    ``tta`` averages over mirror images along the model's training mirror axes (for a model trained
    on pictures with both axes mirrored, the eight rotations and mirror images it was trained on);
    it is an attribute, so one loaded network can predict both ways.
    """

    def __init__(
        self,
        ckpt_path: str | Path,
        backend: str = "torch",
        onnx_path: str | Path | None = None,
        tta: bool = False,
        device: str = "auto",
        precision: str = "auto",
    ):
        from medsight.engine.loop import resolve_device, resolve_precision

        self.device = resolve_device(device) if backend == "torch" else None
        self.precision = resolve_precision(precision, self.device) if self.device is not None else "32-true"
        payload = checkpoint.load(ckpt_path)
        self.path = Path(ckpt_path)
        _require_segmentation(payload, ckpt_path)
        # Test-time mirroring only along the axes the model was trained to see mirrored: along any
        # other (left/right of a lateralised label set) the mirror image would get the wrong names.
        self.mirror_axes = tuple(payload.get("mirror_axes", ()))
        if tta and not self.mirror_axes:
            raise MedsightError(
                "test-time mirroring needs a model trained with mirroring (train --mirror-axes)", ckpt_path
            )
        self.tta = bool(tta)
        self.model_info = payload["model"]
        self.kind = self.model_info["kind"]
        self.slices = int(self.model_info.get("slices", 1))
        self.patch = tuple(payload["patch"])
        self.labels: dict[int, str] = {int(k): v for k, v in payload["labels"].items()}
        self.stored_values = _stored_values(payload, self.labels)
        self.pre = Preprocessing.from_dict(payload["preprocessing"])
        self.slice_axes = tuple(payload.get("slice_axes", [self.pre.slice_axis]))  # `train --slice-planes`
        self.forward: Forward = (
            self._onnx_forward(onnx_path) if backend == "onnx" else self._torch_forward(payload)
        )

    def _onnx_forward(self, onnx_path: str | Path) -> Forward:
        """The network as an onnxruntime session on the CPU; an export of another checkpoint is
        refused at its first run."""
        import onnxruntime as ort

        if not Path(onnx_path).is_file():
            raise MedsightError("no such ONNX file", onnx_path)
        try:
            session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own: not protobuf, truncated, unsupported graph
            raise MedsightError(
                f"not a readable ONNX model ({type(exc).__name__}); write one with `medsight export`",
                onnx_path,
            ) from exc
        name = session.get_inputs()[0].name

        def run_onnx(x: np.ndarray) -> np.ndarray:
            try:
                return session.run(None, {name: x})[0]
            except Exception as exc:  # a model exported from another checkpoint: other inputs
                raise MedsightError(
                    f"does not fit the checkpoint {self.path.name} ({type(exc).__name__}); export "
                    "it from that checkpoint with `medsight export`",
                    onnx_path,
                ) from exc

        return run_onnx

    def _torch_forward(self, payload: dict) -> Forward:
        """The checkpoint's network on ``self.device``, at ``self.precision``."""
        import torch

        from medsight.models.registry import build_model

        self.model = build_model(self.model_info["name"], **self.model_info["kwargs"])
        checkpoint.load_weights(self.model, payload, self.path)
        self.model.eval().to(self.device)
        autocast = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(self.precision)

        def forward(x: np.ndarray) -> np.ndarray:
            with (
                torch.no_grad(),
                torch.autocast(self.device.type, autocast, enabled=autocast is not None),
            ):
                return self.model(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

        return forward

    @property
    def class_values(self) -> np.ndarray:
        """The value each class index is written as: the training label files' own values."""
        return np.array([self.stored_values[v] for v in sorted(self.labels)], dtype=np.int16)

    def check(self, scan: Scan) -> None:
        if scan.channels != self.pre.in_channels:
            raise MedsightError(
                f"scan has {scan.channels} channel(s) but the model was trained on {self.pre.in_channels}",
                scan.path,
            )
        one_slice = scan.ndim == 3 and scan.spatial_shape[-1] == 1  # how NIfTI stores a 2D image
        if scan.ndim != self.pre.dim and not (self.pre.dim == 2 and one_slice):
            what = {2: "2D images", 3: "3D volumes"}
            raise MedsightError(
                f"the model was trained on {what[self.pre.dim]}; this scan is {scan.ndim}D", scan.path
            )

    def predict(self, scan: Scan, largest_component: bool = False) -> tuple[Scan, Scan]:
        """(label map, class probabilities), both on the input scan's own grid and affine."""
        self.check(scan)
        scan = fill_non_finite(scan)
        if scan.ndim == 2:  # a picture is a one-slice volume to the engine, and back
            labels, probs = self._predict(as_volume(scan), largest_component)
            return as_picture(labels), as_picture(probs)
        return self._predict(scan, largest_component)

    def _predict(self, scan: Scan, largest_component: bool) -> tuple[Scan, Scan]:
        working = self.pre.image(scan)
        if len(self.slice_axes) > 1 and (mm := unlike_spacing(working.spacing)):
            raise MedsightError(
                f"has {mm} voxels (after the model's resampling); the model slices three planes "
                "(train --slice-planes 3) and needs near-isotropic ones",
                scan.path,
            )

        def run(image: np.ndarray, mirror_axes=()) -> np.ndarray:
            return probabilities(
                self.forward, image, self.kind, self.slices, self.patch, self.slice_axes, mirror_axes
            )

        square = len(self.patch) == 2 and self.patch[0] == self.patch[1]
        if self.tta and self.pre.dim == 2 and square and {0, 1} <= set(self.mirror_axes):
            # trained on all eight rotations and mirror images of pictures (PatchSampler transpose)
            probs = average_over_views(run, working.array, dihedral_views((1, 2)))
        else:
            probs = run(working.array, self.mirror_axes if self.tta else ())
        probs = self.pre.restore(probs, working, scan)
        labels = self.class_values[np.argmax(probs, axis=0)]
        if largest_component:
            labels = largest_components(labels)
        return scan.with_array(labels[None].astype(np.uint8)), scan.with_array(probs.astype(np.float32))
