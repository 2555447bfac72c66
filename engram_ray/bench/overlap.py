"""``engram-ray bench overlap``: what a decode step's lookups cost the compute around them, on
this machine, by where the lookup's work runs.

Why: ``bench offload`` on one machine puts the shards beside the model (memory cores against
compute cores). Pinned apart they share no core, but a shard's gRPC server, the lookup agent and
the model share the last-level cache. ``bench interference`` bounds what *steady* work on the
memory cores costs; this benchmark measures the pattern decode really has -- a short burst of
memory-side work per step, just before or alongside the model's compute -- and separates the
shards' part of it from the agent's.

The timed compute is one decode step of a backbone of ``layers`` blocks (default: the blocks
before the 100B table's first Engram layer, the compute a step's lookups overlap): embedding,
blocks and final norm, *not* the output head, whose tied 50k x dim weights (24.5 MiB for the
demo backbone) would dominate the step and the cache. It runs under five conditions:

* ``none``:      right after the previous timed step (the baseline);
* ``idle``:      the model thread first sleeps for the setting's lookup round trip;
* ``idle_poll``: it first polls a socket for that long (as a reader of the agent can, see
                 ``AgentClient.spin_s``) -- ``idle - idle_poll`` is what sleeping itself costs;
* ``inflight``:  a decode step's lookups (every Engram layer in one packet, ordered, through the
                 agent) go out just before the step and are read after it (what prefetching does);
* ``after``:     the lookups go out and are read (polled for: ``spin_s`` above the round trip),
                 then the step -- ``after - idle_poll`` is what the memory side's work costs the
                 compute that follows it, beyond the wait.

Two memory settings, both deployed at once (two services on Ray, an agent each) and
interleaved, so a slow minute of the machine touches both:

* ``shards``:     every lookup is answered by a shard, on this machine's memory cores, as in
                  ``bench offload``;
* ``agent_only``: the agent's row cache (LRU) holds every row the benchmark asks for (warmed
                  first), so the shards do nothing but answer the cache's revalidation of a
                  shard silent for a second (counted: ``timed_cache_misses``). It measures the
                  agent's cache path, not the gRPC client work an agent does for remote shards:
                  for a compute node whose shards live elsewhere it is a lower bound.

Every iteration runs each (setting, condition) once in a fresh random order, each lookup on a
step of tokens not asked for in that iteration; each condition is paired with its setting's
``none`` run of the same iteration: the extra microseconds, median and quartiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import numpy as np

from ..config import EngramConfig, OptimizerConfig, StoreConfig
from .isolation import Isolation
from .memory_source import DeployedShards
from .summary import spread

__all__ = ["CONDITIONS", "SETTINGS", "run"]

CONDITIONS = ("none", "idle", "idle_poll", "inflight", "after")
SETTINGS = ("shards", "agent_only")
#: Distinct decode steps whose rows the benchmark asks for, in turn (the agent_only cache holds all).
POOL = 64


def _check(iterations: int, batch: int, layers: int, settings: tuple[str, ...]) -> None:
    for name, v in (("iterations", iterations), ("batch", batch), ("layers", layers)):
        if v < 1:
            raise ValueError(f"{name}={v}: expected >= 1")
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings or len(set(settings)) != len(settings):
        raise ValueError(f"settings {list(settings)}: expected distinct names of {list(SETTINGS)}")


def _chunk(model_cfg: Any, layers: int, batch: int) -> Any:
    """One decode step (a fresh KV cache, position 0) of a ``layers``-block backbone without its
    output head: seconds."""
    import torch

    from ..model import EngramLM

    torch.manual_seed(0)
    model = EngramLM(dataclasses.replace(model_cfg, n_layers=layers), None).eval()
    # the blocks' compute, not the vocabulary projection: a head of one output (the cache takes
    # its device and dtype from the head's weight)
    model.head = torch.nn.Linear(model_cfg.dim, 1, bias=False)
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, 1))

    def once() -> float:
        cache = model.new_cache(batch)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(tokens, None, cache, 0)
        return time.perf_counter() - t0
    return once


def _poll_for(seconds: float, sock: Any) -> None:
    """Poll ``sock`` (non-blocking reads, nothing to read) for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        try:
            sock.recv(64)
        except BlockingIOError:
            pass


def _paired(times: dict[str, list[float]], a: str, b: str) -> dict[str, Any]:
    """Microseconds condition ``a`` took over ``b`` in the same iteration: median, quartiles."""
    d = 1e6 * (np.array(times[a]) - np.array(times[b]))
    s = spread(d.tolist())
    return {"median": float(np.median(d)), "quartiles": [s["q1"], s["q3"]]}


def _measure(agents: dict[str, Any], steps: list[list[np.ndarray]], once: Any, iterations: int,
             bar: Any) -> dict[str, Any]:
    """Every (setting, condition), ``iterations`` times (after one discarded warm-up pass)."""
    import socket

    def finish(fetches: list[Any]) -> None:
        for f in fetches:
            f.result()
            f.release()

    gaps, misses0 = {}, {}
    for setting, agent in agents.items():
        rtt = []
        for i in range(2 * len(steps)):  # warms the agent (and its cache), and times a round trip
            t0 = time.perf_counter()
            finish(agent.prefetch_unique_many(steps[i % len(steps)], ordered=True))
            rtt.append(time.perf_counter() - t0)
        gaps[setting] = float(np.median(rtt[len(steps):]))
        misses0[setting] = (agent.stats().get("cache") or {}).get("misses")
    runs = [(s, c) for s in agents for c in CONDITIONS]
    times: dict[str, dict[str, list[float]]] = {s: {c: [] for c in CONDITIONS} for s in agents}
    rng = np.random.default_rng(1)
    quiet, other = socket.socketpair()
    quiet.setblocking(False)
    try:
        for it in range(iterations + 1):
            for j, k in enumerate(rng.permutation(len(runs))):
                setting, cond = runs[k]
                agent, step = agents[setting], steps[(it * len(runs) + j) % len(steps)]
                if cond == "none":
                    t = once()
                elif cond == "idle":
                    time.sleep(gaps[setting])
                    t = once()
                elif cond == "idle_poll":
                    _poll_for(gaps[setting], quiet)
                    t = once()
                elif cond == "inflight":
                    fetches = agent.prefetch_unique_many(step, ordered=True)
                    t = once()
                    finish(fetches)
                else:
                    finish(agent.prefetch_unique_many(step, ordered=True))
                    t = once()
                if it:
                    times[setting][cond].append(t)
            if bar is not None:
                bar.update(1)
    finally:
        quiet.close()
        other.close()
    out: dict[str, Any] = {}
    for setting, agent in agents.items():
        ts = times[setting]
        res: dict[str, Any] = {"round_trip_us": 1e6 * gaps[setting], "spin_s": agent.spin_s,
                               "conditions": {}}
        base = np.array(ts["none"])
        for cond, xs in ts.items():
            p = _paired(ts, cond, "none")                  # paired with the iteration's none run
            res["conditions"][cond] = {"median_us": 1e6 * float(np.median(xs)), "extra_us": p["median"],
                                       "extra_us_quartiles": p["quartiles"],
                                       "slowdown": float(np.median(np.array(xs) / base - 1))}
        res["sleep_us"] = _paired(ts, "idle", "idle_poll")
        res["memory_work_us"] = _paired(ts, "after", "idle_poll")
        st = agent.stats()
        cache = st.get("cache")
        res["cache"], res["lookups"] = cache, st.get("lookups")
        #: Rows the timed lookups fetched from shards despite the cache (None: no cache).
        res["timed_cache_misses"] = (cache["misses"] - misses0[setting]
                                     if cache and misses0[setting] is not None else None)
        out[setting] = res
    return out


def run(engram_cfg: EngramConfig, model_cfg: Any, vocab: Any, *, iterations: int = 200, batch: int = 8,
        layers: int | None = None, shards: int = 2, max_resident_gib: float = 1.0,
        settings: tuple[str, ...] = SETTINGS, progress: bool = False) -> dict[str, Any]:
    """Deploy the table once per setting and time the chunk under every condition; the report."""
    from ..core.indexer import RowIndexer

    layers = layers if layers is not None else min(engram_cfg.layer_ids)
    _check(iterations, batch, layers, settings)
    iso = Isolation.split()
    if not iso.enabled:
        raise ValueError("bench overlap needs at least 2 cores: the model on one side, the memory side on the other")
    store = StoreConfig(init_std=0.02, optimizer=OptimizerConfig(kind="none"))
    rng = np.random.default_rng(0)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=iterations + 1, desc="bench overlap", unit="iteration")
    iso.memory_side()  # before Ray and the shards start: they inherit it
    try:
        with contextlib.ExitStack() as stack:
            agents: dict[str, Any] = {}
            steps: list[list[np.ndarray]] = []
            for setting in settings:
                src = stack.enter_context(DeployedShards(
                    engram_cfg, vocab, shards=shards, store=store, max_resident_gib=max_resident_gib,
                    name=f"bench-overlap-{setting.replace('_', '-')}"))
                if not steps:
                    indexer = RowIndexer.build(engram_cfg, vocab, layout=src.layout)
                    tokens = rng.integers(0, vocab.num_tokens, size=(POOL, batch, 1))
                    steps = [list(indexer.rows(t)) for t in tokens]                  # POOL x L x [B, 1, H]
                cache = 0
                if setting == "agent_only":
                    ids = sum(int(np.unique(np.concatenate([r.ravel() for r in st])).size) for st in steps)
                    # room to spare: the cache is set-associative, and a row evicted by a conflict
                    # goes to a shard; LRU admits every row (TinyLFU may refuse one asked twice)
                    cache = max(16 * ids * src.layout.row_bytes("float32"), 4 << 20)
                # the reader polls (as idle_poll does), so after - idle_poll holds the wait alike
                agents[setting] = src.agent_client(cache_bytes=cache, cache_policy="lru", spin_s=0.01)
                stack.callback(agents[setting].close)
            iso.pin_children()

            def body() -> tuple[dict[str, Any], dict[str, Any]]:
                res = _measure(agents, steps, _chunk(model_cfg, layers, batch), iterations, bar)
                return res, iso.record()  # while the model thread and the shards are alive
            results, record = iso.run_model(body)
    finally:
        iso.restore()
        if bar is not None:
            bar.close()
    return {"benchmark": "overlap", "engram": engram_cfg.to_dict(), "model": dataclasses.asdict(model_cfg),
            "chunk": {"layers": layers, "first_engram_layer": min(engram_cfg.layer_ids), "decode_batch": batch,
                      "what": "one decode step, fresh KV cache: embedding, blocks, final norm; no output head"},
            "iterations": iterations,
            "order": "every (setting, condition) once per iteration in a fresh random order; one warm-up iteration",
            "table": {"shards": shards, "max_resident_gib": max_resident_gib}, "results": results,
            "isolation": record,
            "note": "extra_us: the step's time under the condition minus its setting's 'none' run of the same "
                    "iteration; sleep_us: 'idle' minus 'idle_poll' (what sleeping costs beyond polling); "
                    "memory_work_us: 'after' minus 'idle_poll' (the memory side's work, beyond the wait)"}
