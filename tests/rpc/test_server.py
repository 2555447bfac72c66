"""Real gRPC servers on loopback: round trips, and every malformed request kind gets its
status code while the table stays exactly as it was and the server keeps serving."""

import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram_ray.config import OptimizerConfig, StoreConfig
from engram_ray.rpc import SERVICE_NAME, codec, create_server
from engram_ray.rpc.generated import engram_pb2 as pb
from engram_ray.rpc.generated import engram_pb2_grpc as pb_grpc
from engram_ray.store import TableShard

ROOT = Path(__file__).resolve().parents[2]
MAX_MSG = 256 * 1024
MAX_IDS = 15_000
TOKEN = "test-token-0123456789"
GOOD = (("authorization", f"Bearer {TOKEN}"),)


class AuthedStub:
    """The generated stub, sending the service's token unless a call passes its own metadata."""

    def __init__(self, channel):
        self._stub = pb_grpc.EngramMemoryStub(channel)

    def __getattr__(self, method):
        rpc = getattr(self._stub, method)
        return lambda request, metadata=GOOD, **kw: rpc(request, metadata=metadata, **kw)


def test_generated_code_is_fresh():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_rpc_and_field_is_commented():
    lines = (ROOT / "protos" / "engram" / "v1" / "engram.proto").read_text().splitlines()
    decl = re.compile(r"^\s*(rpc \w+|(repeated )?\w+ \w+ = \d+;)")
    for i, line in enumerate(lines):
        if decl.match(line):
            assert lines[i - 1].strip().startswith("//"), f"uncommented: {line.strip()}"


@pytest.fixture
def served(tiny_layout, tmp_path):
    shard = TableShard.create(tiny_layout, 2, 1, StoreConfig(optimizer=OptimizerConfig(kind="sgd", lr=0.1)))
    (tmp_path / "saves").mkdir()
    (tmp_path / "saves" / "afile").write_text("not a directory")
    server, port = create_server(shard, "127.0.0.1", 0, max_message_bytes=MAX_MSG, token=TOKEN,
                                 max_ids_per_request=MAX_IDS, save_root=str(tmp_path / "saves"))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_send_message_length", 4 * MAX_MSG), ("grpc.max_receive_message_length", 4 * MAX_MSG)])
    yield shard, AuthedStub(channel), channel
    channel.close()
    server.stop(0)


def _ids(a):
    return codec.encode(np.asarray(a, dtype=np.int64))


def test_health_is_serving(served):
    _, _, channel = served
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        assert stub.Check(health_pb2.HealthCheckRequest(service=name)).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_lookup_round_trip_equals_gather(served):
    shard, stub, _ = served
    ids = np.array([shard.row_start + 5, shard.row_stop - 1, shard.row_start + 5])
    resp = stub.Lookup(pb.LookupRequest(fingerprint=shard.fingerprint, row_ids=_ids(ids)))
    rows = codec.decode(resp.rows, what="rows", dtypes=("float32",), ndim=2)
    assert np.array_equal(rows, shard.gather(ids))
    d = stub.Describe(pb.DescribeRequest())
    assert (d.row_start, d.row_stop, d.dim, d.dtype, d.num_shards) == \
        (shard.row_start, shard.row_stop, 16, "float32", 2)
    assert d.counters.lookups >= 1 and d.max_message_bytes == MAX_MSG
    assert d.counters.lookup_seconds > 0 and d.counters.bytes_served == rows.nbytes


def test_empty_batch_is_an_empty_answer(served):
    shard, stub, _ = served
    resp = stub.Lookup(pb.LookupRequest(fingerprint=shard.fingerprint, row_ids=_ids([])))
    assert list(resp.rows.shape) == [0, 16]
    r = stub.ApplyGradients(pb.ApplyGradientsRequest(fingerprint=shard.fingerprint, row_ids=_ids([]),
                                                     grads=codec.encode(np.zeros((0, 16), np.float32))))
    assert r.rows_updated == 0


def _malformed(shard):
    fp, lo, hi, dim = shard.fingerprint, shard.row_start, shard.row_stop, shard.dim
    good_ids = _ids([lo, lo + 1])
    good_g = codec.encode(np.ones((2, dim), np.float32))
    LK, AG = "Lookup", "ApplyGradients"
    IA, FP, RE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                  grpc.StatusCode.RESOURCE_EXHAUSTED)
    big = np.arange(10_000) % (hi - lo) + lo  # 80 KB of ids in, 640 KB of rows out
    many = _ids(np.full(MAX_IDS + 1, lo))  # 120 KB: under the message limit, over the id limit
    UA = grpc.StatusCode.UNAUTHENTICATED
    bad_g = lambda a: pb.ApplyGradientsRequest(fingerprint=fp, row_ids=good_ids, grads=codec.encode(a))  # noqa: E731
    lk = lambda ids: pb.LookupRequest(fingerprint=fp, row_ids=ids)  # noqa: E731
    raw = lambda dtype, shape, data: pb.Array(dtype=dtype, shape=shape, data=data)  # noqa: E731
    ag = lambda grads, ids=good_ids: pb.ApplyGradientsRequest(fingerprint=fp, row_ids=ids, grads=grads)  # noqa: E731
    return {
        "wrong fingerprint": (LK, pb.LookupRequest(fingerprint="engram-0000", row_ids=good_ids), FP, "serves"),
        "missing fingerprint": (LK, pb.LookupRequest(row_ids=good_ids), FP, "request is for table layout ''"),
        "id below range": (LK, lk(_ids([lo - 1])), IA, f"row id {lo - 1} is outside"),
        "id above range": (LK, lk(_ids([hi])), IA, f"row id {hi} is outside"),
        "negative id": (LK, lk(_ids([-5])), IA, "row id -5"),
        "truncated bytes": (LK, lk(raw("int64", [2], b"\0" * 15)), IA, "truncated or padded"),
        "padded bytes": (LK, lk(raw("int64", [1], b"\0" * 9)), IA, "truncated or padded"),
        "ids as float32": (LK, lk(codec.encode(np.array([1.0], np.float32))), IA, "dtype 'float32'; expected int64"),
        "unknown dtype": (LK, lk(raw("int128", [1], b"\0" * 16)), IA, "dtype 'int128'"),
        "ids 2-D": (LK, lk(raw("int64", [1, 1], b"\0" * 8)), IA, "has 2 dims; expected 1"),
        "negative dim": (LK, lk(raw("int64", [-1], b"")), IA, "negative dimension"),
        "missing ids": (LK, pb.LookupRequest(fingerprint=fp), IA, "dtype ''"),
        "response too large": (LK, lk(_ids(big)), RE, "split the request"),
        "request too large": (LK, lk(_ids(np.full(40_000, lo))), RE, ""),
        "grads NaN": (AG, bad_g(np.full((2, dim), np.nan, np.float32)), IA, "not finite"),
        "grads Inf": (AG, bad_g(np.full((2, dim), -np.inf, np.float32)), IA, "not finite"),
        "grads shape": (AG, bad_g(np.ones((3, dim), np.float32)), IA, r"shape \(3, 16\)"),
        "grads width": (AG, bad_g(np.ones((2, dim + 1), np.float32)), IA, r"expected \(2, 16\)"),
        "grads int64": (AG, bad_g(np.ones((2, dim), np.int64)), IA, "dtype 'int64'"),
        "grads 1-D": (AG, bad_g(np.ones(2 * dim, np.float32)), IA, "has 1 dims; expected 2"),
        "grads truncated": (AG, ag(raw("float32", [2, dim], b"\0" * 7)), IA, "truncated"),
        "grads wrong fingerprint": (AG, pb.ApplyGradientsRequest(fingerprint="x", row_ids=good_ids, grads=good_g),
                                    FP, "serves"),
        "grads id out of range": (AG, ag(good_g, _ids([lo, hi])), IA, "is outside"),
        "save without directory": ("Save", pb.SaveRequest(), IA, "directory is empty"),
        "save into a file": ("Save", pb.SaveRequest(directory="afile/x"), IA, "symlink or not a directory"),
        "save outside the save root": ("Save", pb.SaveRequest(directory="/proc/version/x"), IA,
                                       "not inside the service's save root"),
        "save above the save root": ("Save", pb.SaveRequest(directory="../escape"), IA, "without '..'"),
        "request id too long": (AG, pb.ApplyGradientsRequest(fingerprint=fp, row_ids=good_ids, grads=good_g,
                                                             request_id="x" * 129), IA, "at most 128 bytes"),
        "request id not printable": (AG, pb.ApplyGradientsRequest(fingerprint=fp, row_ids=good_ids, grads=good_g,
                                                                  request_id="a\nb"), IA, "printable ASCII"),
        "lookup without token": (LK, pb.LookupRequest(fingerprint=fp, row_ids=good_ids), UA, "no token", ()),
        "lookup with a wrong token": (LK, pb.LookupRequest(fingerprint=fp, row_ids=good_ids), UA, "a wrong token",
                                      (("authorization", "Bearer guess"),)),
        "push without token": (AG, pb.ApplyGradientsRequest(fingerprint=fp, row_ids=good_ids, grads=good_g), UA,
                               "no token", ()),
        "save without token": ("Save", pb.SaveRequest(directory="/tmp"), UA, "no token", ()),
        "token without Bearer": (LK, pb.LookupRequest(fingerprint=fp, row_ids=good_ids), UA, "a wrong token",
                                 (("authorization", TOKEN),)),
        "too many ids": (LK, pb.LookupRequest(fingerprint=fp, row_ids=many), RE, f"limit of {MAX_IDS} ids"),
        "push of too many ids": (AG, pb.ApplyGradientsRequest(fingerprint=fp, row_ids=many, grads=good_g), RE,
                                 f"limit of {MAX_IDS} ids"),
        "grads NaN in float16": (AG, bad_g(np.full((2, dim), np.nan, np.float16)), IA, "not finite"),
        "grads with 2-D ids": (AG, pb.ApplyGradientsRequest(fingerprint=fp, row_ids=pb.Array(
            dtype="int64", shape=[1, 2], data=b"\0" * 16), grads=good_g), IA, "has 2 dims; expected 1"),
        "grads Inf in one element": (AG, bad_g(np.where(np.eye(2, dim) > 0, np.inf, 1.0).astype(np.float32)), IA,
                                     "not finite"),
        "grads negative id": (AG, pb.ApplyGradientsRequest(fingerprint=fp, row_ids=_ids([-1, lo]), grads=good_g), IA,
                              "row id -1"),
    }


@pytest.mark.parametrize("kind", list(_malformed(TableShard(fingerprint="f", row_start=10, row_stop=20, dim=16))))
def test_malformed_requests_get_their_status_and_change_nothing(served, kind):
    shard, stub, _ = served
    method, request, code, pattern, *metadata = _malformed(shard)[kind]
    before, rejected = shard.checksum(), shard.counters["rejected"]
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, method)(request, timeout=10, metadata=metadata[0] if metadata else GOOD)
    assert e.value.code() == code, e.value.details()
    assert re.search(pattern, e.value.details()), e.value.details()
    assert not [k for k, _ in e.value.trailing_metadata() or () if k.startswith("engram-")]  # no signal
    assert shard.checksum() == before
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or pattern:  # gRPC itself refuses oversized requests
        assert shard.counters["rejected"] == rejected + 1
    # the server keeps serving
    ok = stub.Lookup(pb.LookupRequest(fingerprint=shard.fingerprint, row_ids=_ids([shard.row_start])))
    assert list(ok.rows.shape) == [1, 16]


@pytest.mark.parametrize("method", ["Lookup", "ApplyGradients", "Save"])
def test_garbage_protobuf_is_refused_and_the_server_lives(served, method):
    shard, stub, channel = served
    raw = channel.unary_unary(f"/engram.v1.EngramMemory/{method}", request_serializer=None,
                              response_deserializer=None)
    before = shard.checksum()
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\xff\xff\xff\xff\x0f garbage", timeout=10, metadata=GOOD)
    assert e.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    ok = stub.Lookup(pb.LookupRequest(fingerprint=shard.fingerprint, row_ids=_ids([shard.row_start])))
    assert list(ok.rows.shape) == [1, 16] and shard.checksum() == before


def test_an_unknown_method_is_unimplemented(served):
    shard, stub, channel = served
    raw = channel.unary_unary("/engram.v1.EngramMemory/DropTable", request_serializer=None,
                              response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        raw(b"", timeout=10, metadata=GOOD)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_too_many_calls_at_once_are_refused_and_the_shard_serves_on(tiny_layout):
    """Bounded concurrency: beyond max_concurrent_rpcs a call gets RESOURCE_EXHAUSTED at once."""
    import threading
    shard = TableShard.create(tiny_layout, 1, 0)
    gate = threading.Event()
    gather = shard.gather
    shard.gather = lambda ids, out=None: (gate.wait(10), gather(ids, out))[1]
    server, port = create_server(shard, "127.0.0.1", 0, token=TOKEN, max_concurrent_rpcs=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = AuthedStub(channel)
    try:
        req = pb.LookupRequest(fingerprint=shard.fingerprint, row_ids=_ids([1]))
        raw = pb_grpc.EngramMemoryStub(channel)
        held = [raw.Lookup.future(req, metadata=GOOD, timeout=20) for _ in range(2)]  # both wait in gather
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as e:
            stub.Lookup(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Concurrent RPC limit exceeded" in e.value.details()
        assert ("engram-signal", "busy") in tuple(e.value.trailing_metadata())  # what clients act on
        gate.set()
        assert all(list(f.result().rows.shape) == [1, 16] for f in held)
        assert stub.Lookup(req, timeout=10).rows.shape == [1, 16]  # serving again
    finally:
        gate.set()
        channel.close()
        server.stop(0)


def test_remote_gradients_equal_the_same_step_applied_locally(served, tiny_layout):
    shard, stub, _ = served
    local = TableShard.create(tiny_layout, 2, 1, shard.store)
    ids = np.array([shard.row_start + 3, shard.row_start + 1, shard.row_start + 3])
    g = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    r = stub.ApplyGradients(pb.ApplyGradientsRequest(fingerprint=shard.fingerprint, row_ids=_ids(ids),
                                                     grads=codec.encode(g)))
    assert r.rows_updated == 2 and r.update_count == 1
    local.apply_gradients(ids, g)
    assert shard.checksum() == local.checksum()


def test_save_over_rpc_writes_a_loadable_checkpoint(served, tiny_layout, tmp_path):
    shard, stub, _ = served
    resp = stub.Save(pb.SaveRequest(directory="ckpt/one"))
    where = tmp_path / "saves" / "ckpt" / "one"
    assert resp.sha256 == shard.checksum() and Path(resp.header_path).parent == where
    # the other half of the table, then reload as one shard
    TableShard.create(tiny_layout, 2, 0, shard.store).save(where)
    back = TableShard.load(where, tiny_layout, 1, 0, shard.store)
    assert np.array_equal(back.values[shard.row_start:], shard.values)
    # an absolute path inside the root is the same place
    assert stub.Save(pb.SaveRequest(directory=str(where))).header_path == resp.header_path


def test_describe_reports_a_capped_table(tiny_layout):
    shard = TableShard.create(tiny_layout, 1, 0, StoreConfig(resident_rows_per_shard=100))
    server, port = create_server(shard, "127.0.0.1", 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            d = pb_grpc.EngramMemoryStub(ch).Describe(pb.DescribeRequest())
        assert (d.resident_rows, d.row_stop - d.row_start, d.optimizer) == (100, tiny_layout.total_rows, "none")
    finally:
        server.stop(0)


def test_a_retried_push_is_applied_once_on_a_single_copy(served, tiny_layout):
    """R=1 too: the shard remembers the ids of the pushes it applied (dedup_window_s)."""
    shard, stub, _ = served
    req = pb.ApplyGradientsRequest(fingerprint=shard.fingerprint, row_ids=_ids([shard.row_start + 2]),
                                   grads=codec.encode(np.ones((1, 16), np.float32)), request_id="client-1")
    assert stub.ApplyGradients(req).rows_updated == 1
    once = shard.checksum()
    assert stub.ApplyGradients(req).rows_updated == 1  # the retry: answered, not applied
    assert shard.checksum() == once and shard.counters["updates"] == 1


def test_bfloat16_and_float16_gradients_are_applied_over_the_wire(served, tiny_layout):
    import ml_dtypes
    shard, stub, _ = served
    local = TableShard.create(tiny_layout, 2, 1, shard.store)
    g = np.random.default_rng(1).normal(size=(2, 16)).astype(np.float32)
    ids = np.array([shard.row_start + 4, shard.row_start + 8])
    for dt, name in ((ml_dtypes.bfloat16, "bfloat16"), (np.float16, "float16")):
        r = stub.ApplyGradients(pb.ApplyGradientsRequest(fingerprint=shard.fingerprint, row_ids=_ids(ids),
                                                         grads=codec.encode(g.astype(dt), name)))
        assert r.rows_updated == 2
        local.apply_gradients(ids, g.astype(dt).astype(np.float32))
    assert shard.checksum() == local.checksum()
