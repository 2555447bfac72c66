"""``bench cache`` on a tiny stream: hit rates within the ceiling, the policies' difference on
a stream that scans, the Zipf fit, and utilisation exact vs HyperLogLog."""

import json

import numpy as np
import pytest

from engram_ray import config as C
from engram_ray.bench import cache as bench_cache
from engram_ray.core.indexer import RowIndexer
from engram_ray.core.tokens import CompressedVocab


@pytest.fixture(scope="module")
def indexer():
    return RowIndexer.build(C.tiny(), CompressedVocab(np.arange(97) // 2))


def test_zipf_fit_recovers_the_exponent():
    ranks = np.arange(1, 5001)
    assert bench_cache.zipf_exponent(1e6 * ranks ** -1.1) == pytest.approx(1.1, abs=1e-6)
    with pytest.raises(ValueError, match="3 distinct"):
        bench_cache.zipf_exponent(np.array([3, 1]))


def test_hit_rates_stay_under_the_ceiling_and_grow_with_the_cache(indexer):
    tokens = np.random.default_rng(0).zipf(1.3, size=20_000) % 97
    r = bench_cache.run(indexer, tokens, corpus="zipf", preset="tiny", sizes=(0.01, 0.1, 1.0),
                        batch=2, seq_len=64)
    assert r["steps"] == 20_000 // 128 and 0 < r["hit_rate_ceiling"] < 1
    for policy in ("lru", "tinylfu"):
        rates = [c["hit_rate"] for c in r["curves"] if c["policy"] == policy]
        assert rates == sorted(rates) and rates[-1] <= r["hit_rate_ceiling"] + 1e-12
    whole = [c["hit_rate"] for c in r["curves"] if c["share"] == 1.0]
    # as many entries as rows read: all but the set-associative conflicts hit
    assert whole[0] > 0.9 * r["hit_rate_ceiling"]
    assert r["zipf_exponent"] > 0 and 0 < r["top1pct_share"] < 1
    for t in r["tables"]:
        assert t["touched_hll"] == pytest.approx(t["touched"], rel=0.05, abs=2)
        assert t["utilisation"] == t["touched"] / t["rows"]
    json.dumps(r)  # a report: plain JSON


def test_bad_sizes_and_short_streams_are_refused(indexer):
    tokens = np.zeros(1000, dtype=np.int64)
    with pytest.raises(ValueError, match=r"cache sizes \[0.0\]"):
        bench_cache.run(indexer, tokens, corpus="x", preset="tiny", sizes=(0.0,))
    with pytest.raises(ValueError, match="give more tokens"):
        bench_cache.run(indexer, tokens, corpus="x", preset="tiny", batch=8, seq_len=256)
    with pytest.raises(ValueError, match="policies"):
        bench_cache.run(indexer, tokens, corpus="x", preset="tiny", policies=("fifo",), batch=1, seq_len=8)
