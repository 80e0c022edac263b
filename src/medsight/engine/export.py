"""ONNX export of a checkpoint's network, for inference through onnxruntime."""

from __future__ import annotations

import warnings
from pathlib import Path

from medsight.engine.sampling import round_up
from medsight.errors import MedsightError


def export_onnx(ckpt: str | Path, target: str | Path, overwrite: bool = False) -> Path:
    import torch

    from medsight.engine import checkpoint
    from medsight.io import atomic_path
    from medsight.models.registry import build_model
    from medsight.tasks.registry import get_task, task_of

    payload = checkpoint.load(ckpt)
    task = get_task(task_of(payload), ckpt)
    if task.name != "segmentation":
        raise MedsightError(
            f"is {task.what} ({payload['model']['name']}); ONNX export "
            "supports the segmentation-engine checkpoints (unet2d, context25d, unet3d) only",
            ckpt,
        )
    info = payload["model"]
    model = build_model(info["name"], **info["kwargs"])
    checkpoint.load_weights(model, payload, ckpt)
    model.eval()
    channels = payload["preprocessing"]["in_channels"]
    patch = [round_up(p) for p in payload["patch"]]
    if info["kind"] == "3d":
        example = torch.zeros(1, channels, *patch)
        axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    elif info["kind"] == "2.5d":
        example = torch.zeros(1, channels, info["slices"], *patch)
        axes = {0: "batch", 3: "h", 4: "w"}
    else:
        example = torch.zeros(1, channels, *patch)
        axes = {0: "batch", 2: "h", 3: "w"}
    with atomic_path(target, overwrite) as tmp, warnings.catch_warnings():
        # The traced shape checks are constant for inference, which pads every input to the same
        # multiples as the example; the norms compute the same in train and eval mode (instance
        # statistics, no running ones). Neither is news to the user.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings(
            "ignore", message="ONNX export mode is set to TrainingMode.EVAL", category=UserWarning
        )
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return Path(target)
