"""Train/validation splits that do not depend on file-listing order.

Ids are sorted, then permuted with a seeded generator, so the same ids and seed always give the
same split on any machine. A layout's own split wins: when any case is marked ``val``, cases
marked ``val`` validate and the rest (except ``test``) train. ``test`` cases never enter either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from medsight.datasets.base import Dataset
from medsight.errors import MedsightError


def train_val_split(
    case_ids: Iterable[str],
    val_fraction: float = 0.2,
    seed: int = 0,
    given: Mapping[str, str | None] | None = None,
) -> tuple[list[str], list[str]]:
    """(train ids, validation ids), each sorted.

    ``given`` maps case id -> the layout's split name (``train``/``val``/``test``/None).
    Without a ``val`` split there, ``round(n * val_fraction)`` ids are drawn for validation
    (at least one when ``val_fraction > 0`` and there are two or more cases).
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise MedsightError("duplicate case ids; a split needs unique ids")
    if not 0.0 <= val_fraction < 1.0:
        raise MedsightError(f"val_fraction must be in [0, 1), got {val_fraction}")
    given = dict(given or {})
    ids = [i for i in ids if given.get(i) != "test"]
    if any(given.get(i) == "val" for i in ids):
        return [i for i in ids if given.get(i) != "val"], [i for i in ids if given.get(i) == "val"]
    n_val = round(len(ids) * val_fraction)
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    chosen = set(val)
    return [i for i in ids if i not in chosen], val


def split_dataset(dataset: Dataset, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """:func:`train_val_split` over a dataset's cases, honouring the layout's own split."""
    return train_val_split(
        dataset.case_ids, val_fraction, seed, given={c.case_id: c.split for c in dataset.cases}
    )
