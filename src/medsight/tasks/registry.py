"""The task registry: one entry per training method, mapping the ``task`` a checkpoint records to
the LightningModule that trains it, the predictor that reads it and its commands.

Entries name their classes as ``"module:attribute"`` strings, imported on first use, so listing the
tasks stays cheap. Adding a method: a task module that subclasses
:class:`medsight.engine.loop.MedsightTask` and calls :func:`register_task` (or an entry in
``BUILTIN`` below for the ones shipped with medsight), plus its network in the model registry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsight.errors import MedsightError


@dataclass(frozen=True)
class Task:
    name: str
    module_class: Any  # a MedsightTask subclass, or "module:Class"
    predictor_factory: Any  # callable(checkpoint_path, **options) -> predictor, or "module:callable"
    cli_register: Any = None  # callable(typer app) adding the task's commands, or "module:callable"
    what: str = ""  # what its checkpoint holds, for messages
    command: str = "medsight predict"  # the command that segments with it

    def resolve(self, attribute: str):
        value = getattr(self, attribute)
        if isinstance(value, str):
            module, _, name = value.partition(":")
            return getattr(importlib.import_module(module), name)
        return value


TASKS: dict[str, Task] = {}


def register_task(name, module_class, predictor_factory, cli_register=None, what="", command="") -> Task:
    """Register a task under ``name`` (the ``task`` its checkpoints record)."""
    task = Task(
        name, module_class, predictor_factory, cli_register, what or name, command or "medsight predict"
    )
    TASKS[name] = task
    return task


register_task(
    "segmentation", "medsight.tasks.segmentation:SegmentationTask", "medsight.tasks.segmentation:predictor",
    "medsight.cli.segment:register", "a unet2d/context25d/unet3d model", "medsight predict",
)  # fmt: skip
register_task(
    "fewshot", "medsight.tasks.fewshot:FewShotTask", "medsight.tasks.fewshot:predictor",
    "medsight.cli.fewshot:register", "a few-shot model", "medsight fewshot",
)  # fmt: skip
register_task(
    "textseg", "medsight.tasks.lvit:TextSegTask", "medsight.tasks.lvit:TextSegPredictor", "medsight.cli.textseg:register",
    "a text-guided model", "medsight textseg predict",
)  # fmt: skip
register_task(
    "caption", "medsight.tasks.caption:CaptionTask", "medsight.tasks.sr:predictor", None,
    "a caption network (the semantic step of `medsight sr train`)", "medsight sr train",
)  # fmt: skip
register_task(
    "sr", "medsight.tasks.sr:SRTask", "medsight.tasks.sr:predictor", "medsight.cli.sr:register",
    "a super-resolution model", "medsight sr predict",
)  # fmt: skip
register_task(
    "pretrain", "medsight.tasks.ssl:PretrainTask", "medsight.tasks.ssl:predictor", "medsight.cli.ssl:register",
    "a self-supervised pretraining checkpoint", "medsight train --method unet2d --init",
)  # fmt: skip


def task_of(payload: dict[str, Any]) -> str:
    """The task that wrote a checkpoint: its ``task`` entry, or for checkpoints older than that
    entry, inferred from what the few-shot and text-guided trainers wrote."""
    if payload.get("task"):
        return payload["task"]
    if payload.get("method") == "textseg":
        return "textseg"
    if payload["model"].get("kind") == "fewshot-2d":
        return "fewshot"
    return "segmentation"


def get_task(name: str, path: str | Path | None = None) -> Task:
    if name not in TASKS:
        raise MedsightError(
            f"was written by the unknown task '{name}'; choose one of {', '.join(TASKS)}", path
        )
    return TASKS[name]


def task_for_method(method: str):
    """The task class that trains ``medsight train --method METHOD``."""
    known = []
    for task in TASKS.values():
        if task.module_class is None:
            continue
        cls = task.resolve("module_class")
        if method in cls.methods():
            return cls
        known += cls.methods()
    raise MedsightError(f"unknown method '{method}'; choose one of {', '.join(known)}")


def load_predictor(path: str | Path, **options):
    """The predictor of the task that wrote the checkpoint at ``path``."""
    from medsight.engine import checkpoint

    task = get_task(task_of(checkpoint.load(path)), path)
    return task.resolve("predictor_factory")(path, **options)
