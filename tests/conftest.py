"""Shared test fixtures."""

from __future__ import annotations

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


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Training caches preprocessed cases under $MEDSIGHT_CACHE (default ~/.cache/medsight): tests
    use a folder of their own so they neither read a user's cache nor leave one behind."""
    import os

    previous = os.environ.get("MEDSIGHT_CACHE")
    os.environ["MEDSIGHT_CACHE"] = str(tmp_path_factory.mktemp("medsight-cache"))
    yield
    if previous is None:
        os.environ.pop("MEDSIGHT_CACHE", None)
    else:
        os.environ["MEDSIGHT_CACHE"] = previous
