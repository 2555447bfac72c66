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


def _client_threads() -> int:
    """Threads of this process but the shard's own (its pools' threads are named after it)."""
    return sum(not t.name.startswith("shard") for t in threading.enumerate())


def test_ended_streams_leave_no_thread_behind(tiny_layout):
    with _client(tiny_layout) as (client, address):
        assert client.lookup_unique_now(np.array([1])) is not None
        time.sleep(0.2)
        with_one_stream = _client_threads()  # its reader, gRPC's sender and the channel's poller
        for i in range(10):  # each ended by a cancel, then replaced
            client._streams._streams[address]._call.cancel()
            time.sleep(0.05)
            assert client.lookup_unique_now(np.array([i])) is not None
        deadline = time.monotonic() + 5
        while _client_threads() > with_one_stream and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _client_threads() == with_one_stream
        assert client.stats()["lookups_direct_failed"] == 0


def _first_lookups_hang(layout, seconds: float, times: int = 1):
    """A shard whose next ``times`` lookups (once armed) take ``seconds``; (server, address, arm)."""
    from engram_ray.rpc.servicer import ShardServicer
    shard = TableShard.create(layout, 1, 0, StoreConfig())
    servicer = ShardServicer(shard, 64 << 20)
    real, left = servicer._lookup, [0]

    def lookup(request, context, t0, *limit):
        if left[0] > 0:
            left[0] -= 1
            time.sleep(seconds)
        return real(request, context, t0, *limit)
    servicer._lookup = lookup
    server, port = create_server(shard, "127.0.0.1", 0, servicer=servicer)

    def arm() -> None:
        left[0] = times
    return server, f"127.0.0.1:{port}", arm


def test_a_late_answer_is_never_taken_for_the_next_lookup(tiny_layout, monkeypatch):
    from engram_ray.client import transfers
    monkeypatch.setattr(transfers, "DIRECT_COOL_DOWN_S", 0.0)
    server, address, arm = _first_lookups_hang(tiny_layout, transfers.DIRECT_TIMEOUT_S + 0.3)
    try:
        with EngramClient([address], tiny_layout, timeout=30) as client:
            want = client.lookup(np.array([7]))
            assert client.lookup_unique_now(np.array([3])) is not None
            arm()
            assert client.lookup_unique_now(np.array([4])) is None  # timed out: the full path's
            time.sleep(0.5)  # row 4's answer arrives late, on the stream that timed out
            got = client.lookup_unique_now(np.array([7]))
            assert got is not None and np.array_equal(got.expand(), want)  # its own row, not 4's
    finally:
        server.stop(0)


def test_a_stream_cancelled_during_a_lookup_falls_back_to_a_call_without_barring_streams(tiny_layout):
    server, address, arm = _first_lookups_hang(tiny_layout, 0.3)
    try:
        with EngramClient([address], tiny_layout, timeout=30) as client:
            want = client.lookup(np.array([5]))
            assert client.lookup_unique_now(np.array([1])) is not None
            stream = client._streams._streams[address]
            arm()
            threading.Timer(0.1, stream._call.cancel).start()  # mid-lookup, as a shard's stop does
            got = client.lookup_unique_now(np.array([5]))
            assert got is not None and np.array_equal(got.expand(), want)  # by a call, in time
            st = client.stats()
            assert st["lookups_streamed"] == 1 and st["lookups_direct_failed"] == 0
            assert address not in client._streams._refused  # no 30 s without streams
            assert client.lookup_unique_now(np.array([6])) is not None
            assert client.stats()["lookups_streamed"] == 2  # a new stream at once
    finally:
        server.stop(0)


def test_a_stream_closed_between_the_look_and_the_lock_is_not_used(tiny_layout):
    """Another thread's lookup times out and closes the stream (its late answer left in the
    queue) just after this lookup saw the stream open and just before it takes the lock."""
    from engram_ray.rpc.generated import engram_pb2 as pb
    with _client(tiny_layout) as (client, address):
        want = client.lookup(np.array([7]))
        assert client.lookup_unique_now(np.array([3])) is not None
        s = client._streams._streams[address]
        real_lock = s.lock

        class ClosingLock:  # the other thread's timeout lands inside this thread's acquire
            def acquire(self, blocking=True):
                if s.alive:
                    s.close()
                    s._answers.put(pb.LookupResponse())  # a late answer nobody asked for here
                return real_lock.acquire(blocking)

            def release(self):
                real_lock.release()
        s.lock = ClosingLock()
        got = client.lookup_unique_now(np.array([7]))
        assert got is not None and np.array_equal(got.expand(), want)
        assert client._streams._streams[address] is not s and client.stats()["lookups_direct_failed"] == 0


def _lying_stream_shard(layout, answers):
    """A shard whose LookupStream answers as ``answers(servicer, requests, context)`` says (its
    Lookup is honest); (server, address)."""
    from engram_ray.rpc.servicer import ShardServicer
    shard = TableShard.create(layout, 1, 0, StoreConfig())
    servicer = ShardServicer(shard, 64 << 20)
    servicer.LookupStream = lambda requests, context: answers(servicer, requests, context)
    server, port = create_server(shard, "127.0.0.1", 0, servicer=servicer)
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("lie", ["twice", "unasked"])
def test_a_shard_out_of_step_on_its_stream_never_gives_wrong_rows(tiny_layout, lie, monkeypatch):
    from engram_ray.client import transfers

    def twice(servicer, requests, context):  # every answer sent two times
        for r in requests:
            a = servicer._lookup(r, context, 0.0)[0]
            yield a
            yield a

    def unasked(servicer, requests, context):  # an answer before any request
        yield servicer._lookup(_request_for(servicer, [9]), context, 0.0)[0]
        for r in requests:
            yield servicer._lookup(r, context, 0.0)[0]
    monkeypatch.setattr(transfers, "DIRECT_COOL_DOWN_S", 0.0)
    server, address = _lying_stream_shard(tiny_layout, twice if lie == "twice" else unasked)
    try:
        with EngramClient([address], tiny_layout) as client:
            for i in range(10):
                ids = np.array([2 * i + 1, 2 * i + 2])
                got = client.lookup_unique_now(ids)
                assert got is None or np.array_equal(got.expand(), client.lookup(ids))  # never another's
            assert client.stats()["lookups_direct_failed"] >= 1  # the stream was caught out of step
    finally:
        server.stop(0)


def _request_for(servicer, ids):
    from engram_ray.rpc import codec
    from engram_ray.rpc.generated import engram_pb2 as pb
    return pb.LookupRequest(fingerprint=servicer.shard.fingerprint, row_ids=codec.encode(np.asarray(ids, np.int64)))


def test_a_shard_flooding_its_stream_cannot_grow_the_clients_memory(tiny_layout):
    def flood(servicer, requests, context):  # answers as fast as it can, none asked
        a = servicer._lookup(_request_for(servicer, np.arange(4000)), context, 0.0)[0]  # 256 KB each
        while context.is_active():
            yield a
    server, address = _lying_stream_shard(tiny_layout, flood)
    try:
        with EngramClient([address], tiny_layout) as client:
            assert client.lookup_unique_now(np.array([1])) is None  # out of step: the full path's
            stream = client._streams._streams.get(address)  # closed, and its reader took one answer
            time.sleep(0.5)  # while the shard goes on sending
            assert stream is None or (not stream.alive and stream._answers.qsize() <= 2)
            assert client.lookup(np.array([1])).shape == (1, 16)
    finally:
        server.stop(0)
