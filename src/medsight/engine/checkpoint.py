"""Self-describing checkpoints: one file with the weights, the model's name and arguments, label
names, preprocessing, training state (for --resume) and the medsight version that wrote it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsight.errors import MedsightError

REQUIRED = ("format", "model", "state_dict", "labels", "preprocessing")
FORMAT = "medsight-checkpoint-1"


def save(path: str | Path, payload: dict[str, Any], overwrite: bool = True) -> Path:
    import torch

    from medsight import __version__
    from medsight.io import atomic_path

    payload = {"format": FORMAT, "medsight_version": __version__, **payload}
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load(path: str | Path, method: str | None = None) -> dict[str, Any]:
    """Load and validate; ``method`` (if given) must match the checkpoint's method."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MedsightError("no such checkpoint file", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise MedsightError(f"corrupt or unreadable checkpoint ({type(exc).__name__})", path) from exc
    if (
        not isinstance(payload, dict)
        or payload.get("format") != FORMAT
        or any(k not in payload for k in REQUIRED)
    ):
        raise MedsightError("not a medsight checkpoint (missing format, model or preprocessing)", path)
    if method is not None and payload["model"]["name"] != method:
        raise MedsightError(f"checkpoint is for method '{payload['model']['name']}', not '{method}'", path)
    return payload


def trainer_of(payload: dict[str, Any]) -> str:
    """The task that wrote ``payload`` (see :func:`medsight.tasks.registry.task_of`)."""
    from medsight.tasks.registry import task_of

    return task_of(payload)


def load_weights(model, payload: dict[str, Any], path: str | Path) -> None:
    """``model.load_state_dict`` with a one-line error when the weights do not fit the network
    (a checkpoint written by a medsight version whose network had another layout)."""
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        version = payload.get("medsight_version", "unknown")
        raise MedsightError(
            f"weights do not fit this version's '{payload['model']['name']}' network "
            f"(checkpoint written by medsight {version}); retrain or use that version",
            path,
        ) from exc
