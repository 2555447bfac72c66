"""LookupStream: each request answered exactly as Lookup answers it, the first error ending
the stream with Lookup's status; streams limited, on threads of their own, with a bounded
deadline -- tried from outside as a client (and an attacker holding streams open) would."""

import queue
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from engram_ray.rpc import codec, create_server, wire
from engram_ray.rpc.generated import engram_pb2 as pb
from engram_ray.rpc.generated import engram_pb2_grpc as pb_grpc
from engram_ray.store import TableShard

from .test_gate import GOOD, HERE, TOKEN, _served_well

STREAM = "/engram.v1.EngramMemory/LookupStream"


@pytest.fixture
def served(tiny_layout):
    shard = TableShard.create(tiny_layout, 1, 0)
    server, port = create_server(shard, "127.0.0.1", 0, token=TOKEN)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield pb_grpc.EngramMemoryStub(ch), shard.fingerprint
    server.stop(0)


def _request(fp: str, ids) -> pb.LookupRequest:
    return pb.LookupRequest(fingerprint=fp, row_ids=codec.encode(np.asarray(ids, np.int64)))


def test_a_stream_answers_each_request_as_lookup_does(served):
    stub, fp = served
    asks = [[1, 2, 3], [7], [5, 5, 9, 0]]
    answers = list(stub.LookupStream(iter([_request(fp, a) for a in asks]), timeout=30, metadata=GOOD))
    assert len(answers) == len(asks)
    for a, got in zip(asks, answers):
        want = stub.Lookup(_request(fp, a), timeout=5, metadata=GOOD)
        assert got.rows == want.rows and got.update_count == want.update_count  # byte for byte
    # each streamed request is counted as a call is (once its answer has left)
    deadline = time.monotonic() + 5
    while True:
        c = stub.Describe(pb.DescribeRequest(), timeout=5, metadata=GOOD).counters
        if c.bytes_served == 2 * 8 * 16 * 4 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert c.bytes_served == 2 * 8 * 16 * 4 and c.lookups == 6 and c.rows_served == 16


def test_a_stream_needs_a_deadline_within_the_limit(served):
    stub, fp = served
    # (3600 s, give or take gRPC's rounding)
    for timeout, said in ((None, "no deadline"), (wire.MAX_STREAM_S * 6, "a deadline 36")):
        with pytest.raises(grpc.RpcError) as e:
            list(stub.LookupStream(iter([_request(fp, [1])]), timeout=timeout, metadata=GOOD))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"within {wire.MAX_STREAM_S:.0f} s" in e.value.details() and said in e.value.details()


def test_the_first_bad_request_ends_the_stream_with_lookups_status(served):
    stub, fp = served
    asks = [_request(fp, [1]), _request("another-layout", [2]), _request(fp, [3])]
    got = []
    with pytest.raises(grpc.RpcError) as e:
        for answer in stub.LookupStream(iter(asks), timeout=30, metadata=GOOD):
            got.append(answer)
    assert len(got) == 1 and e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another-layout" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # ids outside the shard: INVALID_ARGUMENT, as Lookup's
        list(stub.LookupStream(iter([_request(fp, [-1])]), timeout=30, metadata=GOOD))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Lookup(_request(fp, [1]), timeout=5, metadata=GOOD).rows == got[0].rows  # still serving


def test_a_stream_without_the_token_is_refused(served):
    stub, fp = served
    for md in (None, (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as e:
            list(stub.LookupStream(iter([_request(fp, [1])]), timeout=30, metadata=md))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
def two_stream_shard():
    """(address, fingerprint) of a shard in its own process: 1 handler thread, 2 streams."""
    proc = subprocess.Popen([sys.executable, str(HERE / "shard_process.py"), TOKEN, "1", "16", "2"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("PORT "), line
    address = f"127.0.0.1:{int(line.split()[1])}"
    with grpc.insecure_channel(address) as ch:
        fp = pb_grpc.EngramMemoryStub(ch).Describe(pb.DescribeRequest(), timeout=5, metadata=GOOD).fingerprint
    yield address, fp
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_streams_held_open_are_limited_and_never_take_the_calls_thread(two_stream_shard):
    address, fp = two_stream_shard
    ch = grpc.insecure_channel(address)
    try:
        # two authenticated streams that are opened and never send: every stream slot held
        stop = threading.Event()

        def silent():  # no request until the test ends
            stop.wait()
            yield from ()
        held = [ch.stream_stream(STREAM)(silent(), timeout=60, metadata=GOOD) for _ in range(2)]
        time.sleep(0.5)
        # the shard's one call thread is free: calls are served as quickly as ever
        assert _served_well(address, fp) < 2.0
        # a third stream is refused at once, with the busy signal (the client uses Lookup)
        stub = pb_grpc.EngramMemoryStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.LookupStream(iter([_request(fp, [1])]), timeout=30, metadata=GOOD))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert wire.signal_of(e.value).name == wire.BUSY
        # a stream that ends gives its slot back: a new one is answered
        held[0].cancel()
        deadline = time.monotonic() + 5
        while True:
            try:
                answers = list(stub.LookupStream(iter([_request(fp, [1])]), timeout=30, metadata=GOOD))
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)
        assert len(answers) == 1 and list(answers[0].rows.shape) == [1, 16]
        stop.set()
        held[1].cancel()
    finally:
        ch.close()


def test_a_shard_without_streams_refuses_them_and_serves_calls(tiny_layout):
    shard = TableShard.create(tiny_layout, 1, 0)
    server, port = create_server(shard, "127.0.0.1", 0, max_lookup_streams=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.EngramMemoryStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.LookupStream(iter([_request(shard.fingerprint, [1])]), timeout=30))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.Lookup(_request(shard.fingerprint, [1]), timeout=5).rows.shape == [1, 16]
    finally:
        server.stop(0)


def test_requests_on_one_stream_are_answered_in_order_as_they_come(served):
    stub, fp = served
    q: queue.SimpleQueue = queue.SimpleQueue()
    answers = stub.LookupStream(iter(q.get, None), timeout=30, metadata=GOOD)
    for ids in ([3], [4, 5], [6, 7, 8]):  # one at a time, each answered before the next goes
        q.put(_request(fp, ids))
        assert list(next(answers).rows.shape) == [len(ids), 16]
    q.put(None)
    assert list(answers) == []


def _slow_first_lookup(layout, seconds: float, **server_kw):
    """A shard (in this process) whose first lookup takes ``seconds``; (server, stub, fingerprint)."""
    from engram_ray.rpc.servicer import ShardServicer
    shard = TableShard.create(layout, 1, 0)
    servicer = ShardServicer(shard, 64 << 20)
    real, slow = servicer._lookup, [True]

    def lookup(request, context, t0, *limit):
        if slow[0]:
            slow[0] = False
            time.sleep(seconds)
        return real(request, context, t0, *limit)
    servicer._lookup = lookup
    server, port = create_server(shard, "127.0.0.1", 0, servicer=servicer, **server_kw)
    return server, pb_grpc.EngramMemoryStub(grpc.insecure_channel(f"127.0.0.1:{port}")), shard.fingerprint


def test_a_streams_slot_is_held_until_its_thread_is_done(tiny_layout):
    server, stub, fp = _slow_first_lookup(tiny_layout, 1.0, max_lookup_streams=1)
    try:
        q: queue.SimpleQueue = queue.SimpleQueue()
        first = stub.LookupStream(iter(q.get, None), timeout=30)
        q.put(_request(fp, [1]))
        time.sleep(0.3)
        first.cancel()  # the call ends while its thread is still inside the slow lookup
        q.put(None)
        time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as e:  # refused at once, not queued behind that thread
            list(stub.LookupStream(iter([_request(fp, [2])]), timeout=30))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        deadline = time.monotonic() + 5
        while True:  # once the thread is done, the slot is free again
            try:
                assert len(list(stub.LookupStream(iter([_request(fp, [2])]), timeout=30))) == 1
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        server.stop(0)


def test_an_open_stream_does_not_hold_the_servers_stop(tiny_layout):
    shard = TableShard.create(tiny_layout, 1, 0)
    server, port = create_server(shard, "127.0.0.1", 0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        q: queue.SimpleQueue = queue.SimpleQueue()
        answers = pb_grpc.EngramMemoryStub(ch).LookupStream(iter(q.get, None), timeout=60)
        q.put(_request(shard.fingerprint, [1]))
        next(answers)  # open, answered, and kept open (as a lookup agent keeps it)
        t = time.monotonic()
        server.stop(5).wait()
        assert time.monotonic() - t < 2.0  # not the 5 s grace: the stream was cancelled first
        with pytest.raises(grpc.RpcError) as e:
            next(answers)
        assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        q.put(None)


def test_every_streamed_lookup_is_counted_even_when_cancelled_right_after(served):
    stub, fp = served
    before = stub.Describe(pb.DescribeRequest(), timeout=5, metadata=GOOD).counters
    for i in range(40):  # each stream cancelled as soon as its answer is in
        q: queue.SimpleQueue = queue.SimpleQueue()
        answers = stub.LookupStream(iter(q.get, None), timeout=30, metadata=GOOD)
        q.put(_request(fp, [i % 8]))
        next(answers)
        answers.cancel()
        q.put(None)
    deadline = time.monotonic() + 5
    while True:
        c = stub.Describe(pb.DescribeRequest(), timeout=5, metadata=GOOD).counters
        if c.bytes_served - before.bytes_served == 40 * 16 * 4 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert c.lookups - before.lookups == 40 and c.bytes_served - before.bytes_served == 40 * 16 * 4


def test_answers_echo_their_requests_seq_and_stay_small_on_a_stream(served):
    stub, fp = served
    asks = [_request(fp, [1]), _request(fp, [2, 3]), _request(fp, [4])]
    for i, r in enumerate(asks):
        r.seq = 10 + i
    got = list(stub.LookupStream(iter(asks), timeout=30, metadata=GOOD))
    assert [a.seq for a in got] == [10, 11, 12]
    assert stub.Lookup(asks[1], timeout=5, metadata=GOOD).seq == 11
    big = _request(fp, np.ones(wire.MAX_STREAM_ANSWER_BYTES // 64 + 1, np.int64))  # rows of 16 float32
    with pytest.raises(grpc.RpcError) as e:
        list(stub.LookupStream(iter([big]), timeout=30, metadata=GOOD))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "send it by Lookup" in e.value.details()
