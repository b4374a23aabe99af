"""Exact resume (1 and 2 ranks), disjoint rank shares, determinism by seed."""
import json

import numpy as np
import pytest
import torch

from data import DataError, build_train_loader
from tests.data.conftest import int_docs, write_jsonl


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(7)
    write_jsonl(tmp_path / "corpus" / "a.jsonl", int_docs(rng.integers(1, 300, size=150)))
    write_jsonl(tmp_path / "corpus" / "b.jsonl", int_docs(rng.integers(200, 900, size=40), start=10 ** 6))
    return tmp_path / "corpus"


def _cfg(make_cfg, corpus, **kw):
    kw = dict(dict(holdout_fraction=0.1, bucket_edges=[0, 64, 256, 512], bucket_ratios=[1, 1, 2]), **kw)
    return make_cfg(sources=[{"path": str(corpus / "a.jsonl"), "weight": 1.0},
                             {"path": str(corpus / "b.jsonl"), "weight": 2.0}], **kw)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[:4], b[:4])) and a.max_seqlen == b.max_seqlen


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_equals_uninterrupted(make_cfg, corpus, itok, world_size):
    cfg = _cfg(make_cfg, corpus)
    total, stop = 40, 17
    for rank in range(world_size):
        def make():
            return build_train_loader(cfg, itok, seq_len=512, micro_batch_size=2, rank=rank,
                                      world_size=world_size, seed=3)

        straight = make()
        expected = [next(straight) for _ in range(total)]
        first = make()
        for _ in range(stop):
            next(first)
        # Through JSON: the state is plain ints and lists.
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        for i in range(stop, total):
            assert _same(next(resumed), expected[i]), f"rank {rank}: batch {i} differs after resume"
        assert resumed.mix_stats() == straight.mix_stats()
        assert resumed.state_dict() == straight.state_dict()


def test_resume_across_epochs(make_cfg, tmp_path, itok):
    # A tiny corpus cycles many epochs in a few batches; resume mid-epoch of every stream.
    write_jsonl(tmp_path / "t.jsonl", int_docs([5, 9, 30, 70, 3, 12]))
    cfg = make_cfg(sources=[{"path": str(tmp_path / "t.jsonl")}], holdout_fraction=0.0, bucket_edges=[0, 16, 64],
                   bucket_ratios=[1, 1], pack_buffer=3)
    straight = build_train_loader(cfg, itok, seq_len=64, micro_batch_size=1)
    expected = [next(straight) for _ in range(30)]
    first = build_train_loader(cfg, itok, seq_len=64, micro_batch_size=1)
    for _ in range(11):
        next(first)
    assert first.mix_stats()["epoch/t.jsonl"] >= 1
    resumed = build_train_loader(cfg, itok, seq_len=64, micro_batch_size=1)
    resumed.load_state_dict(first.state_dict())
    assert all(_same(next(resumed), expected[i]) for i in range(11, 30))


def _ids(loader, n):
    out = []
    for _ in range(n):
        out.extend(next(loader).input_ids.reshape(-1).tolist())
    return out


def test_ranks_disjoint(make_cfg, tmp_path, itok):
    lengths = np.random.default_rng(8).integers(1, 200, size=101)
    write_jsonl(tmp_path / "c.jsonl", int_docs(lengths))
    # Strict order and one bucket: within an epoch the ranks read disjoint pieces covering the corpus.
    cfg = make_cfg(sources=[{"path": str(tmp_path / "c.jsonl")}], holdout_fraction=0.0, bucket_edges=[0, 128],
                   bucket_ratios=[1], pack_buffer=1)
    loaders = [build_train_loader(cfg, itok, seq_len=128, micro_batch_size=1, rank=r, world_size=2, seed=1)
               for r in range(2)]
    seen = []
    for loader in loaders:
        # Tokens in this rank's share of epoch 0; with pack_buffer=1 they come first, in order.
        epoch_tokens = int(loader.streams[0].length[loader._share(0, 0)].sum())
        ids = []
        while len(ids) < epoch_tokens:
            ids.extend(next(loader).input_ids.reshape(-1).tolist())
        seen.append(set(ids[:epoch_tokens]) - {0})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    # Together they cover the corpus, except the one piece the round-robin cut left out this epoch.
    assert len(set(range(1, int(lengths.sum()) + 1)) - seen[0] - seen[1]) <= 128


def test_same_seed_same_batches(make_cfg, corpus, itok):
    cfg = _cfg(make_cfg, corpus)
    a = _ids(build_train_loader(cfg, itok, 512, 2, seed=5), 5)
    b = _ids(build_train_loader(cfg, itok, 512, 2, seed=5), 5)
    c = _ids(build_train_loader(cfg, itok, 512, 2, seed=6), 5)
    assert a == b and a != c


def test_state_mismatch_is_refused(make_cfg, corpus, itok):
    cfg = _cfg(make_cfg, corpus)
    loader = build_train_loader(cfg, itok, 512, 2, rank=0, world_size=2)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(DataError, match="rank 0 of 2"):
        build_train_loader(cfg, itok, 512, 2, rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        build_train_loader(cfg, itok, 256, 2, rank=0, world_size=2).load_state_dict(state)
    other = _cfg(make_cfg, corpus, bucket_ratios=[1, 1, 1])
    with pytest.raises(DataError, match="bucket_ratios"):
        build_train_loader(other, itok, 512, 2, rank=0, world_size=2).load_state_dict(state)
