"""The one training loop (engine/loop.py, on Lightning) against the same training written out in plain
PyTorch: seeded batches, AdamW, the poly learning rate stepped per optimiser step, and the weight
average with its warm-up. Lightning may drive the loop, but it must not change what is computed: the
trained weights and their average come out equal to a dozen lines of torch.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from medsight.engine.checkpoint import load
from medsight.engine.loop import LoopConfig, MedsightTask, Shared, fit

FEATURES, EPOCHS, STEPS, LR, DECAY, SEED = 3, 3, 4, 0.05, 0.9, 7


def batch_of(rng: np.random.Generator):
    x = rng.normal(size=(5, FEATURES)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)[:, None]
    return torch.from_numpy(x), torch.from_numpy(y)


@dataclass(kw_only=True)
class TinyConfig(LoopConfig):
    pass


class TinyTask(MedsightTask):
    name = "tiny"

    def prepare(self) -> None:
        torch.manual_seed(self.cfg.seed)
        self.model = torch.nn.Linear(FEATURES, 1)
        self.data = Shared({"val": [batch_of(np.random.default_rng(123))]})

    def make_batch(self, rng):
        return batch_of(rng)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def val_dataloader(self):
        return self.cases_loader(self.data.value["val"])

    def validation_step(self, case, batch_idx) -> None:
        x, y = case
        self._val = -float(torch.nn.functional.mse_loss(self.model(x), y))

    def on_validation_epoch_end(self) -> None:
        self.record_epoch(self._val, {"val_neg_mse": self._val})

    def checkpoint_payload(self):
        return {"model": {"name": "tiny", "kind": "tiny", "kwargs": {}}, "labels": {}, "preprocessing": {}}


def by_hand(warmup: float = 0.0):
    """The same run in plain torch: batch (epoch, step) from the stream (seed, rank 0, epoch, step);
    with ``warmup``, the rate rises as (n + 1) / (warmup * total) until that reaches 1."""
    torch.manual_seed(SEED)
    model = torch.nn.Linear(FEATURES, 1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    average = [p.detach().clone() for p in model.parameters()]
    total = EPOCHS * STEPS
    for epoch in range(EPOCHS):
        for step in range(STEPS):
            n = epoch * STEPS + step  # optimiser steps taken so far
            for group in optimiser.param_groups:
                rise = min(1.0, (n + 1) / (warmup * total)) if warmup else 1.0
                group["lr"] = LR * rise * (1 - n / total) ** 0.9
            x, y = batch_of(np.random.default_rng([SEED, 0, epoch, step]))
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            decay = 0.0 if n == 0 else min(DECAY, (1 + n) / (10 + n))  # the first update copies
            average = [
                decay * a + (1 - decay) * p.detach() for a, p in zip(average, model.parameters(), strict=True)
            ]
    return [p.detach() for p in model.parameters()], average


@pytest.mark.parametrize("decay, warmup", [(DECAY, 0.0), (0.0, 0.0), (DECAY, 0.5)])
def test_the_loop_computes_what_plain_torch_computes(tmp_path, decay, warmup):
    cfg = TinyConfig(
        out=str(tmp_path / "run"), seed=SEED, epochs=EPOCHS, steps_per_epoch=STEPS, lr=LR,
        ema_decay=decay, lr_warmup=warmup, patience=EPOCHS, progress=False, time_limit=None, device="cpu",
    )  # fmt: skip
    fit(TinyTask(cfg), cfg)
    last = load(tmp_path / "run" / "last.pt")
    trained, average = by_hand(warmup)
    saved = [last["state_dict"]["weight"], last["state_dict"]["bias"]]
    if decay:
        raw = last["training"]["weights"]
        for got, want in zip([raw["weight"], raw["bias"]], trained, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        want_saved = average
    else:
        want_saved = trained
    for got, want in zip(saved, want_saved, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("warmup", [-0.1, 1.0])
def test_a_warmup_outside_zero_to_one_is_refused(tmp_path, warmup):
    from medsight.errors import MedsightError

    cfg = TinyConfig(out=str(tmp_path / "run"), lr_warmup=warmup, progress=False, device="cpu")
    with pytest.raises(MedsightError, match="--lr-warmup"):
        TinyTask(cfg)


@pytest.mark.parametrize(
    "command",
    [["train", "--method", "context25d"], ["textseg", "train"], ["sr", "train"], ["pretrain"]],
    ids=["train", "textseg", "sr", "pretrain"],
)
def test_every_trainer_takes_lr_warmup_and_refuses_a_bad_one(tmp_path, cli, command):
    """The option reaches each trainer's config: a value outside [0, 1) is one line and exit 2."""
    from medsight.datasets.phantom import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "data", 4, dim=2 if command[0] == "textseg" else 3, seed=0)
    code, _, err = cli(*command, "--data", data, "--lr-warmup", "1.5", "-o", tmp_path / "run")
    assert code == 2 and "--lr-warmup is a fraction of the steps in [0, 1), not 1.5" in err
