"""Table utilisation and read skew in bounded memory: HyperLogLog counts and the sampled
top-k shares, against exact answers."""

import numpy as np
import pytest

from engram_ray import config as C
from engram_ray.core.layout import ShardPlan, TableLayout
from engram_ray.core.tokens import CompressedVocab
from engram_ray.core.usage import HyperLogLog, RowUsage


@pytest.mark.parametrize("n", [10, 1000, 50_000, 400_000])
def test_hyperloglog_counts_distinct_ids_within_its_error(n):
    ids = np.random.default_rng(n).choice(1 << 40, size=n, replace=False)
    h = HyperLogLog(14)
    h.add(ids)
    h.add(ids[: n // 3])  # repeats change nothing
    assert h.count() == pytest.approx(n, rel=0.03)  # 0.8 % standard error: 3 % is ~4 sigma
    other = HyperLogLog(14)
    other.add(ids[::2] + (1 << 41))  # disjoint ids
    h.merge(other)
    assert h.count() == pytest.approx(n + (n + 1) // 2, rel=0.03)
    with pytest.raises(ValueError, match="p=20"):
        HyperLogLog(20)


@pytest.fixture(scope="module")
def layout():
    return TableLayout.build(C.tiny(), CompressedVocab(np.arange(97) // 2))


def test_row_usage_splits_a_shard_by_table_and_estimates_each(layout):
    start, stop = ShardPlan(layout.total_rows, 2).shard_range(1)
    u = RowUsage(layout, start, stop, batch=1000)
    assert sum(b - a for _, _, a, b in u.tables) == stop - start        # every row in one table
    assert {(lay, o) for lay, o, _, _ in u.tables} <= {(lay, o) for lay in layout.layer_ids for o in (2, 3)}
    rng = np.random.default_rng(0)
    reads = [rng.integers(start, stop, size=int(rng.integers(1, 300))) for _ in range(200)]
    for r in reads:
        u.add(r)
    rep = u.report()
    seen = np.unique(np.concatenate(reads))
    for t, (layer, order, a, b) in zip(rep["tables"], u.tables):
        exact = np.count_nonzero((seen >= a) & (seen < b))
        assert (t["layer"], t["order"], t["rows"]) == (layer, order, b - a)
        assert t["touched"] == pytest.approx(exact, rel=0.05, abs=3)
        assert 0 <= t["utilisation"] <= 1
    assert rep["reads"] == sum(r.size for r in reads)


def test_read_skew_shares_follow_the_traffic(layout):
    u = RowUsage(layout, sample=1)                      # every row sampled: exact shares
    hot = np.arange(10)                                 # 10 rows of 1000 read 91 times each
    u.add(np.concatenate([np.repeat(hot, 91), np.arange(10, 1000)]))
    rep = u.report()
    assert rep["sampled_rows"] == 1000
    assert rep["top1pct_share"] == pytest.approx(910 / 1900)
    assert rep["top10pct_share"] == pytest.approx((910 + 90) / 1900)
    capped = RowUsage(layout, sample=1, max_sampled=100)
    capped.add(np.concatenate([np.repeat(hot, 91), np.arange(10, 1000)]))
    rep = capped.report()      # the tail dropped, the hot rows kept: the shares stay exact
    assert rep["sampled_rows"] == 1000 and rep["sampled_reads"] == 1900
    assert rep["top1pct_share"] == pytest.approx(910 / 1900)
