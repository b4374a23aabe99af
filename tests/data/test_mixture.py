"""Length-bucket mixing: the realised token mix converges to the configured ratios; empty buckets and sources
are dropped with a warning and the rest renormalised."""
import logging

import numpy as np
import pytest

from data import build_train_loader
from data.config import DataConfig
from data.mixture import DeficitScheduler, bucket_of, plan_mix
from infllm.config import ConfigError
from tests.data.conftest import int_docs, write_jsonl


def test_bucket_of_edges():
    edges = [0, 4096, 12288, 24576, 32768]
    lengths = np.array([1, 4095, 4096, 4097, 12288, 12289, 24576, 24577, 32768, 40000])
    assert bucket_of(lengths, edges).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]


def test_scheduler_converges_with_uneven_pieces():
    rng = np.random.default_rng(0)
    targets = [0.1, 0.2, 0.3, 0.4]
    mean_len = [10, 300, 50, 1000]
    sched = DeficitScheduler(targets)
    for _ in range(20000):
        k = sched.pick()
        sched.add(k, int(rng.integers(1, 2 * mean_len[k])))
    shares = np.array(sched.scheduled) / sched.total
    assert np.abs(shares - targets).max() < 0.002


def _corpus(tmp_path, name, lengths, start):
    return write_jsonl(tmp_path / f"{name}.jsonl", int_docs(lengths, start=start))


@pytest.mark.parametrize("ratios", [[1, 1, 1, 1], [1, 2, 3, 4], [0, 1, 0, 1]])
def test_bucket_mix_converges(tmp_path, itok, make_cfg, ratios):
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 512, size=400)
    path = _corpus(tmp_path, "c", lengths, 1)
    cfg = make_cfg(sources=[{"path": str(path)}], bucket_edges=[0, 32, 128, 256, 512], bucket_ratios=ratios,
                   holdout_fraction=0.0)
    loader = build_train_loader(cfg, itok, seq_len=512, micro_batch_size=4)
    for _ in range(150):
        next(loader)
    stats = loader.mix_stats()
    want = np.array(ratios, float) / sum(ratios)
    got = np.array([stats[f"mix/bucket/{k}"] for k in ("0-32", "32-128", "128-256", "256-512")])
    assert np.abs(got - want).max() < 0.02, (got, want)
    assert stats["mix/padding"] == 0.0


def test_source_weights_short_long_mix(tmp_path, itok, make_cfg):
    rng = np.random.default_rng(4)
    short = _corpus(tmp_path, "short", rng.integers(1, 60, size=300), 1)
    long = _corpus(tmp_path, "long", rng.integers(10, 500, size=100), 10 ** 6)
    cfg = make_cfg(sources=[{"path": str(short), "weight": 1.0}, {"path": str(long), "weight": 3.0}],
                   bucket_edges=[0, 64, 512], bucket_ratios=[1, 1], holdout_fraction=0.0)
    loader = build_train_loader(cfg, itok, seq_len=512, micro_batch_size=2)
    for _ in range(150):
        next(loader)
    stats = loader.mix_stats()
    assert abs(stats["mix/source/short.jsonl"] - 0.25) < 0.02
    assert abs(stats["mix/source/long.jsonl"] - 0.75) < 0.02
    # Within the long source the ratios are 1:1, the short source only has short pieces.
    assert abs(stats["mix/bucket/64-512"] - 0.75 / 2) < 0.03


def test_mix_by_bucket(tmp_path, itok, make_cfg):
    rng = np.random.default_rng(5)
    short = _corpus(tmp_path, "short", rng.integers(1, 60, size=300), 1)
    long = _corpus(tmp_path, "long", rng.integers(100, 500, size=100), 10 ** 6)
    cfg = make_cfg(sources=[{"path": str(short)}, {"path": str(long)}], bucket_edges=[0, 64, 512],
                   bucket_ratios=[1, 3], mix_by="bucket", holdout_fraction=0.0)
    loader = build_train_loader(cfg, itok, seq_len=512, micro_batch_size=2)
    for _ in range(150):
        next(loader)
    stats = loader.mix_stats()
    assert abs(stats["mix/bucket/0-64"] - 0.25) < 0.02 and abs(stats["mix/bucket/64-512"] - 0.75) < 0.02


def test_empty_bucket_dropped_with_warning(tmp_path, itok, make_cfg, caplog):
    path = _corpus(tmp_path, "c", [10, 20, 30, 40] * 10, 1)
    cfg = make_cfg(sources=[{"path": str(path)}], holdout_fraction=0.0)  # the default 0-4k ... 24k-32k
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(cfg, itok, seq_len=64, micro_batch_size=1)
    assert "length bucket(s) 4k-12k, 12k-24k, 24k-32k empty" in caplog.text
    assert "renormalised over 0-4k" in caplog.text
    next(loader)
    assert loader.mix_stats()["mix/bucket/0-4k"] == 1.0
    assert loader.target_mix()["mix/bucket/0-4k"] == pytest.approx(1.0)


def test_plan_mix_drops_empty_source():
    tokens = np.array([[100, 0], [0, 0]])
    shares, warnings = plan_mix(tokens, [1.0, 1.0], [1.0, 1.0], "source", ["a", "b"], ["x", "y"])
    assert shares.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert any("source 'b'" in w for w in warnings) and any("bucket(s) y empty" in w for w in warnings)


@pytest.mark.parametrize("ratios,msg", [([0, 0, 0, 0], "positive sum"), ([1, -1, 1, 1], "non-negative"),
                                        ([1, 1], "one ratio per bucket")])
def test_bad_bucket_ratios(ratios, msg):
    with pytest.raises(ConfigError, match=r"data\.bucket_ratios.*" + msg):
        DataConfig(bucket_ratios=ratios)


def test_bad_bucket_edges():
    with pytest.raises(ConfigError, match="data.bucket_edges"):
        DataConfig(bucket_edges=[0, 100, 50], bucket_ratios=[1, 1])
