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
