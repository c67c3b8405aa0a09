"""Random reshuffling (``workers.sampling: reshuffle``, paper 003): every pass over a worker's
shard uses each of its rows once; the order is fixed by the seed and survives a checkpoint."""

from __future__ import annotations

import pytest
import torch

from gradsparse.config import ConfigError, load_config
from gradsparse.engines.base import WorkerData
from gradsparse.experiments.build import build_engine
from gradsparse.tasks import make_task


def _data(seed: int, batch: int = 3, workers: int = 4, sampling: str = "reshuffle") -> WorkerData:
    task = make_task("logreg", dataset="breast_cancer")  # 455 training rows
    return WorkerData(task, workers, "iid", 2, batch, torch.Generator().manual_seed(seed), sampling)


def test_every_pass_uses_each_row_of_the_shard_once():
    data = _data(0, batch=7)
    passes = 3
    n = [int(x) for x in data.lens]
    draws = -(-passes * max(n) // 7)  # enough steps for three passes of the largest shard
    batches = torch.stack([data.sample() for _ in range(draws)], dim=1).reshape(data.n_workers, -1)
    for q in range(data.n_workers):
        shard = sorted(data.rows[q].tolist())
        seq = batches[q].tolist()
        for p in range(passes):
            assert sorted(seq[p * n[q]:(p + 1) * n[q]]) == shard  # a permutation of the shard, straddling included
        assert seq[: n[q]] != seq[n[q]: 2 * n[q]]  # a fresh order each pass


def test_sample_worker_follows_the_same_order_and_seeds_fix_it():
    a, b = _data(5), _data(5)
    assert torch.equal(torch.stack([a.sample() for _ in range(4)]), torch.stack([b.sample() for _ in range(4)]))
    c = _data(6)
    assert not torch.equal(_data(5).sample(), c.sample())
    one = _data(5, workers=1)
    rows = torch.cat([one.sample_worker(0) for _ in range(5)])
    again = _data(5, workers=1)
    assert torch.equal(rows, torch.cat([again.sample()[0] for _ in range(5)]))


def test_with_replacement_is_unchanged_and_bad_values_are_refused():
    assert _data(0, sampling="with_replacement").sample().shape == (4, 3)
    with pytest.raises(ValueError, match="sampling must be one of"):
        _data(0, sampling="sometimes")
    with pytest.raises(ConfigError, match="sampling"):
        load_config({"workers": {"sampling": "sometimes"}})


@pytest.mark.parametrize("engine", ["sync", "loop", "async"])
def test_a_checkpoint_mid_pass_resumes_the_same_order(engine):
    cfg = load_config({"engine": engine, "task": {"name": "logreg", "options": {"dataset": "breast_cancer"}},
                       "workers": {"count": 2, "batch_size": 16, "sampling": "reshuffle"},
                       "algorithm": {"compressor": {"kind": "topk", "density": 0.2},
                                     **({"topology": {"kind": "ps_uplink"}} if engine == "async" else {})},
                       "schedule": {"lr": 0.5}, "steps": 40})
    straight, resumed = build_engine(cfg), build_engine(cfg)
    for _ in range(9):  # mid-pass: a shard of ~227 rows in batches of 16
        straight.step()
        resumed.step()
    sd = resumed.state_dict()
    fresh = build_engine(cfg)
    fresh.load_state_dict(sd)
    for _ in range(25):
        straight.step()
        fresh.step()
    assert torch.equal(straight.w, fresh.w)


def test_paper_003_shard_split_from_the_config():
    """workers.n_shards: sort by label, cut into 200 shards, two at random per worker (paper 003)."""
    cfg = load_config({"task": {"name": "mnist5k_mlp"}, "steps": 1,
                       "workers": {"count": 20, "split": "shards", "n_shards": 200, "batch_size": 10}})
    data = build_engine(cfg).data
    labels = build_engine(cfg).task.train_y
    order = torch.sort(labels, stable=True).indices
    shards = {tuple(s.tolist()) for s in torch.tensor_split(order, 200)}
    used = []
    for rows in data.rows:
        assert len(rows) == 40  # 4,000 rows / 200 = shards of 20; two per worker
        a, b = tuple(rows[:20].tolist()), tuple(rows[20:].tolist())
        assert a in shards and b in shards and a != b
        used += [a, b]
    assert len(set(used)) == 40  # no shard given twice
    with pytest.raises(ConfigError, match="n_shards=30 is too small"):
        build_engine(load_config({"task": {"name": "mnist5k_mlp"}, "steps": 1,
                                  "workers": {"count": 20, "split": "shards", "n_shards": 30}}))
