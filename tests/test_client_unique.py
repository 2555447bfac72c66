"""EngramClient's unique-row and caller-buffer lookups: the same rows as ``lookup``."""

import numpy as np
import pytest

from engram_ray.client import EngramClient, UniqueRows
from engram_ray.config import StoreConfig
from engram_ray.errors import InvalidRequest
from engram_ray.rpc import create_server
from engram_ray.store import TableShard


@pytest.fixture(params=["float32", "bfloat16"])
def served(tiny_layout, request):
    shards = [TableShard.create(tiny_layout, 2, i, StoreConfig(dtype=request.param)) for i in range(2)]
    servers = [create_server(s, "127.0.0.1", 0) for s in shards]
    client = EngramClient([f"127.0.0.1:{p}" for _, p in servers], tiny_layout)
    yield client
    client.close()
    for srv, _ in servers:
        srv.stop(0)


def test_unique_rows_expand_to_the_lookup(served):
    ids = np.random.default_rng(0).integers(0, 300, size=(3, 7, 4))  # many duplicates
    want = served.lookup(ids)
    u = served.prefetch_unique(ids).result(10)
    assert isinstance(u, UniqueRows) and u.shape == ids.shape
    assert np.array_equal(u.ids, np.unique(ids)) and u.rows.shape == (u.ids.size, want.shape[-1])
    assert u.inverse.dtype == np.int64 and u.inverse.shape == (ids.size,)
    assert np.array_equal(u.expand().view(np.uint8), want.view(np.uint8))  # bit-identical


def test_rows_land_in_the_callers_buffers(served):
    ids = np.array([[5, 9, 5], [1, 2, 3]])
    d = served.layout.row_dim
    buf = np.full((16, d), 7, dtype=served.dtype)
    u = served.prefetch_unique(ids, rows_out=buf).result(10)
    assert np.shares_memory(u.rows, buf) and u.rows.shape[0] == 5
    assert np.array_equal(buf[5:].view(np.uint8), np.full((11, d), 7, served.dtype).view(np.uint8))
    out = np.empty((2, 3, d), dtype=served.dtype)
    assert served.lookup_into(ids, out) is out
    assert np.array_equal(out.view(np.uint8), served.lookup(ids).view(np.uint8))
    sorted_ids = np.arange(4)  # already sorted and unique: no inverse gather inside
    assert np.array_equal(served.prefetch_unique(sorted_ids).result(10).inverse, np.arange(4))


def test_bad_output_buffers_are_refused_before_sending(served):
    d = served.layout.row_dim
    with pytest.raises(InvalidRequest, match="cannot hold"):
        served.prefetch_unique(np.arange(10), rows_out=np.empty((4, d), served.dtype))
    with pytest.raises(InvalidRequest, match="cannot hold"):
        served.lookup_into(np.arange(4), np.empty((4, d + 1), served.dtype))
    with pytest.raises(InvalidRequest, match="C-contiguous"):
        served.lookup_into(np.arange(4), np.empty((d, 8), served.dtype).T[:4])
    with pytest.raises(InvalidRequest, match="rows for 4 ids"):
        served.lookup_into(np.arange(4), np.empty((5, d), served.dtype))


def test_lookup_now_is_prefetch_uniques_answer_on_the_callers_thread(served):
    b = int(served._transfers.bounds[1])  # shard 0 owns [0, b)
    ids = np.array([[5, 9, 5], [1, b - 1, 9]])
    want = served.prefetch_unique(ids).result(10)
    before = served.stats()
    got = served.lookup_unique_now(ids)
    after = served.stats()
    assert got is not None and got.shape == ids.shape and after["lookups"] == before["lookups"] + 1
    assert after["lookups_direct"] == before["lookups_direct"] + 1
    assert np.array_equal(got.ids, want.ids) and np.array_equal(got.inverse, want.inverse)
    assert np.array_equal(got.rows.view(np.uint8), want.rows.view(np.uint8))  # bit-identical
    buf = np.zeros((8, served.width), dtype=served.dtype)
    assert np.shares_memory(served.lookup_unique_now(ids, rows_out=buf).rows, buf)
    # what it does not do, it declines (None: the caller asks prefetch_unique) ...
    assert served.lookup_unique_now(np.array([1, b])) is None            # two shards
    # ... and what is wrong it refuses, as prefetch_unique does
    with pytest.raises(InvalidRequest):
        served.lookup_unique_now(np.array([-1]))


def test_lookup_now_declines_with_a_cache_or_a_shard_down(tiny_layout):
    shards = [TableShard.create(tiny_layout, 2, i, StoreConfig()) for i in range(2)]
    servers = [create_server(s, "127.0.0.1", 0) for s in shards]
    addresses = [f"127.0.0.1:{p}" for _, p in servers]
    try:
        with EngramClient(addresses, tiny_layout, cache_bytes=1 << 20) as cached:
            assert cached.lookup_unique_now(np.array([3])) is None  # the cache is the I/O thread's
        with EngramClient(addresses, tiny_layout, chunk_bytes=1024) as small:
            n = small.max_rows_per_message
            assert small.lookup_unique_now(np.arange(n)) is not None
            assert small.lookup_unique_now(np.arange(n + 1)) is None  # two messages
        with EngramClient(addresses, tiny_layout, retries=0, timeout=2) as client:
            assert client.lookup_unique_now(np.array([3])) is not None
            servers[0][0].stop(0).wait()
            assert client.lookup_unique_now(np.array([3])) is None  # one try failed: the full path says why
    finally:
        for srv, _ in servers:
            srv.stop(0)


def test_a_hung_shard_costs_one_short_direct_try_then_none_for_a_while(tiny_layout):
    import time

    from engram_ray.client import transfers
    from engram_ray.rpc.servicer import ShardServicer

    shard = TableShard.create(tiny_layout, 1, 0, StoreConfig())
    servicer = ShardServicer(shard, 64 << 20)
    real, hang = servicer._lookup, [False]

    def lookup(request, context, t0, *limit):
        if hang[0]:
            time.sleep(transfers.DIRECT_TIMEOUT_S + 1.0)
        return real(request, context, t0, *limit)
    servicer._lookup = lookup  # a call and a stream alike
    server, port = create_server(shard, "127.0.0.1", 0, servicer=servicer)
    try:
        with EngramClient([f"127.0.0.1:{port}"], tiny_layout, timeout=30) as client:
            assert client.lookup_unique_now(np.array([3])) is not None
            hang[0] = True
            t = time.monotonic()
            assert client.lookup_unique_now(np.array([4])) is None  # not the client's 30 s
            assert time.monotonic() - t < transfers.DIRECT_TIMEOUT_S + 0.5
            t = time.monotonic()
            assert client.lookup_unique_now(np.array([4])) is None  # cooling down: not even tried
            assert time.monotonic() - t < 0.1
            assert client.stats()["lookups_direct_failed"] == 1
    finally:
        server.stop(0)
