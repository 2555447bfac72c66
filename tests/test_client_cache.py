"""The client's hot-row cache: hits and misses, eviction by policy, and freshness under
training (own pushes, and another writer's) against real shards on loopback."""

import time

import numpy as np
import pytest

from engram_ray.client import EngramClient
from engram_ray.client.cache import RowCache

from .test_client import Cluster


def _rows(ids, width=4):
    """Distinct rows: every element of row i is i."""
    return np.repeat(np.asarray(ids, np.float32)[:, None], width, axis=1)


def test_hits_return_the_rows_put_and_misses_leave_out_untouched():
    c = RowCache(64, 4, np.float32)                         # the default policy: LRU
    c.put(np.array([3, 9, 700]), _rows([3, 9, 700]))
    out = np.full((4, 4), -1.0, np.float32)
    hit = c.get(np.array([9, 5, 700, 3]), out)
    assert hit.tolist() == [True, False, True, True]
    assert out[:, 0].tolist() == [9, -1, 700, 3]
    r = c.report()
    assert (r["hits"], r["misses"], r["rows"], r["inserts"], r["evictions"]) == (3, 1, 3, 3, 0)
    assert r["hit_rate"] == pytest.approx(0.75) and 0 < r["fill"] < 1 and r["policy"] == "lru"


def test_lru_evicts_the_least_recently_used_way():
    c = RowCache(2, 4, np.float32, ways=2, policy="lru")   # one set of two ways
    c.put(np.array([1]), _rows([1]))
    c.put(np.array([2]), _rows([2]))
    c.get(np.array([1]), np.empty((1, 4), np.float32))     # 1 is now the more recent
    c.put(np.array([3]), _rows([3]))                        # evicts 2
    hit = c.get(np.array([1, 2, 3]), np.empty((3, 4), np.float32))
    assert hit.tolist() == [True, False, True]
    assert c.report()["evictions"] == 1


def test_tinylfu_keeps_a_hot_row_from_a_one_off():
    c = RowCache(1, 4, np.float32, ways=1, policy="tinylfu")
    out = np.empty((1, 4), np.float32)
    for _ in range(5):
        c.get(np.array([7]), out)
    c.put(np.array([7]), _rows([7]))
    c.get(np.array([8]), out)                # asked once
    c.put(np.array([8]), _rows([8]))         # not admitted over 7
    assert c.get(np.array([7]), out).tolist() == [True] and out[0, 0] == 7
    assert c.report()["rejected"] == 1
    lru = RowCache(1, 4, np.float32, ways=1, policy="lru")
    lru.put(np.array([7]), _rows([7]))
    lru.put(np.array([8]), _rows([8]))
    assert lru.get(np.array([7]), out).tolist() == [False]


def test_tinylfu_beats_lru_on_zipf_traffic():
    rng = np.random.default_rng(0)
    rates = {}
    for policy in ("lru", "tinylfu"):
        c = RowCache(2000, 2, np.float32, policy=policy)
        rng = np.random.default_rng(0)
        for _ in range(100):
            ids = np.unique(rng.zipf(1.2, size=2000) % 1_000_000)
            out = np.empty((ids.size, 2), np.float32)
            hit = c.get(ids, out)
            assert np.array_equal(out[hit, 0], ids[hit].astype(np.float32))  # never a wrong row
            c.put(ids[~hit], _rows(ids[~hit], 2))
        rates[policy] = c.report()["hit_rate"]
    assert rates["tinylfu"] > rates["lru"] > 0.1, rates


def test_invalidate_and_drop_range_forget_rows():
    c = RowCache(64, 4, np.float32)
    ids = np.array([1, 2, 50, 51])
    c.put(ids, _rows(ids))
    c.invalidate(np.array([2, 2, 99]))
    c.drop_range(50, 51)
    assert c.get(ids, np.empty((4, 4), np.float32)).tolist() == [True, False, False, True]
    assert c.report()["invalidated"] == 2


def test_bad_sizes_and_policies_are_refused():
    with pytest.raises(ValueError, match="policy 'fifo'"):
        RowCache(8, 4, np.float32, policy="fifo")
    with pytest.raises(ValueError, match="holds no row"):
        RowCache.for_bytes(10, 4, np.float32)
    assert RowCache.for_bytes(1 << 20, 4, np.float32).capacity > 30_000


@pytest.fixture
def two(tiny_layout):
    c = Cluster(tiny_layout, 2)
    yield c
    c.stop()


def test_a_caching_client_serves_the_same_rows_and_fewer_bytes(two, tiny_layout):
    ids = np.random.default_rng(1).integers(0, tiny_layout.total_rows, size=(8, 40))
    with EngramClient(two.addresses, tiny_layout) as plain, \
            EngramClient(two.addresses, tiny_layout, cache_bytes=1 << 20) as cached:
        want = plain.lookup(ids)
        assert np.array_equal(cached.lookup(ids), want)          # all misses
        served = sum(s.counters["rows_served"] for s in two.shards)
        assert np.array_equal(cached.lookup(ids), want)          # all hits: no call at all
        u = cached.prefetch_unique(ids).result(10)
        assert np.array_equal(u.expand(), want)
        assert sum(s.counters["rows_served"] for s in two.shards) == served
        st = cached.stats()
    n_unique = np.unique(ids).size
    assert st["cache"]["hits"] == 2 * n_unique and st["cache"]["misses"] == n_unique
    assert st["bytes_received"] == n_unique * 16 * 4 and st["bytes_saved"] == 2 * n_unique * 16 * 4
    assert plain.stats()["cache"] is None


def test_a_push_through_the_caching_client_is_never_served_stale(two, tiny_layout):
    ids = np.arange(0, tiny_layout.total_rows, 7)
    with EngramClient(two.addresses, tiny_layout, cache_bytes=1 << 20) as cached, \
            EngramClient(two.addresses, tiny_layout) as plain:
        cached.lookup(ids)
        in_flight = cached.prefetch(ids)     # may land before or after the push
        cached.push_gradients(ids[:5], np.ones((5, 16), np.float32))
        in_flight.result(10)
        assert np.array_equal(cached.lookup(ids), plain.lookup(ids))
        assert cached.stats()["cache"]["invalidated"] >= 5


def test_a_row_put_twice_is_held_once_and_forgotten_at_once():
    c = RowCache(64, 4, np.float32)
    c.put(np.array([5, 6]), _rows([5, 6]))
    c.put(np.array([5]), _rows([50]))                     # e.g. two lookups that both missed 5
    assert c.report()["rows"] == 2
    out = np.empty((1, 4), np.float32)
    assert c.get(np.array([5]), out).tolist() == [True] and out[0, 0] == 5
    c.invalidate(np.array([5]))
    assert c.get(np.array([5]), out).tolist() == [False]


def test_own_pushes_forget_only_their_rows_and_concurrent_misses_hold_one_copy(two, tiny_layout):
    ids = np.arange(0, tiny_layout.total_rows, 5)
    x = np.array([7])
    with EngramClient(two.addresses, tiny_layout, cache_bytes=1 << 20) as cached, \
            EngramClient(two.addresses, tiny_layout) as plain:
        for f in cached.prefetch_many([ids, x, x, x]):    # concurrent lookups that all miss 7
            f.result(10)
        held = cached.stats()["cache"]["rows"]
        assert held == ids.size + 1                        # 7 once, however many missed it
        cached.push_gradients(np.array([0, 7]), np.ones((2, 16), np.float32))
        after = cached.stats()["cache"]
        assert after["rows"] == held - 2                   # the pushed rows, not the shards' others
        assert np.array_equal(cached.lookup(np.array([0, 7, 5])), plain.lookup(np.array([0, 7, 5])))
        assert cached.stats()["cache"]["hits"] > after["hits"]  # 5 still came from the cache


def test_another_writers_push_drops_that_shards_cached_rows(two, tiny_layout):
    """Another node's client pushes: the caching client's next lookup that reaches the shard
    sees its rows version move and drops the shard's rows; from the lookup after that on,
    every row is fresh."""
    half = two.shards[1].row_start
    a, b = np.array([half + 1, half + 2]), np.array([half + 3])
    with EngramClient(two.addresses, tiny_layout, cache_bytes=1 << 20) as cached, \
            EngramClient(two.addresses, tiny_layout) as other:
        cached.lookup(a)
        other.push_gradients(a, np.ones((2, 16), np.float32))
        cached.lookup(np.concatenate([a, b]))          # b misses: the answer shows the push
        assert cached.stats()["cache"]["invalidated"] >= 2
        assert np.array_equal(cached.lookup(a), other.lookup(a))


def test_describe_reports_what_share_of_each_table_lookups_read(two, tiny_layout):
    ids = np.random.default_rng(3).integers(0, tiny_layout.total_rows, size=3000)
    with EngramClient(two.addresses, tiny_layout) as client:
        client.lookup(ids)
        client.lookup(ids[:100])
        d = client.describe()
    seen = np.unique(ids)
    assert sum(s["reads"] for s in d) == seen.size + np.unique(ids[:100]).size  # deduped before the wire
    for s in d:
        assert sum(t["rows"] for t in s["table_use"]) == s["row_stop"] - s["row_start"]
        here = seen[(seen >= s["row_start"]) & (seen < s["row_stop"])]
        assert sum(t["touched"] for t in s["table_use"]) == pytest.approx(here.size, rel=0.05)
        assert 0 < s["reads_top1pct_share"] <= s["reads_top10pct_share"] <= 1


def test_rows_of_a_quiet_shard_are_checked_again_after_the_max_age(two, tiny_layout):
    """Lookups that only hit never ask the shard: after ``cache_max_age_s`` without an answer
    from it, its rows are fetched again, so another writer's push is seen within that age."""
    a = np.array([1, 2, 3])
    with EngramClient(two.addresses, tiny_layout, cache_bytes=1 << 20, cache_max_age_s=2.0) as cached, \
            EngramClient(two.addresses, tiny_layout) as other:
        cached.lookup(a)
        other.push_gradients(a, np.ones((3, 16), np.float32))
        stale = cached.lookup(a)                          # within the age: served from the cache
        assert not np.array_equal(stale, other.lookup(a))
        time.sleep(2.1)
        assert np.array_equal(cached.lookup(a), other.lookup(a))


def test_a_restore_moves_the_rows_version(two, tiny_layout):
    shard = two.shards[0]
    before = shard.snapshot()
    with EngramClient(two.addresses, tiny_layout, cache_bytes=1 << 20) as cached:
        cached.lookup(np.array([1, 2]))
        v = shard.rows_version
        cached.push_gradients(np.array([1]), np.ones((1, 16), np.float32))
        shard.restore(before)                             # an operator's recover, a replica's join
        assert shard.rows_version == v + 2
        cached.lookup(np.array([1, 2, 4]))                # 4 misses: the answer shows the restore
        assert np.array_equal(cached.lookup(np.array([1, 2])), shard.gather(np.array([1, 2])))
