"""Assigning training rows to workers: iid and label-shard (non-iid) splits."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._common import check_int

SPLITS = ("iid", "shards")


def _as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if isinstance(generator, torch.Generator):
        return generator
    seed = check_int("generator (as a seed)", generator, minimum=0)
    return torch.Generator().manual_seed(seed)


def split_workers(
    n_rows: int,
    labels: Any,
    n_workers: int,
    how: str,
    *,
    shards_per_worker: int = 2,
    n_shards: int | None = None,
    generator: torch.Generator | int | None = None,
) -> list[torch.Tensor]:
    """Assign the rows ``0..n_rows-1`` to ``n_workers`` workers.

    how="iid"
        A random permutation of all rows, cut into ``n_workers`` contiguous parts whose sizes
        differ by at most one (the first ``n_rows % n_workers`` parts get the extra row).
        ``labels`` is ignored (may be None). The parts partition the rows.
    how="shards"
        The non-iid split of McMahan et al. used by paper 003: sort the rows by label (stable
        sort, so ties keep row order), cut the sorted order into ``n_shards`` contiguous shards
        of (near-)equal size (sizes differ by at most one), and give each worker
        ``shards_per_worker`` distinct shards chosen at random without replacement.
        ``n_shards`` defaults to ``shards_per_worker * n_workers`` (every row is used); a larger
        ``n_shards`` leaves the unassigned shards' rows unused (e.g. MNIST with 20 workers and
        the paper's 200 shards of 300). With 10 classes and 2 shards per worker most workers
        see at most 2 labels.

    ``generator`` is a ``torch.Generator`` (or an int seed; None means seed 0); the result is a
    deterministic function of it. Returns a list of int64 index tensors, one per worker.
    Raises ValueError naming the bad value for invalid input.
    """
    n_rows = check_int("n_rows", n_rows, minimum=1)
    n_workers = check_int("n_workers", n_workers, minimum=1)
    if how not in SPLITS:
        raise ValueError(f"unknown split how={how!r}; allowed: {list(SPLITS)}")
    if n_workers > n_rows:
        raise ValueError(f"n_workers={n_workers} exceeds n_rows={n_rows}: every worker needs a row")
    gen = _as_generator(generator)

    if how == "iid":
        perm = torch.randperm(n_rows, generator=gen)
        return [part.clone() for part in torch.tensor_split(perm, n_workers)]

    # how == "shards"
    shards_per_worker = check_int("shards_per_worker", shards_per_worker, minimum=1)
    needed = shards_per_worker * n_workers
    if n_shards is None:
        n_shards = needed
    n_shards = check_int("n_shards", n_shards, minimum=1)
    if n_shards < needed:
        raise ValueError(
            f"n_shards={n_shards} is too small: {n_workers} workers x shards_per_worker="
            f"{shards_per_worker} need at least {needed} shards"
        )
    if n_shards > n_rows:
        raise ValueError(f"n_shards={n_shards} exceeds n_rows={n_rows}: shards would be empty")
    if labels is None:
        raise ValueError("how='shards' needs labels (got None)")
    lab = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    lab = lab.reshape(-1)
    if lab.numel() != n_rows:
        raise ValueError(f"labels has {lab.numel()} entries but n_rows={n_rows}")
    order = torch.sort(lab, stable=True).indices
    shards = torch.tensor_split(order, n_shards)
    chosen = torch.randperm(n_shards, generator=gen)[:needed].reshape(n_workers, shards_per_worker)
    return [torch.cat([shards[int(s)] for s in row]) for row in chosen]
