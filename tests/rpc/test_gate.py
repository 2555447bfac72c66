"""Unauthenticated traffic against a shard in its own process, as an attacker would send it:
calls whose body never arrives, large bodies without a token, health checks that never finish.
None of it may hold a handler thread, grow the shard's memory, or delay an authenticated call
or a health check."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram_ray.rpc import codec
from engram_ray.rpc.generated import engram_pb2 as pb
from engram_ray.rpc.generated import engram_pb2_grpc as pb_grpc

TOKEN = "gate-test-token-0123456789"
GOOD = (("authorization", f"Bearer {TOKEN}"),)
HERE = Path(__file__).resolve().parent


@pytest.fixture
def shard_process():
    """(address, pid) of a shard with 4 handler threads and at most 16 calls at once."""
    proc = subprocess.Popen([sys.executable, str(HERE / "shard_process.py"), TOKEN, "4", "16"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("PORT "), line
    yield f"127.0.0.1:{int(line.split()[1])}", proc.pid
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _served_well(address: str, fingerprint: str) -> float:
    """Seconds an authenticated lookup, a Describe and a health check took together."""
    t0 = time.perf_counter()
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.EngramMemoryStub(ch)
        rows = stub.Lookup(pb.LookupRequest(fingerprint=fingerprint, row_ids=codec.encode(np.arange(4))),
                           timeout=5, metadata=GOOD)
        assert list(rows.rows.shape) == [4, 16]
        assert stub.Describe(pb.DescribeRequest(), timeout=5, metadata=GOOD).state == "serving"
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    return time.perf_counter() - t0


def test_calls_whose_body_never_arrives_starve_nothing(shard_process):
    address, _ = shard_process
    with grpc.insecure_channel(address) as ch:
        fp = pb_grpc.EngramMemoryStub(ch).Describe(pb.DescribeRequest(), timeout=5, metadata=GOOD).fingerprint
    never = threading.Event()

    def stalled():  # headers sent, then nothing: the body never comes
        never.wait()
        yield b""

    attacker = grpc.insecure_channel(address)
    held = []
    methods = ["/engram.v1.EngramMemory/Lookup", "/engram.v1.EngramMemory/ApplyGradients",
               "/engram.v1.EngramMemory/Save", "/engram.v1.EngramMemory/Describe",
               "/engram.v1.EngramPeer/Forward", "/grpc.health.v1.Health/Check"]
    try:
        for i in range(60):  # 15 times the shard's handler threads
            call = attacker.stream_unary(methods[i % len(methods)])
            held.append(call.future(stalled(), timeout=60))
        for _ in range(10):  # health watchers, snapshot and lookup streams that never send a request
            for m in ("/grpc.health.v1.Health/Watch", "/engram.v1.EngramPeer/Snapshot",
                      "/engram.v1.EngramMemory/LookupStream"):
                held.append(attacker.stream_stream(m)(stalled(), timeout=60))
        time.sleep(0.5)
        for _ in range(5):
            assert _served_well(address, fp) < 2.0
        # every one was answered at once, without waiting for its body: data and peer calls
        # refused, health checks answered, watchers turned away
        assert all(f.done() for f in held[:60])
        for i, f in enumerate(held[:60]):
            if "Health" in methods[i % len(methods)]:
                assert health_pb2.HealthCheckResponse.FromString(f.result()).status == \
                    health_pb2.HealthCheckResponse.SERVING
            else:
                assert f.exception().code() == grpc.StatusCode.UNAUTHENTICATED
        codes = [s.code() for s in held[60:]]
        assert codes == [grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED,
                         grpc.StatusCode.UNAUTHENTICATED] * 10
    finally:
        never.set()
        attacker.close()


def test_large_unauthenticated_bodies_are_not_read_into_memory(shard_process):
    address, pid = shard_process
    with grpc.insecure_channel(address) as ch:
        fp = pb_grpc.EngramMemoryStub(ch).Describe(pb.DescribeRequest(), timeout=5, metadata=GOOD).fingerprint
    body = b"\x00" * (8 << 20)  # under the 64 MiB message limit
    before = _rss(pid)
    opts = [("grpc.max_send_message_length", 64 << 20)]
    channels = [grpc.insecure_channel(address, options=opts) for _ in range(8)]
    try:
        calls = [ch.unary_unary("/engram.v1.EngramMemory/ApplyGradients").future(body, timeout=30)
                 for ch in channels for _ in range(6)]  # 48 x 8 MiB = 384 MiB sent
        peak = before
        while not all(c.done() for c in calls):
            peak = max(peak, _rss(pid))
            time.sleep(0.01)
        peak = max(peak, _rss(pid))
        codes = {c.exception().code() for c in calls}
        assert codes <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE,
                         grpc.StatusCode.CANCELLED}, codes
        assert grpc.StatusCode.UNAUTHENTICATED in codes
    finally:
        for ch in channels:
            ch.close()
    grew = peak - before
    assert grew < 48 << 20, f"the shard grew by {grew / 2**20:.0f} MiB reading bodies it then refused"
    assert _served_well(address, fp) < 2.0
