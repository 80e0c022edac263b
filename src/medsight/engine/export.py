"""ONNX export of a checkpoint's network, for inference through onnxruntime."""

from __future__ import annotations

from pathlib import Path

from medsight.engine.sampling import round_up


def export_onnx(ckpt: str | Path, target: str | Path, overwrite: bool = False) -> Path:
    import torch

    from medsight.engine import checkpoint
    from medsight.io import atomic_path
    from medsight.models.registry import build_model

    payload = checkpoint.load(ckpt)
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
    with atomic_path(target, overwrite) as tmp:
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
