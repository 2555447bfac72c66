"""The agent survives what workers do to it, and workers survive the agent: killed processes
leave no shared memory behind, a restarted agent is re-attached on the next fetch, and hostile
packets are refused without harm."""

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from engram_ray.agent import AgentClient, AgentRefused
from engram_ray.agent.protocol import EXPAND, HELLO, MAGIC, ORDERED, REPLY, REQUEST, VERSION, AgentUnavailable, Op
from engram_ray.bench.isolation import proc_stat
from engram_ray.client import EngramClient
from engram_ray.remote_memory import RemoteMemory

from .conftest import dev_shm, slot_maps, spawn_agent, stop, wait_for

WORKER = textwrap.dedent("""
    import hashlib, json, sys, numpy as np
    from engram_ray.agent import AgentClient
    from engram_ray.core.layout import TableLayout
    path, layout_file, mode = sys.argv[1:4]
    layout = TableLayout.from_dict(json.load(open(layout_file)))
    agent = AgentClient(path, layout)
    ids = np.arange(600).reshape(3, 200) * 7 % layout.total_rows
    rows = agent.lookup(ids)
    print(hashlib.sha256(rows.tobytes()).hexdigest(), flush=True)
    if mode == "hang":
        agent.prefetch_unique(ids)  # in flight when it is killed
        sys.stdin.read()
""")


def _worker(served, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, served.socket, served.socket + ".layout.json", mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_two_worker_processes_share_one_agent(served):
    import hashlib
    with EngramClient(served.addresses, served.layout) as client:
        want = hashlib.sha256(client.lookup(np.arange(600).reshape(3, 200) * 7 % served.layout.total_rows)
                              .tobytes()).hexdigest()
    workers = [_worker(served, "hang") for _ in range(2)]
    try:
        assert [w.stdout.readline().strip() for w in workers] == [want, want]
        assert wait_for(lambda: slot_maps(served.agent.pid) >= 2)  # a slot of each, in one agent
    finally:
        for w in workers:
            w.kill()
            w.wait()


def test_a_killed_worker_leaves_no_shared_memory(served):
    before = dev_shm()
    w = _worker(served, "hang")
    assert len(w.stdout.readline().strip()) == 64
    assert slot_maps(w.pid) >= 1 and slot_maps(served.agent.pid) >= 1
    w.send_signal(signal.SIGKILL)
    w.wait()
    assert wait_for(lambda: slot_maps(served.agent.pid) == 0)  # its slots are unmapped: memory freed
    assert dev_shm() == before  # memfds never appear in /dev/shm
    with AgentClient(served.socket, served.layout) as agent:  # the agent serves on
        assert agent.lookup(np.arange(10)).shape == (10, served.layout.row_dim)


@contextlib.contextmanager
def _restartable(served):
    """A worker's AgentClient whose ``start`` spawns a new agent (in ``procs``); the test's
    fixture is left serving the last one."""
    procs = [served.agent]

    def restart():
        procs.append(spawn_agent(served.socket, served.addresses, served.layout))

    agent = AgentClient(served.socket, served.layout, start=restart)
    try:
        yield agent, procs
    finally:
        agent.close()
        served.agent = procs[-1]
        for p in procs[:-1]:
            stop(p)


def test_a_killed_agent_is_restarted_and_the_fetch_goes_on(served):
    before = dev_shm()
    with _restartable(served) as (agent, procs):
        memory = RemoteMemory(agent)
        ids = np.arange(2 * 2 * 3 * 8).reshape(2, 2, 3, 8) * 5
        want = [memory.fetch(ids, requires_grad=False).rows(i) for i in range(2)]
        fetch = memory.fetch(ids, requires_grad=False)       # in flight ...
        served.agent.send_signal(signal.SIGKILL)              # ... when the agent dies
        served.agent.wait()
        got = [fetch.rows(i) for i in range(2)]               # re-attached, asked again
        assert all(g.equal(w) for g, w in zip(got, want))
        assert len(procs) == 2 and agent.reconnects == 1
        assert memory.fetch(ids, requires_grad=False).rows(1).equal(want[1])
        assert dev_shm() == before


def test_an_agent_killed_while_rows_are_lent_is_restarted_and_the_next_fetch_goes_on(served):
    """Rows still lent (held by the caller) when the agent dies: the next fetch needs a new
    slot, whose request meets the dead agent; it re-attaches once and goes on, and the rows
    held keep their values."""
    with _restartable(served) as (agent, procs):
        memory = RemoteMemory(agent)
        ids = np.arange(2 * 2 * 3 * 8).reshape(2, 2, 3, 8) * 5
        f = memory.fetch(ids, requires_grad=False)
        held = [f.rows(i) for i in range(2)]                  # lent: their slots stay taken
        want = [h.clone() for h in held]
        served.agent.send_signal(signal.SIGKILL)
        served.agent.wait()
        again = memory.fetch(ids, requires_grad=False)        # asks for new slots: re-attached
        assert all(again.rows(i).equal(w) for i, w in enumerate(want))
        assert all(h.equal(w) for h, w in zip(held, want))
        assert len(procs) == 2 and agent.reconnects == 1


def test_a_worker_whose_agent_cannot_come_back_waits_for_it_once(served):
    """No agent to re-attach to (it is gone and start() brings none): the fetch fails after
    one connect_timeout and one start(), not two (a retry meant for a dropped connection)."""
    started: list[int] = []
    agent = AgentClient(served.socket, served.layout, start=lambda: started.append(1), connect_timeout=1.0)
    stop(served.agent)
    agent.close()
    with pytest.raises(AgentUnavailable):
        agent.prefetch_unique(np.arange(4))
    assert started == [1]


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(path)
    return s


def _ask(s: socket.socket, packet: bytes) -> tuple[int, str]:
    s.send(packet)
    data = s.recv(4096)
    _m, _op, status, _rid, _slot, _value, aux = REPLY.unpack_from(data)
    return status, data[REPLY.size:REPLY.size + aux].decode()


def _hello(s: socket.socket, fingerprint: str) -> None:
    s.send(HELLO.pack(MAGIC, Op.HELLO, VERSION, 1, 0, 0, fingerprint.encode()))
    assert REPLY.unpack_from(s.recv(4096))[2] == 0


@pytest.mark.parametrize("packet,why", [
    (b"x", "packet of 1 bytes"),
    (b"\0" * 5000, "packet of 2048 bytes"),  # longer than any packet: cut, then refused
    (REQUEST.pack(b"EVIL", Op.UNIQUE, 0, 1, 0, 1), "not a request"),
    (REQUEST.pack(MAGIC, 99, 0, 1, 0, 1), "not a request"),
    (REQUEST.pack(MAGIC, Op.UNIQUE, 0, 1, 0, 1), "say HELLO first"),
])
def test_hostile_packets_before_hello_are_refused(served, packet, why):
    with _raw(served.socket) as s:
        status, text = _ask(s, packet)
        assert status == 1 and why in text


def test_hostile_requests_are_refused_and_the_agent_serves_on(served):
    fp = served.layout.fingerprint
    with _raw(served.socket) as s:
        status, text = _ask(s, HELLO.pack(MAGIC, Op.HELLO, VERSION, 1, 0, 0, b"engram-0000000000000000"))
        assert status == 1 and "differs" in text
        _hello(s, fp)
        cases = [(REQUEST.pack(MAGIC, Op.UNIQUE, 0, 2, 0, 10), "slot 0 does not exist"),
                 (REQUEST.pack(MAGIC, Op.SLOT, 0, 3, 0, 0), "refused"),
                 (REQUEST.pack(MAGIC, Op.SLOT, 0, 4, 0, 1 << 40), "refused"),
                 (REQUEST.pack(MAGIC, Op.HELLO, 0, 5, 0, 0), "wrong size"),
                 (REQUEST.pack(MAGIC, Op.UNIQUE, 0, 6, 2**32 - 1, 2**64 - 1), "does not exist"),
                 (REQUEST.pack(MAGIC, Op.UNIQUE, 0x80, 11, 0, 1), "only ORDERED"),      # unknown flag bits
                 (REQUEST.pack(MAGIC, Op.PUSH, ORDERED, 12, 0, 1), "only ORDERED"),     # ORDERED on a push
                 (REQUEST.pack(MAGIC, Op.PUSH, EXPAND, 13, 0, 1), "on UNIQUE requests")]  # EXPAND on a push
        for packet, why in cases:
            status, text = _ask(s, packet)
            assert status == 1 and why in text, text
        # a real slot, then counts past it and ids outside the table
        s.send(REQUEST.pack(MAGIC, Op.SLOT, 0, 7, 0, 16))
        data, fds, _, _ = socket.recv_fds(s, 4096, 1)
        assert REPLY.unpack_from(data)[2] == 0 and len(fds) == 1
        import fcntl
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW  # cannot be truncated under the agent
        with pytest.raises(OSError):
            os.ftruncate(fds[0], 0)
        import mmap
        mm = mmap.mmap(fds[0], 16 * 8)
        os.close(fds[0])
        mm[:16] = struct.pack("<2q", -5, 1 << 60)
        status, text = _ask(s, REQUEST.pack(MAGIC, Op.UNIQUE, 0, 8, 0, 17))
        assert status == 1 and "do not fit" in text
        status, text = _ask(s, REQUEST.pack(MAGIC, Op.UNIQUE, 0, 9, 0, 2))
        assert status == 1 and "outside the table" in text
        status, text = _ask(s, REQUEST.pack(MAGIC, Op.PUSH, 0, 10, 0, 2))
        assert status == 1 and "outside the table" in text
        mm.close()
    assert served.agent.poll() is None
    with AgentClient(served.socket, served.layout) as agent:
        assert agent.lookup(np.arange(5)).shape == (5, served.layout.row_dim)
        with pytest.raises(AgentRefused, match="outside the table"):
            agent.lookup(np.array([served.layout.total_rows]))
        assert agent.lookup(np.arange(5)).shape == (5, served.layout.row_dim)  # still usable


def test_a_second_agent_on_the_same_socket_refuses_to_start(served):
    proc = subprocess.run([sys.executable, "-m", "engram_ray.agent", "--addresses", ",".join(served.addresses),
                           "--layout", served.socket + ".layout.json", "--socket", served.socket],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "another lookup agent serves" in proc.stderr
    with AgentClient(served.socket, served.layout) as agent:
        assert agent.lookup(np.arange(3)).shape[0] == 3


def test_a_worker_that_stops_reading_never_blocks_another(served):
    """A worker that floods requests (slots included) and never reads its replies, with a large
    lookup in flight, is given up, and another worker is served meanwhile. (Written after a
    review found a slot's reply sent by a blocking call under the connection's lock; this run
    does not fill the buffer at that exact moment, so it guards the outcome, not that path.)"""
    import mmap
    with _raw(served.socket) as greedy:
        _hello(greedy, served.layout.fingerprint)
        n = 1 << 18  # a large lookup in flight: its reply comes from the client's shared I/O thread
        greedy.send(REQUEST.pack(MAGIC, Op.SLOT, 0, 99, 0, n))
        _, fds, _, _ = socket.recv_fds(greedy, 4096, 1)
        ids = mmap.mmap(fds[0], n * 8)
        os.close(fds[0])
        ids[:] = np.random.default_rng(0).integers(0, served.layout.total_rows, n).astype(np.int64).tobytes()
        greedy.send(REQUEST.pack(MAGIC, Op.UNIQUE, 0, 98, 0, n))
        stats = REQUEST.pack(MAGIC, Op.STATS, 0, 100, 0, 0)
        with contextlib.suppress(OSError):
            for _ in range(5000):  # replies pile up unread until the agent gives the worker up
                greedy.send(stats)
                greedy.send(REQUEST.pack(MAGIC, Op.SLOT, 0, 101, 0, 16))
        with AgentClient(served.socket, served.layout, timeout=10) as other:
            assert other.lookup(np.arange(5)).shape == (5, served.layout.row_dim)
        ids.close()
    assert served.agent.poll() is None


def test_a_worker_refuses_a_slot_that_could_be_truncated(served, monkeypatch):
    """A hostile agent that sends an unsealed memfd (which it could shrink, to SIGBUS the
    worker) loses the connection instead of being mapped."""
    from engram_ray.agent import client as agent_client
    with AgentClient(served.socket, served.layout) as worker:
        real = agent_client.socket.recv_fds

        def unsealed(sock, bufsize, maxfds, *args):
            data, fds, flags, addr = real(sock, bufsize, maxfds, *args)
            if fds:  # swap the sealed slot for a plain memfd of the same size
                size = os.fstat(fds[0]).st_size
                os.close(fds[0])
                fd = os.memfd_create("evil")
                os.ftruncate(fd, size)
                fds = [fd]
            return data, fds, flags, addr
        monkeypatch.setattr(agent_client.socket, "recv_fds", unsealed)
        with pytest.raises(AgentUnavailable, match="bad slot"):
            worker.lookup(np.arange(5))


def test_done_polls_without_waiting_out_the_timeout(served):
    # A socket with a timeout polls for that long *before* a recv, MSG_DONTWAIT or not: done()
    # used to block for the whole timeout once the replies were read, then drop the connection
    # (the CUDA staging path, the one that polls, failed on an H100 this way).
    ids = np.arange(300).reshape(3, 100) * 11 % served.layout.total_rows
    with AgentClient(served.socket, served.layout, timeout=0.5) as agent:
        want = agent.lookup(ids)
        fetch = agent.prefetch_unique(ids)
        assert wait_for(fetch.done)
        for _ in range(3):
            assert fetch.done()  # the connection is kept: answered from what was read
        second = agent.prefetch_unique(ids)
        assert wait_for(second.done)
        u = second.result()
        np.testing.assert_array_equal(u.expand(), want)
        fetch.release()
        second.release()


def test_slot_bytes_are_capped_across_all_workers(served, tmp_path):
    # Each connection has its own cap; without one for all of them, max_conns hostile workers
    # could ask a node for max_conns x max_bytes of shared memory.
    from engram_ray.agent import LookupAgent
    from engram_ray.agent.client import MIN_SLOT_IDS
    from engram_ray.agent.protocol import SlotLayout
    from engram_ray.agent.server import Limits

    one = SlotLayout(MIN_SLOT_IDS, served.layout.row_dim, 4).nbytes
    path = str(tmp_path / "capped.sock")
    with EngramClient(served.addresses, served.layout) as client:
        agent = LookupAgent(client, path, Limits(max_total_bytes=one + one // 2)).start()
        try:
            first, second = AgentClient(path, served.layout), AgentClient(path, served.layout)
            want = client.lookup(np.arange(5))
            np.testing.assert_array_equal(first.lookup(np.arange(5)), want)  # one slot: within the cap
            with pytest.raises(AgentRefused, match="for all workers"):
                second.lookup(np.arange(5))
            first.close()  # its slot's bytes go back to the agent ...
            assert wait_for(lambda: agent.connections == 1)
            np.testing.assert_array_equal(second.lookup(np.arange(5)), want)  # ... and serve another
            second.close()
        finally:
            agent.close()


def test_a_refusal_is_done_and_raised_by_result_not_by_done(served):
    # done() is how RemoteFetch checks later layers while an earlier one computes: a refusal
    # must stay filed for that layer's own result(), not surface (and vanish) in done()
    with AgentClient(served.socket, served.layout, timeout=5) as agent:
        bad = agent.prefetch_unique(np.array([served.layout.total_rows + 5]))
        assert wait_for(bad.done)
        assert bad.done()  # asked again: still done, still filed
        with pytest.raises(AgentRefused, match="row"):
            bad.result()
        bad.release()
        assert agent.lookup(np.arange(3)).shape == (3, served.layout.row_dim)  # the connection serves on


def test_a_worker_drops_an_agent_that_answers_what_was_not_asked(served, monkeypatch):
    # replies are filed by request id until their waiter reads them: an agent answering ids
    # never sent (or twice) would grow that file without bound; the worker hangs up instead
    with AgentClient(served.socket, served.layout, timeout=5) as worker:
        assert worker.lookup(np.arange(5)).shape == (5, served.layout.row_dim)
        real = AgentClient._check

        def forged(self, data):
            data = real(self, data)
            m, op, status, rid, slot, value, aux = REPLY.unpack_from(data)
            return REPLY.pack(m, op, status, rid + 1000, slot, value, aux) + data[REPLY.size:]
        monkeypatch.setattr(AgentClient, "_check", forged)
        with pytest.raises(AgentUnavailable, match="not waiting for a reply"):
            worker.lookup(np.arange(5))
        monkeypatch.undo()
        assert worker.lookup(np.arange(5)).shape == (5, served.layout.row_dim)  # reconnects, serves on


def test_a_push_through_the_agent_carries_its_rate_and_a_hostile_rate_is_refused(tmp_path):
    """The rate travels in the slot (the worker writes it, the agent reads it once and checks
    it): 0.25 moves SGD rows by 0.25; NaN or a huge rate written into the slot by a worker is
    refused, and the rows stay as they were."""
    from engram_ray import config as C
    from engram_ray.config import OptimizerConfig, StoreConfig
    from engram_ray.core.layout import TableLayout
    from engram_ray.core.tokens import CompressedVocab

    from .conftest import start_shards

    layout = TableLayout.build(C.tiny(), CompressedVocab(np.arange(50)))
    servers, addresses = start_shards(layout, store=StoreConfig(init_std=0.5, optimizer=OptimizerConfig(
        kind="sgd", lr=1.0)))
    proc = spawn_agent(str(tmp_path / "a.sock"), addresses, layout)
    try:
        with AgentClient(str(tmp_path / "a.sock"), layout) as agent:
            ids, g = np.array([4, 9]), np.ones((2, 16), np.float32)
            before = agent.lookup(ids)
            assert agent.push_gradients(ids, g, lr=0.25) == 2
            assert np.allclose(agent.lookup(ids), before - 0.25)
            for bad in (float("nan"), 1e6, 5e-324):   # 5e-324: what an old worker's stale slot bytes read as
                # past the client's own check: the bytes a hostile worker could write
                with agent._lock:
                    slot = agent._take_slot(2)
                    s = agent._slots[slot]
                    s.ids[:2], s.grads[:2], s.push_lr[0] = ids, g, bad
                    rid = agent._new_id()
                    agent._owner[rid] = slot
                    agent._send(Op.PUSH, rid, slot, 2)
                    with pytest.raises(AgentRefused, match="learning rate"):
                        agent._wait_id(rid, 10)
                    agent._free.append(slot)
            assert np.allclose(agent.lookup(ids), before - 0.25)
    finally:
        stop(proc)
        for srv in servers:
            srv.stop(0)


def test_a_reader_polls_for_its_rows_before_it_sleeps_and_spin_0_never_polls(served, monkeypatch):
    ids = np.arange(256).reshape(2, 128) * 13 % served.layout.total_rows
    for spin, polls_expected in ((0.5, True), (None, False)):  # None: the default, which sleeps at once
        kwargs = {} if spin is None else {"spin_s": spin}
        with AgentClient(served.socket, served.layout, **kwargs) as agent:
            want = agent.lookup(ids)                       # slots mapped (that reply carries fds: never polled)
            calls: list[int] = []

            def counted(*args, calls: list[int] = calls, real=agent._poll) -> None:
                calls.append(1)
                real(*args)
            monkeypatch.setattr(agent, "_poll", counted)
            fetch = agent.prefetch_unique(ids)             # read at once: the agent cannot have answered yet
            u = fetch.result()
            np.testing.assert_array_equal(u.expand(), want)
            fetch.release()
            assert bool(calls) == polls_expected


@pytest.mark.parametrize("spin", [-0.001, 1.5])
def test_spin_outside_0_to_1_s_is_refused(served, spin):
    with pytest.raises(ValueError, match="spin_s"):
        AgentClient(served.socket, served.layout, spin_s=spin)


@contextlib.contextmanager
def _frozen(proc: subprocess.Popen):
    """The agent stopped (SIGSTOP): packets queue on its socket, nothing is answered. The
    signal is asynchronous: wait until every thread is stopped (state T in /proc), or the
    agent, running on the other core, may still answer the next packet."""
    os.kill(proc.pid, signal.SIGSTOP)

    def stopped() -> bool:
        states = [f[0] for tid in os.listdir(f"/proc/{proc.pid}/task")
                  if (f := proc_stat(proc.pid, int(tid))) is not None]  # a thread that ended: skipped
        return bool(states) and all(st in "tT" for st in states)
    assert wait_for(stopped, 10)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("timeout", [0.0, 0.05])
def test_a_timeout_bounds_the_poll_too_and_keeps_the_connection(served, timeout):
    import time
    ids = np.arange(128) * 7 % served.layout.total_rows
    with AgentClient(served.socket, served.layout, spin_s=0.5) as agent:
        want = agent.lookup(ids)                       # slots mapped before the agent freezes
        with _frozen(served.agent):
            fetch = agent.prefetch_unique(ids)
            t0 = time.perf_counter()
            with pytest.raises(TimeoutError, match=f"no reply after {timeout}"):
                fetch.result(timeout=timeout)
            assert time.perf_counter() - t0 < 0.4        # not the 0.5 s poll, then the timeout again
        np.testing.assert_array_equal(fetch.result(timeout=10).expand(), want)   # the same connection
        fetch.release()
        assert agent.reconnects == 0


def test_no_client_timeout_waits_without_a_limit(served):
    ids = np.arange(64) * 5 % served.layout.total_rows
    with AgentClient(served.socket, served.layout, timeout=None) as agent:
        assert agent.lookup(ids).shape == (64, served.layout.row_dim)


def test_an_agent_that_dies_while_a_reader_polls_fails_the_read_at_once(served):
    import threading
    import time
    ids = np.arange(128) * 3 % served.layout.total_rows
    with AgentClient(served.socket, served.layout, spin_s=1.0) as agent:
        agent.lookup(ids)
        os.kill(served.agent.pid, signal.SIGSTOP)
        fetch = agent.prefetch_unique(ids)
        threading.Timer(0.1, lambda: os.kill(served.agent.pid, signal.SIGKILL)).start()
        t0 = time.perf_counter()
        with pytest.raises(AgentUnavailable):
            fetch.result()
        assert time.perf_counter() - t0 < 0.9            # inside the poll, not after it
