"""Primary-backup replication on real gRPC servers (loopback): every acknowledged push is on
every replica in the same order; reads fail over at once; a retried push applies once; a
backup takes over from a dead primary; a replica rejoins by copying the primary."""

import numpy as np
import pytest

from engram_ray.client import EngramClient
from engram_ray.config import OptimizerConfig, StoreConfig
from engram_ray.errors import ShardUnavailable
from engram_ray.rpc import codec, create_server
from engram_ray.rpc.generated import engram_pb2 as pb
from engram_ray.rpc.generated import engram_pb2_grpc as pb_grpc
from engram_ray.rpc.replication import Replication, fetch_snapshot
from engram_ray.rpc.servicer import ShardServicer
from engram_ray.store import TableShard

STORE = StoreConfig(optimizer=OptimizerConfig(kind="adam", lr=0.05))


class Replicated:
    """``R`` copies of one whole-table shard, each on its own server."""

    def __init__(self, layout, copies=2):
        self.layout = layout
        self.shards = [TableShard.create(layout, 1, 0, STORE) for _ in range(copies)]
        self.servicers = [ShardServicer(s, 64 << 20) for s in self.shards]
        self.servers = [create_server(s, "127.0.0.1", 0, servicer=v) for s, v in zip(self.shards, self.servicers)]
        self.addresses = [f"127.0.0.1:{p}" for _, p in self.servers]
        for r, v in enumerate(self.servicers):
            v.replication = Replication(r, self.addresses, timeout=2)

    def stop(self, r):
        self.servers[r][0].stop(0)

    def close(self):
        for srv, _ in self.servers:
            srv.stop(0)


@pytest.fixture
def pair(tiny_layout):
    c = Replicated(tiny_layout)
    yield c
    c.close()


def _push(client, layout, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, layout.total_rows, size=(4, 30))
    g = rng.normal(size=ids.shape + (16,)).astype(np.float32)
    return ids, g, client.push_gradients(ids, g)


def test_every_acknowledged_push_is_on_every_replica(pair, tiny_layout):
    replay = TableShard.create(tiny_layout, 1, 0, STORE)
    with EngramClient([pair.addresses], tiny_layout) as client:
        for seed in range(5):
            ids, g, _ = _push(client, tiny_layout, seed)
            replay.apply_gradients(ids.reshape(-1), g.reshape(-1, 16))
        d = client.describe()[0]
    assert pair.shards[0].checksum() == pair.shards[1].checksum() == replay.checksum()
    assert d["role"] == "primary" and d["backups"] == [pair.addresses[1]]


def test_a_retried_push_is_applied_once_everywhere(pair, tiny_layout):
    stub = pb_grpc.EngramMemoryStub(__import__("grpc").insecure_channel(pair.addresses[0]))
    req = pb.ApplyGradientsRequest(fingerprint=pair.shards[0].fingerprint, row_ids=codec.encode(np.array([3, 4])),
                                   grads=codec.encode(np.ones((2, 16), np.float32)), request_id="c-1")
    stub.ApplyGradients(req, timeout=5)
    once = pair.shards[0].checksum()
    stub.ApplyGradients(req, timeout=5)  # the same id again: a retry
    assert pair.shards[0].checksum() == once == pair.shards[1].checksum()
    assert pair.shards[0].counters["updates"] == pair.shards[1].counters["updates"] == 1


def test_reads_fail_over_at_once_and_a_backup_takes_over_pushes(pair, tiny_layout):
    with EngramClient([pair.addresses], tiny_layout, timeout=2, retries=1) as client:
        ids = np.arange(tiny_layout.total_rows)
        want = client.lookup(ids)
        pair.stop(0)  # the primary dies
        for _ in range(20):  # a stream of lookups: none fails
            assert np.array_equal(client.lookup(ids), want)
        assert client.stats()["failovers"] >= 1
        _push(client, tiny_layout, 7)  # replica 1 finds the primary dead and takes over
        assert pair.servicers[1].replication.role == "primary"
        assert not np.array_equal(client.lookup(ids), want)


def test_a_dead_backup_is_dropped_and_pushes_go_on(pair, tiny_layout):
    pair.stop(1)
    with EngramClient([pair.addresses], tiny_layout, timeout=2, retries=1, backoff=0.01) as client:
        _push(client, tiny_layout, 1)
        assert pair.servicers[0].replication.in_sync == set()
        assert client.describe()[0]["backups"] == []


def test_a_slow_backup_fails_the_push_until_it_catches_up(pair, tiny_layout):
    import threading
    gate = threading.Event()
    apply = pair.shards[1].apply_gradients
    pair.shards[1].apply_gradients = lambda ids, g: (gate.wait(10), apply(ids, g))[1]
    pair.servicers[0].replication.timeout = 0.3
    with EngramClient([pair.addresses], tiny_layout, timeout=5, retries=0) as client:
        with pytest.raises(ShardUnavailable, match="not on every replica"):
            _push(client, tiny_layout, 1)  # applied on the primary, not acknowledged
        gate.set()
        ids, g, _ = _push(client, tiny_layout, 2)
    assert pair.servicers[0].replication.in_sync == {1}  # slow is not dead
    assert pair.shards[0].counters["updates"] == 2


def test_a_replica_rejoins_by_copying_the_primary(pair, tiny_layout):
    with EngramClient([pair.addresses], tiny_layout) as client:
        _push(client, tiny_layout, 1)
        pair.stop(1)  # a backup dies ...
        fresh = TableShard.create(tiny_layout, 1, 0, STORE)  # ... and comes back with nothing
        servicer = ShardServicer(fresh, 64 << 20)
        server, port = create_server(fresh, "127.0.0.1", 0, servicer=servicer)
        pair.servers[1] = (server, port)
        arrays, primary = fetch_snapshot(pair.addresses[0], fresh.fingerprint, 1, f"127.0.0.1:{port}",
                                         store_dtype="float32")
        assert primary == 0 and set(arrays) == {"rows", "adam_m", "adam_v", "adam_steps", "applied"}
        fresh.values[...] = arrays["rows"]
        fresh.optimizer.load_state(arrays)
        servicer.replication = Replication(1, [pair.addresses[0], f"127.0.0.1:{port}"])
        assert fresh.checksum() == pair.shards[0].checksum()
        _push(client, tiny_layout, 2)  # forwarded to the new copy now
        assert fresh.checksum() == pair.shards[0].checksum()
        assert np.array_equal(fresh.optimizer.steps, pair.shards[0].optimizer.steps)


def test_a_restarted_primary_copies_its_follower_which_takes_over(pair, tiny_layout):
    with EngramClient([pair.addresses], tiny_layout) as client:
        _push(client, tiny_layout, 1)
    pair.stop(0)  # the primary dies before any push reached its backup alone
    fresh = TableShard.create(tiny_layout, 1, 0, STORE)
    servicer = ShardServicer(fresh, 64 << 20)
    servicer.ready = False  # a rejoining copy serves nothing until it has the rows
    server, port = create_server(fresh, "127.0.0.1", 0, servicer=servicer)
    pair.servers[0] = (server, port)
    me = f"127.0.0.1:{port}"
    arrays, primary = fetch_snapshot(pair.addresses[1], fresh.fingerprint, 0, me, store_dtype="float32")
    assert primary == 1 and pair.servicers[1].replication.role == "primary"  # the follower took over
    fresh.values[...] = arrays["rows"]
    fresh.optimizer.load_state(arrays)
    repl = Replication(0, [me, pair.addresses[1]])
    repl.primary = primary
    servicer.replication, servicer.ready = repl, True
    with EngramClient([[me, pair.addresses[1]]], tiny_layout) as client:
        _push(client, tiny_layout, 2)  # to replica 0 first: a backup now, it names the primary
        assert client.stats()["redirects"] == 1
    assert fresh.checksum() == pair.shards[1].checksum()


def test_a_push_in_the_copied_rows_is_not_applied_again_when_it_is_retried(pair, tiny_layout):
    """The primary applied a push but could not forward it (the joiner was still copying);
    the joiner's copy already holds it, so the retry must not apply it a second time."""
    import grpc
    fresh = TableShard.create(tiny_layout, 1, 0, STORE)  # replica 1 restarts with nothing
    pair.stop(1)
    servicer = ShardServicer(fresh, 64 << 20)
    servicer.ready = False
    server, port = create_server(fresh, "127.0.0.1", 0, servicer=servicer)
    pair.servers[1] = (server, port)
    me = f"127.0.0.1:{port}"
    pair.servicers[0].replication.join(1, me)  # the primary forwards to the new address
    stub = pb_grpc.EngramMemoryStub(grpc.insecure_channel(pair.addresses[0]))
    req = pb.ApplyGradientsRequest(fingerprint=fresh.fingerprint, row_ids=codec.encode(np.array([5, 9])),
                                   grads=codec.encode(np.ones((2, 16), np.float32)), request_id="c-7")
    with pytest.raises(grpc.RpcError) as e:
        stub.ApplyGradients(req, timeout=5)  # applied on the primary, not on the syncing copy
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "not on every replica" in e.value.details()
    arrays, primary = fetch_snapshot(pair.addresses[0], fresh.fingerprint, 1, me, store_dtype="float32")
    assert ("c-7", 2) in arrays["applied"]
    fresh.values[...] = arrays["rows"]
    fresh.optimizer.load_state(arrays)
    repl = Replication(1, [pair.addresses[0], me])
    repl.seed(arrays["applied"])
    servicer.replication, servicer.ready = repl, True
    assert stub.ApplyGradients(req, timeout=5).rows_updated == 2  # the retry: acknowledged now
    assert fresh.checksum() == pair.shards[0].checksum()  # applied once on each copy
    assert fresh.counters["updates"] == 0 and pair.shards[0].counters["updates"] == 1


def test_a_copy_back_at_its_old_address_gets_every_later_push(pair, tiny_layout):
    """The primary's channel to a dead copy sits in gRPC's reconnect backoff; when the copy
    rejoins at the same address it must be forwarded to, not dropped again."""
    port = int(pair.addresses[1].rsplit(":", 1)[1])
    with EngramClient([pair.addresses], tiny_layout, timeout=2) as client:
        pair.stop(1)
        _push(client, tiny_layout, 1)  # the dead copy is dropped; the channel backs off
        assert pair.servicers[0].replication.in_sync == set()
        fresh = TableShard.create(tiny_layout, 1, 0, STORE)
        servicer = ShardServicer(fresh, 64 << 20)
        servicer.ready = False
        pair.servers[1] = create_server(fresh, "127.0.0.1", port, servicer=servicer)  # same address
        arrays, primary = fetch_snapshot(pair.addresses[0], fresh.fingerprint, 1, pair.addresses[1],
                                         store_dtype="float32")
        fresh.values[...] = arrays["rows"]
        fresh.optimizer.load_state(arrays)
        repl = Replication(1, list(pair.addresses))
        repl.primary = primary
        repl.seed(arrays["applied"])
        servicer.replication, servicer.ready = repl, True
        for seed in (2, 3):
            _push(client, tiny_layout, seed)
        assert pair.servicers[0].replication.in_sync == {1}
    assert fresh.checksum() == pair.shards[0].checksum() and fresh.counters["updates"] == 2
