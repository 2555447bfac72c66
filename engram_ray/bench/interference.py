"""``engram-ray bench interference``: how much work on the memory cores slows the model's
compute on the compute cores of *this* machine, by kind of work.

Why: ``bench offload`` runs the shards, the lookup agent and Ray on the memory cores of the
same machine as the model. Pinned apart, they share no core, but they may still share the
last-level cache, the memory bus and the chip's power budget, and a forward pass that streams
its weights slows when a neighbour streams memory. On a cluster the shards live on memory
nodes, so this part of the figure belongs to the benchmark's single box, not to the design.
This benchmark measures the effect alone. It runs the bench's decode-shaped forward on the
compute cores while one process on each memory core runs flat out at one kind of work:

* ``idle``: nothing (the baseline);
* ``spin``: Python arithmetic, a working set of a few KiB: shares no cache or memory traffic;
* ``gather``: random rows of a ``table_gib`` table read in lookups of ``rows`` ids, as a shard
  answers a lookup (the rows' bytes only: no gRPC);
* ``stream``: copying a 64 MiB buffer again and again: memory bandwidth.

Loads alternate in rounds, so drift hits every load alike. The figure is each load's median
forward time over the idle median, minus one. The memory side of ``bench offload`` is busy
only part of the time, so it slows compute by a fraction of the ``gather`` figure.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import time
from typing import Any

import numpy as np

from .isolation import Isolation, cpus_allowed

__all__ = ["LOADS", "run"]

LOADS = ("idle", "spin", "gather", "stream")


def _load(kind: str, cores: list[int], table_gib: float, row_bytes: int, rows: int, ready: Any, stop: Any) -> None:
    """One memory-side process: pinned to ``cores``, it runs ``kind`` until ``stop`` is set."""
    os.sched_setaffinity(0, cores)
    if kind == "spin":
        ready.set()
        x = 0
        while not stop.is_set():
            for i in range(20_000):
                x += i * i
    elif kind == "gather":
        width = max(1, row_bytes // 4)
        table = np.ones((max(1, int(table_gib * 2**30) // (4 * width)), width), dtype=np.float32)  # touched: resident
        rng = np.random.default_rng(os.getpid())
        ready.set()
        while not stop.is_set():
            table[rng.integers(0, table.shape[0], rows)].sum()
    elif kind == "stream":
        a = np.ones(16 << 20, dtype=np.float32)
        b = np.empty_like(a)
        ready.set()
        while not stop.is_set():
            np.copyto(b, a)


def _forward(model_cfg: Any, batch: int, positions: int) -> Any:
    """A timed decode-shaped forward: ``positions`` steps of ``batch`` tokens with a KV cache
    (the backbone only: the rows' part is what the loads stand in for)."""
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


def run(model_cfg: Any, *, rounds: int = 5, batch: int = 8, positions: int = 64, table_gib: float = 1.0,
        row_bytes: int = 320, rows: int = 256, loads: tuple[str, ...] = LOADS, progress: bool = False
        ) -> dict[str, Any]:
    """Time the forward under each load, ``rounds`` times in turn (each time the best of 3, after
    the load has started); the report with each load's median, quartiles and slowdown."""
    bad = [k for k in loads if k not in LOADS]
    if bad or "idle" not in loads:
        raise ValueError(f"loads {list(loads)}: expected some of {list(LOADS)}, with 'idle' (the baseline)")
    if rounds < 1 or batch < 1 or positions < 1 or positions > model_cfg.max_seq_len:
        raise ValueError(f"rounds={rounds}, batch={batch}, positions={positions}: expected >= 1, and positions "
                         f"<= the model's max_seq_len={model_cfg.max_seq_len}")
    if not 0 < table_gib < 1024 or row_bytes < 4 or rows < 1:
        raise ValueError(f"table_gib={table_gib}, row_bytes={row_bytes}, rows={rows}: expected a positive table "
                         "(< 1 TiB), rows of at least 4 bytes and at least one row per lookup")
    iso = Isolation.split()
    if not iso.enabled:
        raise ValueError(f"bench interference needs at least 2 cores to split; this process may use "
                         f"{sorted(os.sched_getaffinity(0))}")
    times: dict[str, list[float]] = {k: [] for k in loads}
    load_cpus: dict[str, list[int]] = {}
    ctx = mp.get_context("spawn")  # no torch state copied into the loads

    def body() -> None:
        once = _forward(model_cfg, batch, positions)
        once()  # warm: allocations, kernels chosen
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=rounds * len(loads), desc="interference", unit="run")
        for _ in range(rounds):
            for kind in loads:
                procs, stop = [], ctx.Event()
                try:
                    if kind != "idle":
                        for core in iso.memory:
                            ready = ctx.Event()
                            p = ctx.Process(target=_load, args=(kind, [core], table_gib, row_bytes, rows, ready, stop),
                                            daemon=True)
                            p.start()
                            procs.append((p, ready))
                        for _, ready in procs:
                            if not ready.wait(120):
                                raise RuntimeError(f"the {kind!r} load did not start within 120 s")
                        load_cpus[kind] = sorted({c for q, _ in procs if q.pid for c in cpus_allowed(q.pid)})
                        time.sleep(0.3)  # at full speed before the clock starts
                    times[kind].append(min(once() for _ in range(3)))
                finally:
                    stop.set()
                    for p, _ in procs:
                        p.join(10)
                        if p.is_alive():
                            p.kill()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()

    iso.run_model(body)
    base = float(np.median(times["idle"]))
    results = {}
    for kind, ts in times.items():
        q1, med, q3 = (float(x) for x in np.percentile(ts, [25, 50, 75]))
        results[kind] = {"median_s": med, "quartiles_s": [q1, q3], "runs_s": ts, "slowdown": med / base - 1.0,
                         "cpus": load_cpus.get(kind, [])}
    return {"benchmark": "interference", "model": dataclasses.asdict(model_cfg), "rounds": rounds,
            "workload": {"decode_batch": batch, "positions": positions, "best_of": 3},
            "gather": {"table_gib": table_gib, "row_bytes": row_bytes, "rows_per_lookup": rows},
            "isolation": {"compute_cores": iso.compute, "memory_cores": iso.memory,
                          "load_processes_per_kind": len(iso.memory), "model_thread_cpus": iso.compute},
            "results": results,
            "note": "slowdown: the median forward time with that load on the memory cores over the idle median, "
                    "minus one; each load process runs flat out, so the memory side of bench offload, busy part "
                    "of the time, costs a fraction of the gather figure"}
