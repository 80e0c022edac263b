"""Self-describing checkpoints: one file with the weights, the model's name and arguments, label
names, preprocessing, training state (for --resume) and the medsight version that wrote it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsight.errors import MedsightError

REQUIRED = ("format", "model", "state_dict", "labels", "preprocessing")
FORMAT = "medsight-checkpoint-1"


def _plain(value: Any) -> Any:
    """Metadata as types ``torch.load(weights_only=True)`` accepts: numpy scalars become Python
    numbers and paths strings; tensors and numpy arrays (allowed on load) stay as they are."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _safe_globals() -> list:
    """What a weights-only load may rebuild besides tensors and plain types: numpy arrays, numpy
    scalars and paths, which older medsight versions stored in metadata. None of them runs code."""
    import pathlib

    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    # numbers and booleans only: an object array could carry arbitrary pickled objects
    dtypes = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, pathlib.PosixPath, *dtypes]


def save(path: str | Path, payload: dict[str, Any], overwrite: bool = True) -> Path:
    import torch

    from medsight import __version__
    from medsight.io import atomic_path

    payload = _plain({"format": FORMAT, "medsight_version": __version__, **payload})
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _read(path: Path) -> Any:
    """``torch.load`` that never runs code from the file (weights only, a short allow-list)."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names what it refused after this marker: a global (class, function) means the file
        # holds objects beyond weights; anything else (an unknown opcode) means it is not a pickle
        reason = str(exc).partition("WeightsUnpickler error:")[2].lower()
        if "global" in reason or "can only build" in reason:
            raise MedsightError(
                "holds objects other than weights and plain metadata, so it cannot be loaded safely "
                "(written by an older medsight, or not by medsight); retrain it with this version",
                path,
            ) from None
        raise MedsightError(f"corrupt or unreadable checkpoint ({type(exc).__name__})", path) from None
    except Exception as exc:
        raise MedsightError(f"corrupt or unreadable checkpoint ({type(exc).__name__})", path) from exc


def load(path: str | Path, method: str | None = None) -> dict[str, Any]:
    """Load and validate; ``method`` (if given) must match the checkpoint's method."""
    path = Path(path)
    if not path.is_file():
        raise MedsightError("no such checkpoint file", path)
    payload = _read(path)
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


def sha256_of(path: str | Path) -> str:
    """The file's SHA-256, read in blocks: what provenance and --init record of a checkpoint."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
