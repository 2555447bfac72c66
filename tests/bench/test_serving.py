"""The serving workload's continuous-batching loop: each request gets what it would alone."""

import collections
import dataclasses

import numpy as np
import pytest
import torch

from engram_ray import config as C
from engram_ray.bench.serving import Request, draw_requests, serve
from engram_ray.core.indexer import RowIndexer
from engram_ray.core.tokens import CompressedVocab
from engram_ray.model import EngramLM, LocalMemory


@pytest.fixture(scope="module")
def setup():
    mc = dataclasses.replace(C.model_tiny(), hc_mult=2)
    ec = C.tiny()
    indexer = RowIndexer.build(ec, CompressedVocab(np.arange(mc.vocab_size) // 2))
    torch.manual_seed(0)
    model = EngramLM(mc, ec).eval()
    memory = LocalMemory(indexer.layout, init_std=0.5)
    return model, memory, indexer


def _alone(model, memory, indexer, req):
    """Greedy generation of one request, batch 1: prompt, then one token at a time."""
    cache, hist = model.new_cache(1), indexer.new_history(1)
    new, pos, out = req.prompt[None], 0, []
    while len(out) < req.output_len:
        fetch = None
        if memory is not None:
            rows, hist = indexer.step(hist, new)
            fetch = memory.fetch(rows, requires_grad=False)
        last = model(torch.from_numpy(new), fetch, cache=cache, start_pos=pos)[0, -1]
        pos += new.shape[1]
        out.append(int(last.argmax()))
        new = np.array([[out[-1]]], dtype=np.int64)
    return out


@pytest.mark.parametrize("lookahead", [True, False])
@pytest.mark.parametrize("max_batch,budget", [(3, 5), (4, 64), (2, 3)])
@torch.no_grad()
def test_continuous_batching_gives_each_request_its_solo_output(setup, max_batch, budget, lookahead):
    model, memory, indexer = setup
    tokens = np.random.default_rng(1).integers(0, model.cfg.vocab_size, size=500)
    reqs = draw_requests(tokens, 7, (3, 12), (1, 9), seed=2)
    acc = collections.defaultdict(float)
    got = serve(model, memory, indexer, reqs, max_batch=max_batch, token_budget=budget,
                device=torch.device("cpu"), acc=acc, lookahead=lookahead)
    assert got.outputs == [_alone(model, memory, indexer, r) for r in reqs]
    if lookahead:
        # the next plan is predicted exactly: every chunk after the first step's was asked
        # for a step ahead, and no lookahead went unused
        assert got.lookahead["dropped"] == 0 and got.lookahead["hits"] > 0, got.lookahead
        assert got.lookahead["misses"] == len(_first_step_chunks(reqs, max_batch, budget)), got.lookahead
    else:
        assert got.lookahead == {}
    assert got.prompt_tokens == sum(r.prompt.size for r in reqs)
    assert got.output_tokens == sum(r.output_len for r in reqs) == sum(map(len, got.outputs))
    assert got.seconds > 0 and acc["hash_s"] > 0 and got.steps >= max(r.output_len for r in reqs)


def _first_step_chunks(reqs, max_batch, budget):
    """The chunks of the engine's first step: the first ``max_batch`` prompts, FIFO up to the budget."""
    out, left = [], budget
    for r in reqs[:max_batch]:
        if left <= 0:
            break
        out.append(min(left, r.prompt.size))
        left -= out[-1]
    return out


@torch.no_grad()
def test_the_backbone_alone_serves_too(setup):
    model, _, indexer = setup
    plain = EngramLM(model.cfg, None).eval()
    reqs = [Request(np.arange(1, 6, dtype=np.int64), 3), Request(np.arange(2, 12, dtype=np.int64), 2)]
    got = serve(plain, None, indexer, reqs, max_batch=2, token_budget=4, device=torch.device("cpu"))
    assert got.outputs == [_alone(plain, None, indexer, r) for r in reqs]


def test_requests_are_drawn_in_their_ranges():
    reqs = draw_requests(np.arange(5000), 50, (100, 300), (10, 20), seed=0)
    assert all(100 <= r.prompt.size <= 300 and 10 <= r.output_len <= 20 for r in reqs)
    again = draw_requests(np.arange(5000), 50, (100, 300), (10, 20), seed=0)  # fixed by the seed
    assert all(np.array_equal(a.prompt, b.prompt) and a.output_len == b.output_len for a, b in zip(reqs, again))
