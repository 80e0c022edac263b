"""Shared test fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data relative to the repo root; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not available")
    return SHARED_DATA


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors run faster on one thread than on two contended ones."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, whichever tests its pytest-xdist worker ran
    before it: a test that passes here passes in CI's order too."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def case_cache(tmp_path_factory):
    """Training caches its preprocessed cases (engine/cache.py) in a folder of the test session,
    not in the user's ~/.cache; subprocesses inherit it."""
    import os

    previous = os.environ.get("MEDSIGHT_CACHE")
    os.environ["MEDSIGHT_CACHE"] = str(tmp_path_factory.mktemp("medsight-cache"))
    yield Path(os.environ["MEDSIGHT_CACHE"])
    if previous is None:
        os.environ.pop("MEDSIGHT_CACHE", None)
    else:
        os.environ["MEDSIGHT_CACHE"] = previous


@pytest.fixture
def cli(capsys, monkeypatch):
    """``cli(*args) -> (exit code, stdout, stderr)`` through ``main()``, as the `medsight` script runs, in process
    (typer's CliRunner would skip main()'s one-line error handling)."""
    from medsight.cli.main import main

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["medsight", *(str(a) for a in args)])
        with pytest.raises(SystemExit) as stop:
            main()
        captured = capsys.readouterr()
        return stop.value.code, captured.out, captured.err

    return run


@pytest.fixture
def run_cli(cli):
    """The `medsight` command in process, answering like ``subprocess.run`` (``returncode``,
    ``stdout``, ``stderr``). Tests that kill or interrupt a run, or check the installed script,
    start their own process."""
    from types import SimpleNamespace

    def run(*args) -> SimpleNamespace:
        code, out, err = cli(*args)
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run
