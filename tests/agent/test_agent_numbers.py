"""Through the lookup agent the model gets the same rows, and the table the same updates, as
through a direct EngramClient and as from LocalMemory (bit for bit, on CPU)."""

import copy
import os
import stat
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engram_ray import config as C
from engram_ray.agent import AgentClient
from engram_ray.client import EngramClient
from engram_ray.model import EngramLM, LocalMemory
from engram_ray.remote_memory import RemoteMemory

from .conftest import STORE, start_shards


@pytest.fixture
def agent(served):
    """A worker's connection to the served agent, closed after the test."""
    with AgentClient(served.socket, served.layout) as a:
        yield a


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_agent_rows_equal_the_clients_bit_for_bit(served):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 200, size=(3, 9, 8))  # many duplicates
    with EngramClient(served.addresses, served.layout) as client, AgentClient(served.socket, served.layout) as agent:
        want = client.lookup(ids)
        assert agent.lookup(ids).tobytes() == want.tobytes()
        out = np.empty_like(want)
        assert agent.lookup_into(ids, out) is out and out.tobytes() == want.tobytes()
        f = agent.prefetch_unique(ids)
        u = f.result(10)
        assert np.array_equal(u.ids, np.unique(ids)) and u.rows.tobytes() == client.lookup(u.ids).tobytes()
        assert u.expand().tobytes() == want.tobytes()
        f.release()
    assert stat.S_IMODE(os.stat(served.socket).st_mode) == 0o600


def test_training_through_the_agent_equals_client_and_local(served):
    """Three copies of one model train two steps: LocalMemory, RemoteMemory over a direct
    client (its own shards), RemoteMemory over the agent: same logits, same tables."""
    mc, ec = C.model_tiny(), C.tiny()
    layout = served.layout
    other_servers, other_addresses = start_shards(layout)
    client = EngramClient(other_addresses, layout)
    agent = AgentClient(served.socket, layout)
    try:
        torch.manual_seed(0)
        models = [EngramLM(mc, ec)]
        models += [copy.deepcopy(models[0]) for _ in range(2)]
        memories = [LocalMemory(layout, init_std=STORE.init_std, optimizer=STORE.optimizer),
                    RemoteMemory(client), RemoteMemory(agent)]
        tok = torch.randint(0, mc.vocab_size, (4, 24))
        tok[:, 10:14] = tok[:, :4]  # repeated n-grams: duplicate rows in the batch
        rows = served.indexer.rows(tok.numpy())
        for _ in range(2):
            fetches = [m.fetch(rows) for m in memories]
            logits = [model(tok, f) for model, f in zip(models, fetches)]
            assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
            for lg in logits:
                F.cross_entropy(lg.flatten(0, 1), tok.flatten()).backward()
            updated = [m.update(f) for m, f in zip(memories, fetches)]
            assert updated == [np.unique(rows).size] * 3
            assert fetches[2].fetch_seconds > 0
        local = memories[0].table.detach().numpy()
        every = np.arange(layout.total_rows)
        assert client.lookup(every).tobytes() == local.tobytes()
        assert agent.lookup(every).tobytes() == local.tobytes()
    finally:
        agent.close()
        client.close()
        for s in other_servers:
            s.stop(0)


def test_unique_rows_autograd_reaches_the_leaf(served, agent):
    memory = RemoteMemory(agent)
    ids = np.array([[[[3, 3, 5, 3, 7, 7, 9, 11]]]] * 2).repeat(2, axis=2)   # [L=2, B=1, T=2, H=8]
    f = memory.fetch(ids)
    r = f.rows(0)
    assert r.shape == (1, 2, 8 * served.layout.row_dim)
    r.sum().backward()
    leaf = f.tensors[0]
    assert leaf.is_leaf and leaf.shape == (5, served.layout.row_dim)  # 5 distinct rows
    counts = np.unique(ids[0], return_counts=True)[1].astype(np.float32)
    assert torch.equal(leaf.grad, torch.from_numpy(np.repeat(counts[:, None], leaf.shape[1], axis=1)))


@pytest.mark.gpu
@needs_cuda
def test_unique_rows_reach_the_gpu_once_and_expand_there(served, agent):
    ids = np.random.default_rng(3).integers(0, 300, size=(2, 3, 5, 8))
    cpu, gpu = RemoteMemory(agent), RemoteMemory(agent, device="cuda")
    f_c, f_g = cpu.fetch(ids), gpu.fetch(ids)
    for li in (1, 0):  # out of order: layer 0's rows were staged while layer 1 waited
        r_c, r_g = f_c.rows(li), f_g.rows(li)
        assert r_g.is_cuda and torch.equal(r_g.cpu(), r_c)
        assert f_g.tensors[li].shape[0] == np.unique(ids[li]).size  # unique rows crossed, not N
        r_c.sum().backward()
        r_g.sum().backward()
        assert torch.equal(f_g.tensors[li].grad.cpu(), f_c.tensors[li].grad)  # sums of ones: exact


def test_pinned_slots_are_registered_once_and_unregistered_before_unmapping(served, agent):
    # RemoteMemory on CUDA registers the agent's slots with cudaHostRegister through these
    # hooks; the plumbing is device-free, so it is checked here with recording hooks.
    calls: list[tuple] = []
    agent.lookup(np.arange(5))  # a slot mapped before pinning ...
    agent.pin_slots(lambda a, n: calls.append(("reg", a, n)) or True, lambda a: calls.append(("unreg", a)))
    big = np.arange(10_000) % served.layout.total_rows
    f = agent.prefetch_unique(big)  # ... and one mapped after (too large for the first)
    assert f.pinned
    f.result()
    f.release()
    regs = [c for c in calls if c[0] == "reg"]
    assert len(regs) == 2 == len({a for _, a, _ in regs})
    assert all(n >= 4096 * 8 for _, _, n in regs)
    # a second memory on the same agent (the hooks are replaced; slots stay registered once)
    agent.pin_slots(lambda a, n: calls.append(("again", a)) or True, lambda a: calls.append(("unreg", a)))
    assert not [c for c in calls if c[0] == "again"]
    agent.close()  # drops the slots: each is unregistered first
    assert sorted(a for c, a, *_ in calls if c == "unreg") == sorted(a for _, a, _ in regs)


@pytest.mark.gpu
@needs_cuda
def test_rows_reach_the_gpu_from_the_registered_slot(served, agent):
    # with the slots pinned, the copy reads the slot in place and gives it back once done:
    # rows equal the CPU path's, and no slot stays lent once the copies are through
    ids = np.random.default_rng(5).integers(0, 300, size=(2, 3, 5, 8))
    gpu, cpu = RemoteMemory(agent, device="cuda"), RemoteMemory(agent)
    for _ in range(3):
        f_g, f_c = gpu.fetch(ids, requires_grad=False), cpu.fetch(ids, requires_grad=False)
        for li in (0, 1):
            assert torch.equal(f_g.rows(li).cpu(), f_c.rows(li))
    assert all(s.pinned for s in agent._slots)
    torch.cuda.synchronize()
    gpu._reap()
    assert not gpu._lent and len(agent._free) == len(agent._slots)


def _slot_of(agent, t: torch.Tensor) -> int | None:
    """The agent slot whose rows ``t`` lies in (None: memory of its own)."""
    for i, s in enumerate(agent._slots):
        lo = s.rows.ctypes.data
        if lo <= t.data_ptr() < lo + s.rows.nbytes:
            return i
    return None


def _stage_nothing(agent) -> None:
    with agent._lock:
        assert agent._stage([], bytearray()) == []


def test_inference_rows_are_lent_from_the_slot_until_their_tensor_is_gone(served, agent):
    """Inference rows on the host in the storage's dtype come expanded by the agent and are
    read where it wrote them: bit-identical to LocalMemory's, no copy, and the slot is lent --
    later fetches never write it -- until the tensor (and every view of it) is gone."""
    layout = served.layout
    local = LocalMemory(layout, init_std=STORE.init_std, optimizer=STORE.optimizer)
    rng = np.random.default_rng(4)
    memory = RemoteMemory(agent)
    assert memory.lends
    ids = served.indexer.rows(rng.integers(0, 90, size=(3, 7)))          # [L, B, T, H]
    f, want = memory.fetch(ids, requires_grad=False), local.fetch(ids, requires_grad=False)
    held = [f.rows(li) for li in range(ids.shape[0])]
    for li, got in enumerate(held):
        assert got.dtype == torch.float32 and not got.requires_grad
        assert torch.equal(got, want.rows(li))
    assert f.unique_ids == {} and f.tensors == {}  # nothing kept for a push
    lent = {_slot_of(agent, t) for t in held}
    assert None not in lent and len(lent) == len(held)  # each layer read in its own slot
    kept = [t.clone() for t in held]
    view = held[0][1:]  # a view keeps the slot lent too
    for _ in range(5):  # other rows through other slots: the lent ones are never written
        other = served.indexer.rows(rng.integers(0, 90, size=(3, 7)))
        g = memory.fetch(other, requires_grad=False)
        assert torch.equal(g.rows(1), local.fetch(other, requires_grad=False).rows(1))
        assert not lent & set(agent._free)
    assert all(torch.equal(t, k) for t, k in zip(held, kept))
    first = _slot_of(agent, held[0])
    del held, got, g
    _stage_nothing(agent)  # what the next fetch's staging does first: free the slots given back
    assert lent - {first} <= set(agent._free) and first not in agent._free  # `view` still reads it
    del view
    _stage_nothing(agent)
    deadline = time.monotonic() + 10
    while sorted(agent._free) != list(range(len(agent._slots))) and time.monotonic() < deadline:
        time.sleep(0.01)
        with agent._lock:
            agent._poll()  # the unread layers of the fetches above: freed as their replies come
    assert sorted(agent._free) == list(range(len(agent._slots)))  # every slot back
    slots = len(agent._slots)
    for _ in range(30):  # a decode loop: slots are reused, not piled up
        f = memory.fetch(served.indexer.rows(rng.integers(0, 90, size=(3, 1))), requires_grad=False)
        for li in range(ids.shape[0]):
            f.rows(li)
    assert len(agent._slots) <= slots + 2 * ids.shape[0]


def test_a_consumer_that_keeps_its_rows_gets_them_copied_past_the_cap(served, agent):
    """Rows tensors kept (an analysis storing every input), with many forwards asked in one
    hand-over: never more than MAX_LENT slots lent -- the rows past it are copied and their
    slots come back at once -- so the agent's slots never run out; the values are the same
    either way, and the lent ones come back once dropped."""
    from engram_ray.remote_memory import MAX_LENT
    memory = RemoteMemory(agent)
    rng = np.random.default_rng(8)
    kept, copies = [], []
    for _ in range(3):
        arrays = [served.indexer.rows(rng.integers(0, 90, size=(2, 3))) for _ in range(12)]
        for f in memory.fetch_many(arrays, requires_grad=False):
            rows = [f.rows(li) for li in range(2)]
            kept += rows
            copies += [r.clone() for r in rows]
            assert agent.lent <= MAX_LENT
    assert agent.lent == MAX_LENT and len(agent._slots) < 64
    assert sum(_slot_of(agent, t) is None for t in kept) == len(kept) - MAX_LENT
    assert all(torch.equal(t, c) for t, c in zip(kept, copies))  # no lent slot was written again
    del kept, rows
    _stage_nothing(agent)
    assert agent.lent == 0 and agent._lent_n == 0


def test_rows_in_another_dtype_are_gathered_from_the_slot(served, agent):
    """Inference rows in a dtype other than the storage's are gathered (and converted) out of
    the slot in one op on the host, which is given back at once."""
    layout = served.layout
    local = LocalMemory(layout, init_std=STORE.init_std, optimizer=STORE.optimizer)
    ids = served.indexer.rows(np.random.default_rng(4).integers(0, 90, size=(3, 7)))
    memory = RemoteMemory(agent, dtype=torch.bfloat16)
    assert not memory.lends
    f, want = memory.fetch(ids, requires_grad=False), local.fetch(ids, requires_grad=False)
    for li in range(ids.shape[0]):
        got = f.rows(li)
        assert got.dtype == torch.bfloat16 and _slot_of(agent, got) is None
        assert torch.equal(got, want.rows(li).to(torch.bfloat16))
    assert sorted(agent._free) == list(range(len(agent._slots)))  # every slot back


def test_an_expanded_fetch_is_read_by_lend_only(served, agent):
    """``expand=True``: the slot holds the rows in the ids' order, read by lend() (result()
    would misread them as unique rows, so it refuses); give_back frees the slot at the next
    fetch, twice is harmless, and a fetch of unique rows cannot be lent."""
    ids = np.random.default_rng(6).integers(0, 300, size=(4, 9))
    want = agent.lookup(ids)
    [f] = agent.prefetch_unique_many([ids], expand=True)
    with pytest.raises(ValueError, match="lend"):
        f.result()
    rows = f.lend()
    assert rows.shape == (ids.size, want.shape[-1]) and np.array_equal(rows.reshape(want.shape), want)
    with pytest.raises(RuntimeError, match="lent already"):
        f.lend()
    f.release()  # lent: nothing happens
    assert f.slot not in agent._free and agent.lent == 1
    f.give_back()
    f.give_back()
    assert agent.lent == 0
    _stage_nothing(agent)  # what the next fetch does first
    assert agent._free.count(f.slot) == 1 and agent._lent_n == 0
    [u] = agent.prefetch_unique_many([ids])
    with pytest.raises(ValueError, match="expand=True"):
        u.lend()
    u.release()
    [e] = agent.prefetch_unique_many([ids], expand=True)
    with pytest.raises(RuntimeError, match="not lent"):  # it would lose the slot for good
        e.give_back()
    e.release()


def test_a_fetch_released_after_its_reply_was_read_for_another_gives_its_slot_back(served, agent):
    """Layers read out of order: reading layer 1's reply reads layer 0's first (kept for its
    waiter); releasing layer 0 unread then frees its slot at once -- it used to wait for a
    reply that had come already, and the slot was lost to the worker."""
    ids = np.random.default_rng(7).integers(0, 300, size=(2, 3, 8))
    first, second = agent.prefetch_unique_many(list(ids), ordered=True)
    second.result()
    first.release()
    second.release()
    assert sorted(agent._free) == list(range(len(agent._slots))) and not agent._replies


def test_a_refused_slot_midway_through_a_packet_gives_the_others_back(served, agent, monkeypatch):
    """Staging a packet fails on its second array (no slot for it): nothing was sent, so the
    first array's slot is free again and its request is not awaited."""
    from engram_ray.agent import AgentRefused
    agent.prefetch_unique(np.arange(5)).result()  # one slot mapped
    free, real, calls = sorted(agent._free), agent._take_slot, []

    def take(n):
        calls.append(n)
        if len(calls) == 2:
            raise AgentRefused("slot refused (limits)")
        return real(n)
    monkeypatch.setattr(agent, "_take_slot", take)
    with pytest.raises(AgentRefused):
        agent.prefetch_unique_many([np.arange(5), np.arange(6)])
    monkeypatch.undo()
    time.sleep(0.2)
    with agent._lock:
        agent._poll()
    assert sorted(agent._free) == free and not agent._asked and not agent._owner
    assert agent.lookup(np.arange(5)).shape[0] == 5  # and the connection serves on


def test_a_fetch_not_used_gives_its_slots_back(served, agent):
    """RemoteFetch.release (a serving engine's dropped lookahead): every slot goes back (the
    layer taken before, once its rows are gone), and the next fetch reads the same rows."""
    memory = RemoteMemory(agent)
    ids = served.indexer.rows(np.random.default_rng(5).integers(0, 90, size=(2, 6)))
    f = memory.fetch(ids, requires_grad=False)
    first = f.rows(0).clone()  # (the tensor itself keeps its slot lent until it is gone)
    f.release()
    f.release()  # idempotent
    _stage_nothing(agent)  # the lent layer's slot, given back: freed by the next fetch
    deadline = time.monotonic() + 10
    while sorted(agent._free) != list(range(len(agent._slots))) and time.monotonic() < deadline:
        time.sleep(0.01)
        with agent._lock:
            agent._poll()  # a slot whose reply was not in yet is freed when the reply is read
    assert sorted(agent._free) == list(range(len(agent._slots)))
    again = memory.fetch(ids, requires_grad=False)
    assert torch.equal(again.rows(0), first)
