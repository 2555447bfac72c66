"""A client's direct lookups ride a LookupStream per shard: the same rows as a call, a call
where no stream serves (a shard without streams, a busy stream, one that ended), and a
stream replaced before its deadline."""

import contextlib
import threading
import time

import numpy as np
import pytest

from engram_ray.client import EngramClient
from engram_ray.client import streams as streams_mod
from engram_ray.config import StoreConfig
from engram_ray.rpc import create_server, wire
from engram_ray.store import TableShard


@contextlib.contextmanager
def _client(layout, token: str | None = None, **server_kw):
    """(an EngramClient, its one shard's address), the shard served here with ``server_kw``."""
    shard = TableShard.create(layout, 1, 0, StoreConfig())
    server, port = create_server(shard, "127.0.0.1", 0, token=token, **server_kw)
    address = f"127.0.0.1:{port}"
    try:
        with EngramClient([address], layout, token=token) as client:
            yield client, address
    finally:
        server.stop(0)


def test_direct_lookups_go_on_the_stream_with_the_rows_of_a_call(tiny_layout):
    with _client(tiny_layout, token="stream-token") as (client, address):
        for ids in (np.array([[5, 9, 5], [1, 2, 9]]), np.array([7]), np.arange(40)):
            want = client.prefetch_unique(ids).result(10)   # the I/O thread's calls
            got = client.lookup_unique_now(ids)
            assert got is not None and np.array_equal(got.ids, want.ids)
            assert np.array_equal(got.inverse, want.inverse)
            assert np.array_equal(got.rows.view(np.uint8), want.rows.view(np.uint8))  # bit-identical
        st = client.stats()
        assert st["lookups_streamed"] == st["lookups_direct"] == 3 and st["lookups_direct_failed"] == 0


def test_a_shard_that_refuses_streams_is_served_by_calls_and_not_asked_again(tiny_layout):
    with _client(tiny_layout, max_lookup_streams=0) as (client, address):
        for _ in range(3):
            assert client.lookup_unique_now(np.array([3, 4])) is not None
        st = client.stats()
        assert st["lookups_direct"] == 3 and st["lookups_streamed"] == 0
        assert client._streams._refused[address] > time.monotonic()  # no new stream for a while


def test_a_busy_stream_leaves_the_lookup_to_a_call(tiny_layout):
    with _client(tiny_layout) as (client, address):
        assert client.lookup_unique_now(np.array([1])) is not None
        stream = client._streams._streams[address]
        with stream.lock:  # another connection's lookup holds the stream
            got = client.lookup_unique_now(np.array([2]))
        assert got is not None and client.stats()["lookups_streamed"] == 1
        assert client.lookup_unique_now(np.array([3])) is not None
        assert client.stats()["lookups_streamed"] == 2


def test_an_ended_stream_is_replaced_and_none_runs_into_its_deadline(tiny_layout, monkeypatch):
    monkeypatch.setattr(streams_mod, "RENEW_BEFORE_S", 0.5)
    with _client(tiny_layout) as (client, address):
        client._streams = streams_mod.LookupStreams(client._sync, None, lifetime=1.0)
        assert client.lookup_unique_now(np.array([1])) is not None
        first = client._streams._streams[address]
        time.sleep(0.6)  # within RENEW_BEFORE_S of its deadline: the next lookup opens another
        assert client.lookup_unique_now(np.array([2])) is not None
        second = client._streams._streams[address]
        assert second is not first and not first.alive
        second.close()  # ended under the client (as a shard's restart would)
        assert client.lookup_unique_now(np.array([3])) is not None
        assert client._streams._streams[address] is not second
        assert client.stats()["lookups_streamed"] == 3 and client.stats()["lookups_direct_failed"] == 0


def test_stream_lifetimes_outside_the_shards_limit_are_refused(tiny_layout):
    with pytest.raises(ValueError, match="at most"):
        streams_mod.LookupStreams(None, None, lifetime=wire.MAX_STREAM_S + 1)  # type: ignore[arg-type]


def test_threads_share_a_clients_streams_safely(tiny_layout):
    with _client(tiny_layout) as (client, address):
        want = {i: client.lookup(np.array([i, i + 1])) for i in range(8)}
        errors = []

        def worker(i):
            try:
                for _ in range(20):
                    u = client.lookup_unique_now(np.array([i, i + 1]))
                    assert u is not None and np.array_equal(u.expand(), want[i])
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors
        st = client.stats()
        assert st["lookups_direct"] == 160 and 0 < st["lookups_streamed"] <= 160


def test_a_stream_in_use_is_never_closed_under_its_lookup(tiny_layout):
    with _client(tiny_layout) as (client, address):
        assert client.lookup_unique_now(np.array([1])) is not None
        stream = client._streams._streams[address]
        with stream.lock:  # another thread's lookup, on a stream now due for replacing
            stream.ends_at = time.monotonic()
            assert client.lookup_unique_now(np.array([2])) is not None  # a call
            assert stream.alive and client._streams._streams[address] is stream
        assert client.lookup_unique_now(np.array([3])) is not None  # now it is replaced
        assert client._streams._streams[address] is not stream and not stream.alive


def test_ended_streams_leave_no_thread_behind(tiny_layout):
    with _client(tiny_layout) as (client, address):
        assert client.lookup_unique_now(np.array([1])) is not None
        time.sleep(0.2)
        before = threading.active_count()
        for i in range(10):  # each ended by the shard's side (a cancel), then replaced
            client._streams._streams[address]._call.cancel()
            time.sleep(0.05)
            assert client.lookup_unique_now(np.array([i])) is not None
        deadline = time.monotonic() + 5
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before
        assert client.stats()["lookups_direct_failed"] == 0
