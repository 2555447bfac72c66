"""EngramClient against real gRPC servers on loopback."""

import asyncio
import socket

import numpy as np
import pytest

from engram_ray.client import EngramClient
from engram_ray.config import OptimizerConfig, StoreConfig
from engram_ray.errors import AuthError, FingerprintMismatch, InvalidRequest, ShardUnavailable
from engram_ray.rpc import create_server
from engram_ray.store import TableShard

STORE = StoreConfig(optimizer=OptimizerConfig(kind="adam", lr=0.05))


class Cluster:
    def __init__(self, layout, n, store=STORE, max_message_bytes=64 << 20, **server_kw):
        self.shards = [TableShard.create(layout, n, i, store) for i in range(n)]
        self.servers = [create_server(s, "127.0.0.1", 0, max_message_bytes=max_message_bytes, **server_kw)
                        for s in self.shards]
        self.addresses = [f"127.0.0.1:{p}" for _, p in self.servers]

    def stop(self):
        for srv, _ in self.servers:
            srv.stop(0)


@pytest.fixture
def two(tiny_layout):
    c = Cluster(tiny_layout, 2)
    yield c
    c.stop()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_lookup_equals_in_process_gather_for_any_shard_count(tiny_layout, n):
    c = Cluster(tiny_layout, n)
    try:
        full = TableShard.create(tiny_layout, 1, 0, STORE)
        ids = np.random.default_rng(n).integers(0, tiny_layout.total_rows, size=(4, 33, 2))
        with EngramClient(c.addresses, tiny_layout) as client:
            rows = client.lookup(ids)
        assert rows.shape == (4, 33, 2, 16) and rows.dtype == np.float32
        assert np.array_equal(rows, full.gather(ids.ravel()).reshape(rows.shape))
    finally:
        c.stop()


def test_dedup_is_reported_and_each_unique_row_fetched_once(two, tiny_layout):
    ids = np.array([[5, 5, 5, 9000 % tiny_layout.total_rows, 5]])
    with EngramClient(two.addresses, tiny_layout) as client:
        p = client.prefetch(ids)
        rows = p.result(timeout=10)
        assert p.done() and p.fetch_seconds > 0
        s = client.stats()
    assert np.array_equal(rows[0, 0], rows[0, 4])
    assert s["ids"] == 5 and s["unique_ids"] == 2 and s["dedup_ratio"] == pytest.approx(0.4)
    served = sum(sh.counters["rows_served"] for sh in two.shards)
    assert served == 2
    assert s["latency_p50_ms"] > 0 and s["bytes_received"] == 2 * 16 * 4
    assert set(s["io_seconds"]) == {"dedup", "encode", "in_flight", "decode"}
    assert s["io_seconds"]["in_flight"] > 0


def test_prefetch_returns_before_the_rows_and_reads_its_ids_once(two, tiny_layout):
    """The caller's array may be reused at once: the client works on its own copy."""
    ids = np.arange(50)
    with EngramClient(two.addresses, tiny_layout) as client:
        want = client.lookup(ids)
        p = client.prefetch(ids)
        ids[:] = 7  # the caller reuses its buffer while the lookup is in flight
        assert np.array_equal(p.result(timeout=10), want)
        client.close()
        with pytest.raises(RuntimeError, match="closed"):
            client.prefetch([1])


def test_a_timeout_names_the_lookup_and_the_rows_still_arrive(tiny_layout):
    import threading
    c = Cluster(tiny_layout, 1)
    gate = threading.Event()
    gather = c.shards[0].gather
    c.shards[0].gather = lambda ids, out=None: (gate.wait(10), gather(ids, out))[1]  # a slow shard
    try:
        with EngramClient(c.addresses, tiny_layout, timeout=20) as client:
            p = client.prefetch([0, 1, 2])
            with pytest.raises(TimeoutError, match="lookup of 3 ids: not complete after 0.2 s"):
                p.result(timeout=0.2)
            gate.set()
            assert p.result(timeout=10).shape == (3, 16)  # a timed-out wait does not cancel
    finally:
        gate.set()
        c.stop()


def test_requests_above_the_message_limit_are_chunked(tiny_layout):
    c = Cluster(tiny_layout, 2, max_message_bytes=16 * 1024)  # ~190 rows per message
    try:
        ids = np.arange(tiny_layout.total_rows)
        with EngramClient(c.addresses, tiny_layout, max_message_bytes=16 * 1024) as client:
            rows = client.lookup(ids)
            assert client.max_rows_per_message < 300
        full = TableShard.create(tiny_layout, 1, 0, STORE)
        assert np.array_equal(rows, full.values)
        assert sum(s.counters["lookups"] for s in c.shards) > 2 * (tiny_layout.total_rows // 2 // 300)
    finally:
        c.stop()


def test_pushed_gradients_equal_the_same_step_locally(two, tiny_layout):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tiny_layout.total_rows, size=(8, 40, 4))
    ids[0, :5] = 17  # duplicates, summed before the step
    g = rng.normal(size=ids.shape + (16,)).astype(np.float32)
    local = TableShard.create(tiny_layout, 1, 0, STORE)
    with EngramClient(two.addresses, tiny_layout) as client:
        n = client.push_gradients(ids, g)
        local.apply_gradients(ids.ravel(), g.reshape(-1, 16))
        assert n == np.unique(ids).size
        assert np.array_equal(client.lookup(np.arange(tiny_layout.total_rows)), local.values)


@pytest.mark.asyncio
async def test_async_forms(two, tiny_layout):
    ids = np.arange(100)
    with EngramClient(two.addresses, tiny_layout) as client:
        a, b = await asyncio.gather(client.alookup(ids), client.alookup(ids[::-1]))
        assert np.array_equal(a[::-1], b)
        n = await client.apush_gradients(ids, np.ones((100, 16), np.float32))
        assert n == 100
        after = await client.alookup(ids)
        assert not np.array_equal(after, a)


def test_bad_input_is_refused_before_any_call(two, tiny_layout):
    with EngramClient(two.addresses, tiny_layout) as client:
        with pytest.raises(InvalidRequest, match=f"row id {tiny_layout.total_rows} is outside"):
            client.lookup([1, tiny_layout.total_rows])
        with pytest.raises(InvalidRequest, match="integers"):
            client.lookup([1.5])
        with pytest.raises(InvalidRequest, match="NaN or Inf"):
            client.push_gradients([1], np.full((1, 16), np.nan))
        with pytest.raises(InvalidRequest, match=r"expected \(2, 16\)"):
            client.push_gradients([1, 2], np.zeros((2, 8)))
    assert all(s.counters["rejected"] == 0 for s in two.shards)


def test_wrong_layout_is_refused_at_connect(two, tiny_layout):
    import dataclasses
    other = dataclasses.replace(tiny_layout, seed=99)
    with pytest.raises(FingerprintMismatch, match="this client hashes for"):
        EngramClient(two.addresses, other)
    with pytest.raises(Exception, match="out of order"):
        EngramClient(two.addresses[::-1], tiny_layout)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_shard_is_named(two, tiny_layout):
    dead = f"127.0.0.1:{_free_port()}"
    with pytest.raises(ShardUnavailable, match=f"shard 1 at {dead} is unavailable"):
        EngramClient([two.addresses[0], dead], tiny_layout, connect_timeout=1)
    client = EngramClient(two.addresses, tiny_layout, timeout=1, retries=2, backoff=0.01)
    two.servers[1][0].stop(0)
    with pytest.raises(ShardUnavailable, match=f"shard 1 at {two.addresses[1]} is unavailable") as e:
        client.lookup([0, tiny_layout.total_rows - 1])
    assert e.value.shard == 1 and e.value.address == two.addresses[1]
    assert client.stats()["retries"] == 2
    assert client.lookup([0]).shape == (1, 16)  # the live shard still answers
    client.close()


def test_a_token_service_refuses_clients_without_it(tiny_layout):
    c = Cluster(tiny_layout, 2, token="s3cret-token")
    try:
        with pytest.raises(AuthError, match="no token"):
            EngramClient(c.addresses, tiny_layout)
        with pytest.raises(AuthError, match="a wrong token"):
            EngramClient(c.addresses, tiny_layout, token="guess")
        with EngramClient(c.addresses, tiny_layout, token="s3cret-token") as client:
            assert client.lookup([1, 2]).shape == (2, 16)
            assert client.push_gradients([1], np.ones((1, 16), np.float32)) == 1
            assert client.save.__doc__  # Save is guarded too (tested in tests/rpc)
    finally:
        c.stop()


def test_the_client_splits_by_the_shards_id_limit(tiny_layout):
    c = Cluster(tiny_layout, 1, max_ids_per_request=100)
    try:
        with EngramClient(c.addresses, tiny_layout) as client:
            assert client.max_rows_per_message == 100
            ids = np.arange(1000)
            assert np.array_equal(client.lookup(ids), c.shards[0].gather(ids))
            assert client.push_gradients(ids, np.ones((1000, 16), np.float32)) == 1000
        assert c.shards[0].counters["rejected"] == 0 and c.shards[0].counters["lookups"] >= 11
    finally:
        c.stop()


def _self_signed(tmp_path):
    import subprocess
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=engram-test", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert.read_bytes(), key.read_bytes()


def test_tls_service(tiny_layout, tmp_path):
    import shutil
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = _self_signed(tmp_path)
    c = Cluster(tiny_layout, 2, token="t", tls=(cert, key))
    try:
        with EngramClient(c.addresses, tiny_layout, token="t", tls_ca=cert) as client:
            assert np.array_equal(client.lookup([3]), c.shards[0].gather([3]))
        with pytest.raises(ShardUnavailable):  # plaintext to a TLS port: no handshake
            EngramClient(c.addresses, tiny_layout, token="t", connect_timeout=2)
    finally:
        c.stop()


def test_a_shard_that_moved_is_found_through_the_resolver(tiny_layout):
    c = Cluster(tiny_layout, 2)
    where = list(c.addresses)
    try:
        client = EngramClient(c.addresses, tiny_layout, timeout=2, retries=1, backoff=0.01,
                              resolver=lambda: list(where), recover_timeout=20)
        want = client.lookup(np.arange(tiny_layout.total_rows))
        c.servers[1][0].stop(0)  # shard 1 dies ...
        server, port = create_server(c.shards[1], "127.0.0.1", 0)  # ... and comes back elsewhere
        c.servers[1] = (server, port)
        where[1] = f"127.0.0.1:{port}"
        assert np.array_equal(client.lookup(np.arange(tiny_layout.total_rows)), want)
        assert client.stats()["re_resolved"] == 1 and client.addresses[1] == where[1]
        client.close()
    finally:
        c.stop()


# A shard that lies (issue 11 #12): every answer is checked against the layout, and a bad one
# is the project's error that names the shard, never wrong rows or a bare ValueError.
class _Liar:
    """A real server whose servicer changes one answer; ``patch(servicer)`` does it."""

    def __init__(self, layout, patch, copies=1):
        from engram_ray.rpc.servicer import ShardServicer
        self.shard = TableShard.create(layout, 1, 0, STORE)
        self.servicer = ShardServicer(self.shard, 64 << 20)
        patch(self.servicer)
        self.server, port = create_server(self.shard, "127.0.0.1", 0, servicer=self.servicer)
        self.addresses = [f"127.0.0.1:{port}"] * copies

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.stop(0)


def _describe_with(**change):
    def patch(servicer):
        real = servicer.Describe

        def describe(request, context):
            d = real(request, context)
            for k, v in change.items():
                setattr(d, k, v)
            return d
        servicer.Describe = describe
    return patch


@pytest.mark.parametrize("change,match", [
    (dict(dtype="int64"), "dtype 'int64'"), (dict(dtype=""), "dtype ''"),
    (dict(dim=15), "dim 15"), (dict(max_message_bytes=0), "max_message_bytes 0"),
    (dict(max_ids_per_request=-5), "max_ids_per_request -5")])
def test_a_shard_that_describes_itself_wrongly_is_refused_at_connect(tiny_layout, change, match):
    from engram_ray.errors import EngramError
    with _Liar(tiny_layout, _describe_with(**change)) as liar:
        with pytest.raises(EngramError, match=match):
            EngramClient(liar.addresses, tiny_layout)


@pytest.mark.parametrize("rows_updated,update_count", [(-1, 1), (10**6, 1), (1, -3)])
def test_a_push_answer_that_cannot_be_is_an_error(tiny_layout, rows_updated, update_count):
    from engram_ray.errors import EngramError
    from engram_ray.rpc.generated import engram_pb2 as pb

    def patch(servicer):
        servicer.ApplyGradients = lambda request, context: pb.ApplyGradientsResponse(
            rows_updated=rows_updated, update_count=update_count)
    with _Liar(tiny_layout, patch) as liar, EngramClient(liar.addresses, tiny_layout) as client:
        with pytest.raises(EngramError, match=f"rows_updated={rows_updated}"):
            client.push_gradients(np.array([1, 2]), np.ones((2, 16), np.float32))


def test_lookup_rows_of_another_dtype_or_shape_are_an_error_not_data(tiny_layout):
    from engram_ray.errors import EngramError
    from engram_ray.rpc import codec
    from engram_ray.rpc.generated import engram_pb2 as pb

    huge = [pb.Array(dtype="float32", shape=shape, data=b"") for shape in ([2**33, 2**31], [2**62, 4])]
    for rows in [codec.encode(np.zeros((3, 16), np.int64)), codec.encode(np.zeros((3, 8), np.float32)), *huge]:
        def patch(servicer, rows=rows):
            servicer.Lookup = lambda request, context: pb.LookupResponse(rows=rows)
        with _Liar(tiny_layout, patch) as liar, EngramClient(liar.addresses, tiny_layout) as client:
            with pytest.raises(EngramError, match="shard 0") as e:
                client.lookup(np.array([1, 2, 3]))
            assert not isinstance(e.value, InvalidRequest)


# Replication signals are structured (rpc/wire.py): the client acts on the trailing metadata
# alone, checked, and never on the text of the details.
def _refuse_pushes_with(code, metadata, details="replica 1 is a backup; primary=1 at 127.0.0.1:1"):
    def patch(servicer):
        def refuse(request, context):
            context.set_trailing_metadata(metadata)
            context.abort(code, details)
        servicer.ApplyGradients = refuse
    return patch


def _push_one(client):
    return client.push_gradients(np.array([1]), np.ones((1, 16), np.float32))


@pytest.mark.parametrize("primary", ["", "abc", "-1", "2", "7", "99999999999999999999", "01", " 1", "+1", "1.0",
                                     "0x1", None, ("0", "1")])
def test_a_malformed_primary_hint_is_an_error_naming_it(tiny_layout, primary):
    import grpc

    from engram_ray.errors import EngramError
    values = () if primary is None else (primary,) if isinstance(primary, str) else primary
    md = (("engram-signal", "not-primary"),) + tuple(("engram-primary", v) for v in values)
    patch = _refuse_pushes_with(grpc.StatusCode.FAILED_PRECONDITION, md)
    with _Liar(tiny_layout, patch, copies=2) as liar, EngramClient([liar.addresses], tiny_layout) as client:
        with pytest.raises(EngramError, match="named primary") as e:
            _push_one(client)
        assert not isinstance(e.value, ValueError)
        assert client.stats()["redirects"] == 0


def test_a_primary_that_cannot_be_sent_is_an_error_too(tiny_layout):
    """gRPC refuses to send a header value that is not printable ASCII: still our error."""
    import grpc

    from engram_ray.errors import EngramError
    for value in ("\u00b2", "\u2460", "1\n"):
        md = (("engram-signal", "not-primary"), ("engram-primary", value))
        with _Liar(tiny_layout, _refuse_pushes_with(grpc.StatusCode.FAILED_PRECONDITION, md), copies=2) as liar, \
                EngramClient([liar.addresses], tiny_layout) as client:
            with pytest.raises(EngramError) as e:
                _push_one(client)
            assert not isinstance(e.value, ValueError) and client.stats()["redirects"] == 0


@pytest.mark.parametrize("code,metadata", [
    ("FAILED_PRECONDITION", ()),  # "primary=1" in the details only: text is not a signal
    ("FAILED_PRECONDITION", (("engram-signal", "primary"), ("engram-primary", "1"))),  # not a signal we know
    ("FAILED_PRECONDITION", (("engram-signal", "not-primary"), ("engram-signal", "not-primary"),
                             ("engram-primary", "1"))),  # sent twice
    ("FAILED_PRECONDITION", (("engram-signal", "NOT-PRIMARY"), ("engram-primary", "1"))),
    ("INVALID_ARGUMENT", (("engram-signal", "not-primary"), ("engram-primary", "1"))),  # not its status
])
def test_only_a_well_formed_signal_redirects_a_push(tiny_layout, code, metadata):
    import grpc

    from engram_ray.errors import FingerprintMismatch, InvalidRequest
    status = getattr(grpc.StatusCode, code)
    with _Liar(tiny_layout, _refuse_pushes_with(status, metadata), copies=2) as liar, \
            EngramClient([liar.addresses], tiny_layout) as client:
        want = FingerprintMismatch if code == "FAILED_PRECONDITION" else InvalidRequest
        with pytest.raises(want, match="primary=1 at"):  # the details are passed on, for people
            _push_one(client)
        assert client.stats()["redirects"] == 0


def test_backups_that_keep_naming_each_other_end_in_an_error(tiny_layout):
    import grpc

    from engram_ray.errors import EngramError, FingerprintMismatch
    md = (("engram-signal", "not-primary"), ("engram-primary", "1"))
    with _Liar(tiny_layout, _refuse_pushes_with(grpc.StatusCode.FAILED_PRECONDITION, md), copies=2) as liar, \
            EngramClient([liar.addresses], tiny_layout) as client:
        with pytest.raises(EngramError, match="redirect loop") as caught:
            _push_one(client)
        assert not isinstance(caught.value, FingerprintMismatch)
        assert client.stats()["redirects"] == 8  # 4 per copy, then the refusal stands


def test_busy_is_retried_for_pushes_too_and_unreplicated_retries_the_same_copy(tiny_layout):
    """``busy`` (the gate's limit): any call is retried after a backoff, on the same copy;
    ``unreplicated``: the push is retried on the primary, not failed over."""
    import grpc
    for signal, code in (("busy", grpc.StatusCode.RESOURCE_EXHAUSTED), ("unreplicated", grpc.StatusCode.UNAVAILABLE)):
        calls = []

        def patch(servicer, signal=signal, code=code, calls=calls):
            real = servicer.ApplyGradients

            def flaky(request, context):
                calls.append(request.request_id)
                if len(calls) < 3:
                    context.set_trailing_metadata((("engram-signal", signal),))
                    context.abort(code, "try again")
                return real(request, context)
            servicer.ApplyGradients = flaky
        with _Liar(tiny_layout, patch, copies=2) as liar, \
                EngramClient([liar.addresses], tiny_layout, retries=3, backoff=0.01) as client:
            assert _push_one(client) == 1
            st = client.stats()
            assert (st["retries"], st["failovers"], st["redirects"]) == (2, 0, 0), (signal, st)
            assert len(set(calls)) == 1  # one push, retried under its request id


def test_a_shard_busy_past_the_retries_is_unavailable_not_too_large(tiny_layout):
    """``busy`` means overloaded for now: once the retries are spent the caller gets
    ShardUnavailable (retry later), not RequestTooLarge (change the request)."""
    import grpc

    from engram_ray.errors import RequestTooLarge, ShardUnavailable
    md = (("engram-signal", "busy"),)
    with _Liar(tiny_layout, _refuse_pushes_with(grpc.StatusCode.RESOURCE_EXHAUSTED, md)) as liar, \
            EngramClient([liar.addresses], tiny_layout, retries=2, backoff=0.01) as client:
        with pytest.raises(ShardUnavailable, match="busy") as caught:
            _push_one(client)
        assert not isinstance(caught.value, RequestTooLarge)
        assert client.stats()["retries"] == 2
