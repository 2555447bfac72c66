"""``engram-ray bench interference``: how much work on the memory cores slows the model's
compute on the compute cores of *this* machine, by kind of work.

Why: ``bench offload`` runs the shards, the lookup agent and Ray on the memory cores of the
same machine as the model. Pinned apart they share no core, but they may still share the
last-level cache, the memory bus and the chip's power budget. This benchmark measures that
effect alone: the bench's decode-shaped forward (the backbone only) runs on the compute cores
while the memory cores run one kind of work (one process per memory core, flat out, for all
but ``decode``):

* ``idle``: nothing (the baseline);
* ``spin``: Python arithmetic, a working set of a few KiB: no cache or memory traffic;
* ``gather``: lookups of ``rows`` random rows of ``row_bytes`` from a ``table_gib`` table (per
  memory core), as a shard reads a lookup's rows (no gRPC);
* ``stream``: copying a 64 MiB buffer into another again and again (128 MiB touched: memory
  bandwidth, and the last-level cache flushed);
* ``lookup``: a memory side's whole work per lookup in one process -- a shard of the 100B
  layout (``table_gib`` resident) served over gRPC on loopback, and a client there asking it
  for ``rows`` random rows per call (protobuf, gRPC at both ends, Python, the gather);
* ``decode``: the memory side as bench offload deploys it (as plain processes, without Ray),
  at a decode's pace, not flat out -- two shards of the 100B layout (``table_gib`` resident
  in all) and the node's lookup agent, answering one decode step's lookups (``batch`` tokens
  through the table's Engram layers, rows expanded and lent, as a worker's) every
  ``cadence`` (default: one step of the timed forward). A driver process on the memory cores
  stands in for the worker, so its own work (hashing, the socket) lands there too; each
  role's CPU per step is reported (``cpu_us_per_step``: the two shards together, the agent,
  the driver apart), and ``pace_kept`` says whether the driver kept its pace. Its slowdown is
  the floor under bench offload's remote-vs-local figure on this machine: what the memory
  side's work alone costs the model.

Each round runs every load once, in an order rotated round by round, and each load's figure is
paired with its own round's idle run: ``time / idle time - 1``, median and quartiles over the
rounds (a first, discarded round warms everything up). Each load counts its work, so its rate
(lookups/s, GiB/s) says how hard it pushed: the loads but ``decode`` run flat out, far harder
than a memory side that answers one worker's lookups, so their figures bound what such work
can cost. With ``decode`` among the loads, its memory side (shards, agent, their resident
table) is up, idle, while the others run too: it costs them nothing measurable (~0.2 % of a
core).

It starts processes with the ``spawn`` method: a script that calls :func:`run` needs the usual
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np

from .isolation import Isolation, cpus_allowed, pin_process, process_cpus
from .memory_side import cpu_seconds_between, cpu_snapshot

__all__ = ["LOADS", "run"]

LOADS = ("idle", "spin", "gather", "stream", "lookup", "decode")
_STREAM_FLOATS = 16 << 20  # 64 MiB of float32


def _load(kind: str, cores: list[int], table_gib: float, row_bytes: int, rows: int, ready: Any, stop: Any,
          count: Any, decode: tuple[str, float, int] | None = None) -> None:
    """One memory-side process: every thread pinned to ``cores``, it runs ``kind`` until ``stop``
    is set or its parent dies (a killed benchmark leaves nothing running), counting its work."""
    parent = os.getppid()
    pin_process(os.getpid(), cores)  # every thread, numpy's included
    n = 0
    try:
        if kind == "spin":
            ready.set()
            while not stop.is_set() and os.getppid() == parent:
                x = 0
                for i in range(20_000):
                    x += i * i
                n += 1
                count.value = n
        elif kind == "gather":
            table = np.ones((int(table_gib * 2**30) // row_bytes, row_bytes // 4), dtype=np.float32)  # resident
            rng = np.random.default_rng(os.getpid())
            ready.set()
            while not stop.is_set() and os.getppid() == parent:
                table[rng.integers(0, table.shape[0], rows)].sum()
                n += 1
                count.value = n
        elif kind == "stream":
            a = np.ones(_STREAM_FLOATS, dtype=np.float32)
            b = np.empty_like(a)
            ready.set()
            while not stop.is_set() and os.getppid() == parent:
                np.copyto(b, a)
                n += 1
                count.value = n
        elif kind == "lookup":
            _lookups(table_gib, rows, ready, stop, parent, count)
        elif kind == "decode":
            assert decode is not None
            _decode_steps(*decode, ready, stop, parent, count)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it
        return


def _lookups(table_gib: float, rows: int, ready: Any, stop: Any, parent: int, count: Any) -> None:
    """The ``lookup`` load: one shard of the 100B layout with ``table_gib`` of rows resident,
    served over gRPC on 127.0.0.1, and a client in this process asking it for ``rows`` random
    distinct rows per call, one call after another."""
    import grpc

    from ..config import OptimizerConfig, StoreConfig, table_100b
    from ..core.layout import TableLayout
    from ..core.plan import resident_rows_per_shard
    from ..data import default_vocab
    from ..rpc import codec, create_server
    from ..rpc.generated import engram_pb2 as pb
    from ..rpc.generated import engram_pb2_grpc as pb_grpc
    from ..store import TableShard

    layout = TableLayout.build(table_100b(), default_vocab())
    store = StoreConfig(optimizer=OptimizerConfig(kind="none"),
                        resident_rows_per_shard=resident_rows_per_shard(layout, "float32", 1, table_gib))
    server, port = create_server(TableShard.create(layout, 1, 0, store), "127.0.0.1", 0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub, rng, n = pb_grpc.EngramMemoryStub(channel), np.random.default_rng(os.getpid()), 0
        ready.set()
        while not stop.is_set() and os.getppid() == parent:
            ids = np.unique(rng.integers(0, layout.total_rows, rows))
            stub.Lookup(pb.LookupRequest(fingerprint=layout.fingerprint, row_ids=codec.encode(ids)), timeout=10)
            n += 1
            count.value = n
    finally:
        channel.close()
        server.stop(0)


def _decode_steps(socket: str, cadence_s: float, batch: int, ready: Any, stop: Any, parent: int,
                  count: Any) -> None:
    """The ``decode`` load's driver: every ``cadence_s``, a decode step's lookups of ``batch``
    new tokens through the lookup agent at ``socket`` (every Engram layer in one packet, rows
    expanded in the slot and lent, as a worker's host inference asks for them)."""
    from ..agent import AgentClient
    from ..config import table_100b
    from ..core.indexer import RowIndexer
    from ..core.layout import TableLayout
    from ..data import default_vocab

    vocab = default_vocab()
    cfg = table_100b()
    layout = TableLayout.build(cfg, vocab)
    indexer = RowIndexer.build(cfg, vocab, layout=layout)
    rng = np.random.default_rng(os.getpid())
    # the agent listens already (plain_memory_side waited): a failure shows well within measure's 120 s
    with AgentClient(socket, layout, start=lambda: None, connect_timeout=30) as agent:
        history, n = indexer.new_history(batch), 0
        ready.set()
        due = time.perf_counter()
        while not stop.is_set() and os.getppid() == parent:
            rows, history = indexer.step(history, rng.integers(0, vocab.num_tokens, size=(batch, 1)))
            for f in agent.prefetch_unique_many([np.ascontiguousarray(r).reshape(-1) for r in rows],
                                                ordered=True, expand=True):
                f.lend(timeout=10.0)
                f.give_back()
            n += 1
            count.value = n
            due = max(due + cadence_s, time.perf_counter())  # late: the next step at once, no catching up
            stop.wait(max(0.0, due - time.perf_counter()))  # a stop ends the wait


def _forward(model_cfg: Any, batch: int, positions: int) -> Any:
    """A timed decode-shaped forward: ``positions`` steps of ``batch`` tokens with a KV cache."""
    import torch

    from ..model import EngramLM

    torch.manual_seed(0)
    model = EngramLM(model_cfg, None).eval()
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, 1))

    def once() -> float:
        cache = model.new_cache(batch)
        t0 = time.perf_counter()
        with torch.no_grad():
            for pos in range(positions):
                model(tokens, None, cache, pos)
        return time.perf_counter() - t0
    return once


def _check(model_cfg: Any, rounds: int, batch: int, positions: int, table_gib: float, row_bytes: int, rows: int,
           loads: tuple[str, ...], memory_cores: int) -> None:
    bad = [k for k in loads if k not in LOADS]
    if bad or "idle" not in loads or len(set(loads)) != len(loads):
        raise ValueError(f"loads {list(loads)}: expected distinct kinds of {list(LOADS)}, with 'idle' (the baseline)")
    for name, v in (("rounds", rounds), ("batch", batch), ("rows", rows)):
        if v < 1:
            raise ValueError(f"{name}={v}: expected >= 1")
    if not 1 <= positions <= model_cfg.max_seq_len:
        raise ValueError(f"positions={positions}: expected 1..{model_cfg.max_seq_len} (the model's max_seq_len)")
    if row_bytes < 4 or row_bytes % 4:
        raise ValueError(f"row_bytes={row_bytes}: expected a positive multiple of 4 bytes (float32 rows)")
    if "gather" in loads or "lookup" in loads or "decode" in loads:
        # each memory core's own table for gather and lookup; decode's shards share one, all along
        need = table_gib * 2**30 * ((memory_cores if "gather" in loads or "lookup" in loads else 0)
                                    + ("decode" in loads))
        free = _mem_available()
        if not row_bytes <= table_gib * 2**30 or (free is not None and need > 0.8 * free):
            raise ValueError(f"table_gib={table_gib}: the tables hold {need / 2**30:.2f} GiB in all (gather and "
                             f"lookup: one per memory core, of {memory_cores}; decode: one over its shards); "
                             f"expected at least one row and at most 80 % of the {(free or 0) / 2**30:.1f} GiB "
                             "available")


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run(model_cfg: Any, *, rounds: int = 5, batch: int = 8, positions: int = 64, table_gib: float = 1.0,
        row_bytes: int = 320, rows: int = 256, loads: tuple[str, ...] = LOADS, cadence_ms: float | None = None,
        progress: bool = False) -> dict[str, Any]:
    """Time the forward under each load for ``rounds`` rounds (plus a discarded warm-up round),
    each time the best of 3 after the load is running; the report with, per load, its slowdown
    against its round's idle run and the rate its processes worked at. ``cadence_ms``: the
    ``decode`` load's step (None: one step of the timed forward)."""
    if cadence_ms is not None and not (math.isfinite(cadence_ms) and 0 < cadence_ms <= 10_000):
        raise ValueError(f"cadence_ms={cadence_ms}: expected a step of more than 0 and at most 10,000 ms (or None: "
                         "the forward's own)")
    iso = Isolation.split()
    if not iso.enabled:
        raise ValueError(f"bench interference needs at least 2 cores to split; this process may use "
                         f"{sorted(os.sched_getaffinity(0))}")
    _check(model_cfg, rounds, batch, positions, table_gib, row_bytes, rows, loads, len(iso.memory))
    side = None
    if "decode" in loads:
        from ..config import table_100b
        from ..core.layout import TableLayout
        from ..data import default_vocab
        from .memory_side import plain_memory_side
        side = plain_memory_side("table_100b", 2, iso.memory, table_gib,
                                 layout=TableLayout.build(table_100b(), default_vocab()))
    with side if side is not None else contextlib.nullcontext() as memory_side:
        return _run(model_cfg, iso, memory_side, rounds, batch, positions, table_gib, row_bytes, rows, loads,
                    cadence_ms, progress)


def _run(model_cfg: Any, iso: Isolation, memory_side: Any, rounds: int, batch: int, positions: int,
         table_gib: float, row_bytes: int, rows: int, loads: tuple[str, ...], cadence_ms: float | None,
         progress: bool) -> dict[str, Any]:
    times: dict[str, list[float]] = {k: [] for k in loads}
    rates: dict[str, list[float]] = {k: [] for k in loads}
    load_cpus: dict[str, set[int]] = {k: set() for k in loads}
    step_cpu: dict[str, list[float]] = {}  # decode: each role's CPU seconds and the steps, summed
    seen: dict[str, Any] = {}
    ctx = mp.get_context("spawn")  # no torch state copied into the loads

    def measure(kind: str, once: Any, counted: bool) -> tuple[float, float]:
        """Best of 3 forwards with ``kind`` running; (seconds, the load's units per second).
        ``counted``: a round that counts (its decode CPU is added up)."""
        procs, stop = [], ctx.Event()
        try:
            decode = None
            if kind == "decode":  # one worker's steps: one driver, free to use every memory core
                memory_side.check()
                decode = (memory_side.socket, seen["cadence_s"], batch)
            for cores in ([iso.memory] if kind == "decode" else [[c] for c in iso.memory] if kind != "idle" else []):
                ready, count = ctx.Event(), ctx.Value("q", 0, lock=False)
                p = ctx.Process(target=_load, args=(kind, cores, table_gib, row_bytes, rows, ready, stop, count,
                                                    decode), daemon=True)
                p.start()
                procs.append((p, ready, count))
            deadline = time.monotonic() + 120
            for p, ready, _ in procs:
                while not ready.wait(0.2):
                    if not p.is_alive():
                        if kind == "decode":  # the cause, where it is the memory side's
                            memory_side.check()
                        raise RuntimeError(f"the {kind!r} load on core(s) {iso.memory} exited with code "
                                           f"{p.exitcode} before it started (table {table_gib:g} GiB)")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the {kind!r} load did not start within 120 s")
            roles = dict(memory_side.pids, driver=[p.pid for p, _, _ in procs]) if kind == "decode" else {}
            for pid in [p.pid or 0 for p, _, _ in procs] + [q for pids in roles.values() for q in pids]:
                load_cpus[kind] |= set(process_cpus(pid))
            time.sleep(0.3)  # at full speed before the clock starts
            cpu0 = {r: cpu_snapshot(pids) for r, pids in roles.items()}
            c0, t0 = sum(c.value for _, _, c in procs), time.perf_counter()
            best = min(once() for _ in range(3))
            steps = sum(c.value for _, _, c in procs) - c0
            rate = steps / (time.perf_counter() - t0)
            # a load (or the memory side) that died while the clock ran: its figures would be wrong
            if kind == "decode":  # first: a dead agent takes its driver with it
                memory_side.check()
            for p, _, _ in procs:
                if not p.is_alive():
                    raise RuntimeError(f"the {kind!r} load exited with code {p.exitcode} while the forward was timed")
            for r, pids in roles.items() if counted else ():
                acc = step_cpu.setdefault(r, [0.0, 0.0])
                acc[0] += cpu_seconds_between(cpu0[r], cpu_snapshot(pids))
                acc[1] += steps
            return best, rate
        finally:
            stop.set()
            for p, _, _ in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)

    def body() -> None:
        seen["model_cpus"] = cpus_allowed(os.getpid(), iso.model_tid)  # the kernel's word
        once = _forward(model_cfg, batch, positions)
        once()  # cold: allocations, caches
        seen["cadence_s"] = cadence_ms / 1e3 if cadence_ms is not None else once() / positions
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=(rounds + 1) * len(loads), desc="interference", unit="run")
        for r in range(rounds + 1):  # round 0 warms up (allocations, caches, clocks) and is dropped
            order = loads[r % len(loads):] + loads[:r % len(loads)]
            for kind in order:
                t, rate = measure(kind, once, counted=r > 0)
                if r:
                    times[kind].append(t)
                    rates[kind].append(rate)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()

    iso.run_model(body)
    idle = np.array(times["idle"])
    results = {}
    for kind, ts in times.items():
        ratio = np.array(ts) / idle - 1.0                     # paired with the same round's idle run
        q1, med, q3 = (float(x) for x in np.percentile(ratio, [25, 50, 75]))
        results[kind] = {"median_s": float(np.median(ts)), "runs_s": ts, "slowdown": med,
                         "slowdown_quartiles": [q1, q3],
                         "slowdown_per_round": ratio.tolist(), "cpus": sorted(load_cpus[kind]),
                         "rate_per_s": float(np.median(rates[kind])) if kind != "idle" else 0.0,
                         "rate_unit": _UNITS[kind]}
    for kind in ("gather", "stream", "lookup"):
        if kind in results:  # in bytes too: comparable with a memory side's row traffic
            per = 2 * 4 * _STREAM_FLOATS if kind == "stream" else rows * row_bytes
            results[kind]["gib_per_s"] = results[kind]["rate_per_s"] * per / 2**30
    if "decode" in results:
        d = results["decode"]
        d["cadence_ms"] = 1e3 * seen["cadence_s"]
        d["cpu_us_per_step"] = {r: 1e6 * s / max(n, 1.0) for r, (s, n) in step_cpu.items()}
        # 1.0: a step every cadence, as asked; below: the driver fell behind (e.g. on a busy core)
        d["pace_kept"] = d["rate_per_s"] * seen["cadence_s"]
        # the memory side's share of its cores' time (the driver's, a worker's part, left out)
        d["memory_side_busy"] = sum(v for r, v in d["cpu_us_per_step"].items() if r != "driver") \
            / 1e6 * d["rate_per_s"] / len(iso.memory)
    return {"benchmark": "interference", "model": dataclasses.asdict(model_cfg), "rounds": rounds,
            "workload": {"decode_batch": batch, "positions": positions, "best_of": 3, "warmup_rounds": 1},
            "gather": {"table_gib_per_core": table_gib, "row_bytes": row_bytes, "rows_per_lookup": rows},
            "isolation": {"compute_cores": iso.compute, "memory_cores": iso.memory,
                          "load_processes_per_kind": len(iso.memory), "model_thread_cpus": seen.get("model_cpus"),
                          **({"decode_processes": {"driver": 1, **{r: len(p) for r, p in memory_side.pids.items()}}}
                             if "decode" in loads else {})},
            "results": results,
            "note": "slowdown: each round's forward time with the load over that round's idle run, minus one; "
                    "median and quartiles over rounds. The loads but decode run flat out (rate_per_s), far harder "
                    "than a memory side answering one worker's lookups: an upper bound on what such work can cost. "
                    "decode is that memory side at a decode's pace (cadence_ms): its slowdown is what the memory "
                    "side's work costs the model here (cpu_us_per_step: each role's CPU per step; the driver "
                    "stands in for the worker, whose part runs on the compute cores in bench offload)"}


_UNITS = {"idle": "-", "spin": "20k-iteration loops", "gather": "lookups", "stream": "64 MiB copies",
          "lookup": "gRPC lookups", "decode": "decode steps' lookups through the agent"}
#: gib_per_s counts bytes moved: a gather reads its rows; a copy reads 64 MiB and writes 64 MiB.
