"""Ordered lookups: a fetch's layers go out one after the other, earliest first, so the first
Engram layer's rows never queue behind a later layer's -- through the client and the agent."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engram_ray.agent import AgentClient
from engram_ray.client import EngramClient
from engram_ray.rpc import create_server
from engram_ray.rpc.servicer import ShardServicer
from engram_ray.store import TableShard

from .conftest import STORE, Served, spawn_agent, stop

DELAY_S = 0.15


def _slow_shard(layout, log: list):
    """One shard that takes DELAY_S per lookup and logs (first id, arrived, answered)."""
    shard = TableShard.create(layout, 1, 0, STORE)
    servicer = ShardServicer(shard, 64 << 20)
    real, lock = servicer._lookup, threading.Lock()

    def lookup(request, context, t0, *limit):
        t0 = time.monotonic()
        time.sleep(DELAY_S)
        answer = real(request, context, t0, *limit)
        with lock:
            log.append((int(np.frombuffer(request.row_ids.data, np.int64)[0]), t0, time.monotonic()))
        return answer
    servicer._lookup = lookup  # a call and a stream alike
    server, port = create_server(shard, "127.0.0.1", 0, servicer=servicer)
    return server, f"127.0.0.1:{port}"


def _layers(layout) -> list[np.ndarray]:
    """Two 'layers' of ids, told apart by their first id."""
    return [np.array([10, 11, 10]), np.array([2000, 2001])]


def _check(log: list, ordered: bool) -> None:
    assert sorted(first for first, _, _ in log) == [10, 2000]
    (_, a0, a1), (_, b0, _) = sorted(log)  # layer 0's call, then layer 1's
    if ordered:
        assert b0 >= a1 - 0.01, log  # layer 1 went out only once layer 0 had its rows
    else:
        assert b0 < a1 - DELAY_S / 2, log  # both at once


@pytest.mark.parametrize("ordered", [True, False])
def test_client_orders_a_fetchs_layers_when_asked(served: Served, ordered: bool):
    log: list = []
    server, address = _slow_shard(served.layout, log)
    try:
        with EngramClient([address], served.layout) as client:
            got = client.prefetch_unique_many(_layers(served.layout), ordered=ordered)
            rows = [p.result(10) for p in got]
            direct = [client.lookup(ids) for ids in _layers(served.layout)]
        for u, want in zip(rows, direct):
            assert np.array_equal(u.rows[u.inverse], want)
        _check(log[:2], ordered)
    finally:
        server.stop(0)


@pytest.mark.parametrize("ordered", [True, False])
def test_agent_orders_a_packets_lookups_when_flagged(served: Served, tmp_path, ordered: bool):
    log: list = []
    server, address = _slow_shard(served.layout, log)
    agent = spawn_agent(str(tmp_path / "slow.sock"), [address], served.layout)
    try:
        with AgentClient(str(tmp_path / "slow.sock"), served.layout) as worker:
            fetches = worker.prefetch_unique_many(_layers(served.layout), ordered=ordered)
            got = [f.result(10) for f in fetches]
            assert [g.rows.shape[0] for g in got] == [2, 2]
            st = worker.stats()  # the agent's client statistics, asked over the socket
            assert st["latency_p50_ms"] >= DELAY_S * 1000 * 0.9 and st["agent_connections"] == 1
        _check(log, ordered)
    finally:
        stop(agent)
        server.stop(0)


def test_remote_memory_fetch_many_orders_every_layer_of_every_forward(served: Served, tmp_path):
    """fetch_many([first, second]): the lookups go out first's layers, then second's, each once
    the one before has its rows; the rows equal separate fetches'."""
    from engram_ray.remote_memory import RemoteMemory

    log: list = []
    server, address = _slow_shard(served.layout, log)
    agent = spawn_agent(str(tmp_path / "many.sock"), [address], served.layout)
    tokens = np.random.default_rng(0).integers(0, served.indexer.vocab.num_tokens, size=(2, 3, 5))
    first, second = (served.indexer.rows(t) for t in tokens)                     # [L, 3, 5, H] each
    try:
        with AgentClient(str(tmp_path / "many.sock"), served.layout) as worker:
            memory = RemoteMemory(worker)
            many = memory.fetch_many([first, second], requires_grad=False)
            got = [[f.rows(li) for li in range(len(first))] for f in many]
            alone = [[memory.fetch(r, requires_grad=False).rows(li) for li in range(len(first))]
                     for r in (first, second)]
        for g, a in zip(got, alone):
            assert all(torch_equal(x, y) for x, y in zip(g, a))
        calls = sorted(log[:4], key=lambda c: c[1])                              # by arrival
        assert all(nxt[1] >= prev[2] - 0.01 for prev, nxt in zip(calls, calls[1:])), calls
    finally:
        stop(agent)
        server.stop(0)


def torch_equal(x, y) -> bool:
    import torch
    return bool(torch.equal(x, y))


def test_agent_answers_ordered_lookups_on_its_thread_or_hands_them_over(served: Served):
    """Ordered lookups to one shard are answered on the agent's connection thread (one blocking
    call); one spanning both shards, and every one after it, goes to the client's I/O thread.
    Either way the rows are the direct client's, in order, and nothing is refused."""
    with EngramClient(served.addresses, served.layout) as direct:
        b = int(direct._transfers.bounds[1])
        layers = [np.array([3, 7, 3]), np.array([1, b + 2, 5]), np.array([b + 1, b + 4]), np.array([2, 4])]
        want = [direct.lookup(ids) for ids in layers]
    with AgentClient(served.socket, served.layout) as worker:
        for _ in range(3):  # slots reused: every round the same answers
            fetches = worker.prefetch_unique_many(layers, ordered=True)
            got = [f.result(10) for f in fetches]
            for u, w in zip(got, want):
                assert np.array_equal(u.rows[u.inverse].view(np.uint8), w.view(np.uint8))
            for f in fetches:
                f.release()
        st = worker.stats()
        assert st["agent_refused"] == 0 and st["lookups"] == 12
        assert st["lookups_direct"] == 3  # the first layer's, each round; the rest were handed over


def test_ids_outside_the_table_refuse_their_own_request_alone(served: Served):
    """Whichever way a packet's other lookups go (direct, or handed over together), a lookup
    of ids that are not rows is refused by itself."""
    from engram_ray.agent.protocol import AgentRefused

    with EngramClient(served.addresses, served.layout) as direct:
        b = int(direct._transfers.bounds[1])
    both_shards, bad = np.array([1, b + 2]), np.array([served.layout.total_rows + 5])
    with AgentClient(served.socket, served.layout) as worker:
        for layers in ([both_shards, bad], [bad, both_shards], [np.array([3]), bad, both_shards]):
            fetches = worker.prefetch_unique_many(layers, ordered=True)
            for ids, f in zip(layers, fetches):
                if ids is bad:
                    with pytest.raises(AgentRefused, match="outside the table"):
                        f.result(10)
                else:
                    assert f.result(10).rows.shape[0] == ids.size
                f.release()
