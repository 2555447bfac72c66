"""``engram-ray bench offload``: what an Engram table costs in throughput, by where it lives.

The same backbone and workload run in four modes, interleaved (a b c d a b c d ...) so drift
on a shared machine biases none, medians quoted with their spread:

  (a) no_engram      the backbone alone
  (b) local          the Engram table in-process (LocalMemory)
  (c) remote         the table in the memory service, every layer's rows prefetched before block 0
  (d) remote_lazy    the same service, each layer's rows fetched only when the layer asks

Three phases each (:mod:`.phases`): prefill (each sequence alone, lengths Uniform(min_len,
max_len)), decode (a batch generating token by token) and serving (requests with prompt and
output lengths drawn as the paper's nano-vLLM bench -- 512 x Uniform(100, 1024) each, scaled
down by flags on a CPU -- through a continuous-batching engine, :mod:`.serving`).

Fair by default: with two or more cores the model computes on its own cores and the memory
side (shards, the client's I/O thread, Ray) on the others (:mod:`.isolation`); the in-process
modes get the same compute cores. The shards are deployed on Ray for the run, or are shards
that already run (``memory_at``), with no Ray at all (:mod:`.memory_source`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..client.cache import DEFAULT_POLICY
from ..config import EngramConfig, ModelConfig, OptimizerConfig, ServiceConfig, StoreConfig
from ..core.indexer import RowIndexer
from ..core.layout import TableLayout
from ..model import EngramLM, LocalMemory
from ..remote_memory import TORCH_DTYPES
from .isolation import Isolation
from .memory_source import DeployedShards, RunningShards, memory_client, remote_memory
from .phases import MODES, PHASES, Workload, interleave, microbatch_phase, run_phase
from .summary import paired_overhead, per_lookup, profile_top, throughput
from .trace import trace_run

__all__ = ["MODES", "PHASES", "Options", "run", "DTYPES"]

#: Backbone compute dtypes (``--dtype``), by name.
DTYPES = TORCH_DTYPES


@dataclass(frozen=True)
class Options:
    """What ``bench offload`` runs; the defaults fit this project's 2-core CI machine."""

    shards: int = 2
    max_resident_gib: float | None = 1.0
    # prefill: sequences of Uniform(min_len, max_len) tokens, one at a time
    sequences: int = 16
    min_len: int = 32
    max_len: int = 192
    # decode: a batch of equal prompts, then decode_tokens steps
    decode_batch: int = 8
    decode_prompt: int = 32
    decode_tokens: int = 16
    # serving: requests through the continuous-batching engine (paper: 512, (100, 1024) x 2)
    requests: int = 16
    prompt_len: tuple[int, int] = (32, 128)
    output_len: tuple[int, int] = (8, 32)
    max_batch: int = 8
    token_budget: int = 256
    # decode also in this many alternating micro-batches (phase decode_mbM), against one
    microbatches: int = 1
    repeats: int = 5
    device: str = "auto"
    dtype: str = "float32"
    # the memory: deployed on Ray, or shards that already run; through a client or the agent
    memory_at: tuple[str, ...] = ()
    token_file: str | None = None
    via: str = "agent"
    # the agent's hot-row cache (bytes; 0: none) and its policy
    cache_bytes: int = 0
    cache_policy: str = DEFAULT_POLICY
    # how long a worker polls the agent's socket for rows before it sleeps (None: AgentClient's default)
    agent_spin_s: float | None = None
    # the deployed shards' max_lookup_streams (None: the service's default; 0: calls only)
    lookup_streams: int | None = None
    # cores: model apart from the memory side (memory_cores: how many for it; None: a quarter)
    isolate: bool = True
    memory_cores: int | None = None
    profile: bool = False
    # one more run of this phase per mode under torch.profiler (device busy vs wall, runtime
    # calls); "" off. Decode by default: a serving run of the GPU check's 1B backbone is ~10^6
    # traced events, which ran the check past its budget on the H200 (2026-11-28); decode ~2x10^5.
    trace: str = ""
    progress: bool = False

    def longest(self) -> int:
        """The most positions any phase needs in the KV cache."""
        return max(self.max_len, self.decode_prompt + self.decode_tokens + 1,
                   self.prompt_len[1] + self.output_len[1])


def _check(o: Options) -> None:
    """Refuse options no run can finish with (a zero token budget or batch never admits or
    finishes a request: the serving loop would spin forever)."""
    for name in ("sequences", "min_len", "decode_batch", "decode_prompt", "decode_tokens", "requests",
                 "max_batch", "token_budget", "repeats"):
        if getattr(o, name) < 1:
            raise ValueError(f"{name}={getattr(o, name)}: expected a positive count")
    for name, (lo, hi) in (("min_len/max_len", (o.min_len, o.max_len)), ("prompt_len", o.prompt_len),
                           ("output_len", o.output_len)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name}=({lo}, {hi}): expected 1 <= MIN <= MAX")
    if not 1 <= o.microbatches <= o.decode_batch:
        raise ValueError(f"microbatches={o.microbatches}: between 1 and decode_batch={o.decode_batch}")
    if o.agent_spin_s is not None and (o.via != "agent" or not 0 <= o.agent_spin_s <= 1):
        raise ValueError(f"agent_spin_s={o.agent_spin_s}: seconds between 0 and 1, with via='agent'")
    if o.lookup_streams is not None and (o.memory_at or not 0 <= o.lookup_streams <= 1024):
        raise ValueError(f"lookup_streams={o.lookup_streams}: 0..1024, for shards this bench deploys (not "
                         "--memory-at: set it where those shards start)")
    if o.dtype not in DTYPES:
        raise ValueError(f"dtype {o.dtype!r}: choose one of {', '.join(DTYPES)}")
    if o.trace and o.trace not in PHASES:
        raise ValueError(f"trace={o.trace!r}: choose a phase to trace, one of {', '.join(PHASES)}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _source(cfg: EngramConfig, vocab: Any, o: Options) -> Any:
    if o.memory_at:
        return RunningShards(list(o.memory_at), TableLayout.build(cfg, vocab), token_file=o.token_file)
    store = StoreConfig(init_std=0.02, optimizer=OptimizerConfig(kind="none"))
    service = ServiceConfig() if o.lookup_streams is None else ServiceConfig(max_lookup_streams=o.lookup_streams)
    return DeployedShards(cfg, vocab, shards=o.shards, store=store, max_resident_gib=o.max_resident_gib,
                          service=service)


@dataclass
class _Measured:
    times: dict[str, dict[str, list[float]]]
    parts: dict[str, Any]
    tokens: dict[str, int]
    top: list[dict[str, Any]] | None
    isolation: dict[str, Any]
    #: The model thread's cost per fetch through the agent (None via the client).
    fetch_cost: dict[str, Any] | None = None
    #: --trace: one phase of each mode under torch.profiler.
    trace: dict[str, Any] | None = None


def _measure(engram_cfg: EngramConfig, model_cfg: ModelConfig, vocab: Any, tokens: np.ndarray, src: Any,
             client: Any, resident: int, o: Options, iso: Isolation) -> _Measured:
    """Build the models and memories and run the interleaved phases (on the model thread)."""
    dev, dtype = _device(o.device), DTYPES[o.dtype]
    with torch.no_grad():  # grad mode is per thread: set it on the thread that computes
        work = Workload.draw(tokens, dev, sequences=o.sequences, min_len=o.min_len, max_len=o.max_len,
                             decode_batch=o.decode_batch, decode_prompt=o.decode_prompt,
                             decode_tokens=o.decode_tokens, requests=o.requests, prompt_len=o.prompt_len,
                             output_len=o.output_len, max_batch=o.max_batch, token_budget=o.token_budget)
        indexer = RowIndexer.build(engram_cfg, vocab, layout=src.layout)
        torch.manual_seed(0)
        with_engram = EngramLM(model_cfg, engram_cfg).eval().to(dev, dtype)
        torch.manual_seed(0)
        backbone = EngramLM(model_cfg, None).eval().to(dev, dtype)
        local = LocalMemory(src.layout, init_std=0.02, optimizer=OptimizerConfig(kind="none"),
                            resident_rows=resident).to(dev, dtype)
        setups = {"no_engram": (backbone, None), "local": (with_engram, local),
                  "remote": (with_engram, remote_memory(client, device=dev, dtype=dtype, prefetch=True)),
                  "remote_lazy": (with_engram, remote_memory(client, device=dev, dtype=dtype, prefetch=False))}
        phases = PHASES + ((microbatch_phase(o.microbatches),) if o.microbatches > 1 else ())
        times, parts = interleave(setups, indexer, work, dev, o.repeats, o.progress, phases,
                                  tuple(iso.memory) if iso.enabled else ())
        top = None
        if o.profile:  # one more remote run of every phase under cProfile, after the timed ones
            top = profile_top(lambda: [run_phase(ph, *setups["remote"], indexer, work, dev) for ph in phases])
        trace = None
        if o.trace:  # after the timed runs: the profiler's overhead touches none of them
            def one(mode: str) -> float:
                return run_phase(o.trace, *setups[mode], indexer, work, dev)

            trace = {"phase": o.trace, "modes": {mode: trace_run(functools.partial(one, mode), dev) for mode in MODES}}
        cost = _fetch_cost(client, indexer, work, o) if o.via == "agent" else None
        record = iso.record()  # while the model thread, its pool and the shards are alive
    return _Measured(times, parts, {ph: work.tokens(ph) for ph in phases}, top, record, cost, trace)


def _fetch_cost(agent: Any, indexer: RowIndexer, work: Workload, o: Options) -> dict[str, Any]:
    """What the model thread pays per decode-shaped fetch through the agent -- the ids into
    shared memory and one send, then reading the replies once the rows are in -- timed on
    the model thread after the timed runs (2 ms stands for the compute a fetch hides behind)."""
    from ..agent.measure import worker_cost
    tokens_bt = np.random.default_rng(0).integers(0, indexer.vocab.num_tokens, size=(o.decode_batch, 1))
    rows_lbth = indexer.rows(tokens_bt)                                     # [L, B, 1, H]
    return worker_cost(agent, list(rows_lbth), iters=300, gap_s=0.002)


def run(engram_cfg: EngramConfig, model_cfg: ModelConfig, vocab: Any, tokens: np.ndarray,
        opts: Options | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the benchmark (``opts``, or :class:`Options` fields as keywords); the report."""
    o = dataclasses.replace(opts or Options(), **overrides)
    _check(o)
    if o.longest() > model_cfg.max_seq_len:
        raise ValueError(f"sequences up to {o.longest()} tokens exceed the backbone's "
                         f"max_seq_len={model_cfg.max_seq_len}")
    iso = Isolation.split(o.isolate, o.memory_cores)
    iso.memory_side()  # before Ray, the shards and the client start: they inherit it
    try:
        with _source(engram_cfg, vocab, o) as src:
            iso.pin_children()
            server = src.describe()
            resident = sum(d["resident_rows"] for d in server)
            client = memory_client(src, o.via, o.cache_bytes, o.cache_policy, o.agent_spin_s)
            try:
                m = iso.run_model(lambda: _measure(engram_cfg, model_cfg, vocab, tokens, src, client,
                                                   resident, o, iso))
                stats = client.stats()
                server = src.describe()
            finally:
                client.close()
            layout = src.layout
            memory = {"source": src.kind, "via": o.via, "addresses": [d["address"] for d in server],
                      "agent_spin_s": getattr(client, "spin_s", None),
                      "max_lookup_streams": None if o.memory_at else src.service.max_lookup_streams}
    finally:
        iso.restore()
    return _report(engram_cfg, model_cfg, layout, resident, o, m, stats, server, memory)


def _report(engram_cfg: EngramConfig, model_cfg: ModelConfig, layout: TableLayout, resident: int,
            o: Options, m: _Measured, stats: dict[str, Any] | None, server: list[dict[str, Any]],
            memory: dict[str, Any]) -> dict[str, Any]:
    res, breakdown, overhead = throughput(m.times, m.parts, m.tokens, o.repeats)
    dev = _device(o.device)
    return {
        "benchmark": "offload", "engram": engram_cfg.to_dict(), "model": model_cfg.to_dict(), "dtype": o.dtype,
        "table": {"logical_rows": layout.total_rows, "logical_params": layout.num_params,
                  "logical_gib_float32": layout.nbytes("float32") / 2**30,
                  "resident_rows": resident, "resident_gib_float32": resident * layout.row_bytes("float32") / 2**30,
                  "capped": resident < layout.total_rows, "fingerprint": layout.fingerprint,
                  "shards": len(server)},
        "memory": memory,
        "workload": {"prefill_sequences": o.sequences, "length_uniform": [o.min_len, o.max_len],
                     "prefill_tokens": m.tokens["prefill"], "prefill_lookahead": 1, "decode_batch": o.decode_batch,
                     "decode_prompt": o.decode_prompt, "decode_tokens": o.decode_tokens,
                     "decode_microbatches": o.microbatches,
                     "serving_requests": o.requests, "serving_prompt_uniform": list(o.prompt_len),
                     "serving_output_uniform": list(o.output_len), "serving_max_batch": o.max_batch,
                     "serving_token_budget": o.token_budget, "serving_tokens": m.tokens["serving"]},
        "phases": list(m.tokens), "microbatches": o.microbatches,
        "repeats": o.repeats, "statistic": "median", "order": "interleaved a b c d per repetition, one warm-up",
        "results": res, "overhead": overhead, "overhead_paired": paired_overhead(m.times, list(m.tokens)),
        # every timed run's seconds, repetition by repetition (runs_s[mode][phase][i]): the pairs
        "runs_s": m.times,
        "cache": stats.get("cache") if stats else None,
        "wire": {k: stats.get(k) for k in ("bytes_received", "bytes_saved")} if stats else None,
        "lookup_p50_ms": stats["latency_p50_ms"] if stats else None,
        "lookup_p99_ms": stats["latency_p99_ms"] if stats else None,
        "dedup_ratio": stats["dedup_ratio"] if stats else None,
        "breakdown": breakdown, "per_lookup": per_lookup(stats, server), "profile_top": m.top,
        "isolation": m.isolation, "fetch_cost": m.fetch_cost, "trace": m.trace,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }
