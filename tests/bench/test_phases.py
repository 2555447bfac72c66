"""bench offload's phases: decode in alternating micro-batches computes what one batch does."""

import collections
import os
import time

import numpy as np
import pytest
import torch

from engram_ray import config as C
from engram_ray.bench import phases
from engram_ray.core.indexer import RowIndexer
from engram_ray.core.tokens import CompressedVocab
from engram_ray.model import EngramLM, LocalMemory


def _tiny():
    """The tiny backbone with Engram, its indexer and an in-process table."""
    mc, ec = C.model_tiny(), C.tiny()
    indexer = RowIndexer.build(ec, CompressedVocab(np.arange(mc.vocab_size) // 2))
    torch.manual_seed(0)
    return mc, indexer, EngramLM(mc, ec).eval(), LocalMemory(indexer.layout, init_std=0.5)


@torch.no_grad()
def test_microbatched_decode_samples_what_one_batch_samples():
    mc, indexer, model, memory = _tiny()
    prompt = torch.randint(0, mc.vocab_size, (4, 6))

    def run(m):
        parts = [phases._Part(model, indexer, rows, torch.device("cpu")) for rows in torch.tensor_split(prompt, m)]
        acc = collections.defaultdict(float)
        for p in parts:
            p.issue(memory, acc)
        for _ in range(5):
            for p in parts:
                p.forward(model, acc)
                p.issue(memory, acc)
        return torch.cat([p.new for p in parts])

    assert torch.equal(run(1), run(2))
    work = phases.Workload([], prompt, 3, [], 2, 8)
    assert work.tokens("decode_mb2") == work.tokens("decode") == 4 * (6 + 3)
    acc = collections.defaultdict(float)
    assert phases.run_phase(phases.microbatch_phase(2), model, memory, indexer, work, torch.device("cpu"), acc) > 0
    assert acc["hash_s"] > 0


def test_a_run_counts_the_model_threads_time_asleep(monkeypatch):
    def sleepy(model, memory, indexer, work, device, acc):
        time.sleep(0.05)                                  # blocked off the CPU, as for rows not arrived
        t = time.perf_counter()
        while time.perf_counter() - t < 0.02:             # on the CPU
            pass
        return 0.07
    monkeypatch.setitem(phases._RUN, "decode", sleepy)
    acc = collections.defaultdict(float)
    phases.run_phase("decode", None, None, None, None, torch.device("cpu"), acc)
    assert 0.045 <= acc["off_cpu_s"] <= 0.065
    assert "memory_busy_s" not in acc  # no memory cores named: not read


def test_a_run_counts_the_memory_cores_busy_seconds(monkeypatch):
    def spin(model, memory, indexer, work, device, acc):
        t = time.perf_counter()
        while time.perf_counter() - t < 0.3:
            pass
        return 0.3
    monkeypatch.setitem(phases._RUN, "decode", spin)
    acc = collections.defaultdict(float)
    cores = tuple(sorted(os.sched_getaffinity(0)))  # wherever this thread runs
    phases.run_phase("decode", None, None, None, None, torch.device("cpu"), acc, cores)
    assert 0.2 <= acc["memory_busy_s"] <= 0.3 * len(cores) + 0.1


@torch.no_grad()
def test_prefill_asks_for_the_next_sequences_rows_before_this_ones_forward():
    mc, indexer, model, local = _tiny()
    seqs = [torch.randint(0, mc.vocab_size, (1, n)) for n in (5, 7, 4)]
    work = phases.Workload([(t, t.numpy()) for t in seqs], seqs[0], 1, [], 2, 8)
    events = []

    class Memory:  # LocalMemory, with the order of fetches recorded
        def fetch(self, rows, requires_grad=True):
            f = local.fetch(rows, requires_grad)
            events.append(("fetch", rows))
            return f

    def recorded(ids, fetch):
        events.append(("forward", fetch.row_ids if hasattr(fetch, "row_ids") else None))
        return model(ids, fetch)

    expect = [model(t, local.fetch(indexer.rows(t.numpy()), False)) for t in seqs]
    outs = []
    phases._prefill(lambda ids, f: outs.append(recorded(ids, f)), Memory(), indexer, work, torch.device("cpu"),
                    collections.defaultdict(float))
    assert [e[0] for e in events] == ["fetch", "fetch", "forward", "fetch", "forward", "forward"]
    fetched = [e[1] for e in events if e[0] == "fetch"]
    for t, rows in zip(seqs, fetched):  # each sequence's own rows, in order
        assert np.array_equal(rows, indexer.rows(t.numpy()))
    assert all(torch.equal(a, b) for a, b in zip(outs, expect))  # the same logits as fetching at once


def test_prefill_gives_back_an_unused_lookahead_when_a_forward_raises():
    _, indexer, _, _ = _tiny()
    seqs = [torch.randint(0, 50, (1, 4)) for _ in range(3)]
    work = phases.Workload([(t, t.numpy()) for t in seqs], seqs[0], 1, [], 2, 8)
    released = []

    class Fetch:
        wait_seconds = 0.0

        def __init__(self, i):
            self.i = i

        def release(self):
            released.append(self.i)

    class Memory:
        n = 0

        def fetch(self, rows, requires_grad=True):
            self.n += 1
            return Fetch(self.n)

    def model(ids, fetch):
        if fetch.i == 2:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        phases._prefill(model, Memory(), indexer, work, torch.device("cpu"), collections.defaultdict(float))
    assert released == [3]  # the third sequence's rows, asked for before the second's forward failed
