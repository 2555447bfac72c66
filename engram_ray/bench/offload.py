"""``engram-ray bench offload``: what an Engram table costs in throughput, by where it lives.

The same backbone and workload run in four modes, interleaved (a b c d a b c d ...) so drift
on a shared machine biases none, medians quoted:

  (a) no_engram      the backbone alone
  (b) local          the Engram table in-process (LocalMemory)
  (c) remote         the table in the memory service, every layer's rows prefetched before block 0
  (d) remote_lazy    the same service, each layer's rows fetched only when the layer asks

Prefill (each sequence alone, its length drawn from Uniform(min_len, max_len), as the paper's
workload of 512 sequences of Uniform(100, 1024), scaled down) and decode (a batch of sequences
generating token by token with a KV cache) are timed apart. Indexing (compress, hash, offset)
is inside the timing: it is part of what a worker pays.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import EngramConfig, ModelConfig, OptimizerConfig, StoreConfig
from ..core.indexer import RowIndexer
from ..model import EngramLM, LocalMemory

MODES = ("no_engram", "local", "remote", "remote_lazy")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(model, memory, indexer, seqs, device, acc) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for ids, tokens_bt in seqs:  # the same tokens on the device and on the host
        fetch = None
        if memory is not None:
            t1 = time.perf_counter()
            rows = indexer.rows(tokens_bt)
            t2 = time.perf_counter()
            fetch = memory.fetch(rows, requires_grad=False)
            acc["hash_s"] += t2 - t1
            acc["issue_s"] += time.perf_counter() - t2
        model(ids, fetch)
        if fetch is not None:
            acc["wait_s"] += fetch.wait_seconds
    _sync(device)
    return time.perf_counter() - t0


def _decode(model, memory, indexer, prompt, steps, device, acc) -> float:
    B, P = prompt.shape
    cache = model.new_cache(B, device=device)
    _sync(device)
    t0 = time.perf_counter()
    hist = indexer.new_history(B)
    new = prompt
    pos = 0
    for _ in range(steps + 1):  # the prompt, then `steps` single tokens
        fetch = None
        if memory is not None:
            t1 = time.perf_counter()
            # the sampled ids come to the host to be indexed (the backbone alone never waits)
            rows, hist = indexer.step(hist, new.cpu().numpy())
            t2 = time.perf_counter()
            fetch = memory.fetch(rows, requires_grad=False)
            acc["hash_s"] += t2 - t1
            acc["issue_s"] += time.perf_counter() - t2
        logits = model(new, fetch, cache=cache, start_pos=pos)
        if fetch is not None:
            acc["wait_s"] += fetch.wait_seconds
        pos += new.shape[1]
        new = logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return time.perf_counter() - t0


def _spread(xs: list[float]) -> dict[str, float]:
    """min / quartiles / max of the repetitions, to judge a median by."""
    q1, q3 = np.percentile(xs, [25, 75])
    return {"min": float(min(xs)), "q1": float(q1), "q3": float(q3), "max": float(max(xs))}


def _profile(fn, top: int = 20) -> list[dict[str, Any]]:
    """Run ``fn`` under cProfile (this thread only); the ``top`` functions by own time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    st = pstats.Stats(prof)
    # Stats.stats: {(file, line, name): (calls, ncalls, own, cumulative, callers)}; typeshed omits it
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    return [{"function": f"{Path(f).name}:{line}({name})", "calls": nc, "own_s": tt, "cumulative_s": ct}
            for (f, line, name), (_, nc, tt, ct, _) in rows]


def _workload(tokens: np.ndarray, dev: torch.device, *, sequences: int, min_len: int, max_len: int,
              decode_batch: int, decode_prompt: int):
    """Prefill sequences (each on the device and on the host, ``[1, n]``), their lengths, and
    the decode prompt ``[decode_batch, decode_prompt]`` on the device; fixed by seed 0."""
    rng = np.random.default_rng(0)
    lens = rng.integers(min_len, max_len + 1, size=sequences)
    starts = rng.integers(0, tokens.size - max_len - 1, size=sequences)
    host = [tokens[a:a + n].astype(np.int64)[None] for a, n in zip(starts, lens)]   # [1, n] each
    seqs = [(torch.from_numpy(t).to(dev), t) for t in host]
    ps = rng.integers(0, tokens.size - decode_prompt - 1, size=decode_batch)
    prompt = torch.as_tensor(np.stack([tokens[a:a + decode_prompt] for a in ps]).astype(np.int64)).to(dev)
    return lens, seqs, prompt


def _interleave(setups, indexer, seqs, prompt, decode_tokens: int, dev: torch.device, repeats: int,
                progress: bool):
    """Run every mode ``repeats + 1`` times, a b c d a b c d ...; returns the counted seconds
    ``{mode: {phase: [s, ...]}}`` and their parts ``{mode: {phase: {hash_s, issue_s, wait_s}}}``."""
    times: dict[str, dict[str, list[float]]] = {m: {"prefill": [], "decode": []} for m in MODES}
    # Seconds of each run spent hashing, issuing fetches and blocked in rows(), by mode
    # and phase; the rest of a run is the model's compute.
    parts = {m: {ph: dict.fromkeys(("hash_s", "issue_s", "wait_s"), 0.0) for ph in ("prefill", "decode")}
             for m in MODES}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=(repeats + 1) * len(MODES), desc="bench offload", unit="run")
    for rep in range(repeats + 1):  # repetition 0 warms up and is not counted
        for mode in MODES:
            model, mem = setups[mode]
            acc_p, acc_d = (parts[mode]["prefill"], parts[mode]["decode"]) if rep else ({}, {})
            acc_p, acc_d = collections.defaultdict(float, acc_p), collections.defaultdict(float, acc_d)
            p = _prefill(model, mem, indexer, seqs, dev, acc_p)
            d = _decode(model, mem, indexer, prompt, decode_tokens, dev, acc_d)
            if rep:
                times[mode]["prefill"].append(p)
                times[mode]["decode"].append(d)
                parts[mode]["prefill"].update(acc_p)
                parts[mode]["decode"].update(acc_d)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return times, parts


def _throughput(times, parts, prefill_tokens: int, decode_tokens_total: int, repeats: int):
    """Per mode: median tokens/s and spreads; per phase and mode: where the time went; and each
    mode's throughput loss against the backbone alone and against the local table."""
    res: dict[str, Any] = {}
    for mode in MODES:
        tp = float(np.median(times[mode]["prefill"]))
        td = float(np.median(times[mode]["decode"]))
        res[mode] = {"prefill_tokens_per_s": prefill_tokens / tp, "decode_tokens_per_s": decode_tokens_total / td,
                     "prefill_s": tp, "decode_s": td,
                     "prefill_spread_s": _spread(times[mode]["prefill"]),
                     "decode_spread_s": _spread(times[mode]["decode"])}
    breakdown = {}
    for mode in MODES:
        for phase in ("prefill", "decode"):
            total = float(np.mean(times[mode][phase]))
            b = {k: v / repeats for k, v in parts[mode][phase].items()}
            b["compute_s"] = total - sum(b.values())  # the model's forward (and Python around it)
            breakdown[f"{phase}:{mode}"] = {"total_s": total, **b}
    overhead = {}
    for phase in ("prefill", "decode"):
        key = f"{phase}_tokens_per_s"
        for x in ("local", "remote", "remote_lazy"):
            for ref in ("no_engram", "local"):
                if x != ref:
                    overhead[f"{phase}:{x}_vs_{ref}"] = 1 - res[x][key] / res[ref][key]
    return res, breakdown, overhead


def _per_lookup(cstats: dict[str, Any], server: list[dict[str, Any]]) -> dict[str, Any]:
    """Client I/O time per lookup, RPCs per lookup and the shards' handler time per RPC."""
    n_lookups = max(1, cstats["lookups"])
    server_rpcs = sum(d["counters"]["lookups"] for d in server)
    return {"client_io_ms": {k: 1e3 * v / n_lookups for k, v in cstats["io_seconds"].items()},
            "rpcs_per_lookup": server_rpcs / n_lookups,
            "server_handler_ms_per_rpc": 1e3 * sum(d["counters"]["lookup_seconds"] for d in server)
            / max(1, server_rpcs)}


@torch.no_grad()
def run(engram_cfg: EngramConfig, model_cfg: ModelConfig, vocab: Any, tokens: np.ndarray, *,
        shards: int = 2, max_resident_gib: float | None = 1.0, sequences: int = 8, min_len: int = 32,
        max_len: int = 192, decode_batch: int = 8, decode_prompt: int = 32, decode_tokens: int = 16,
        repeats: int = 3, device: str = "auto", profile: bool = False,
        progress: bool = False) -> dict[str, Any]:
    from ..runtime import RemoteMemory, deploy, ray_session

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                       else ("cpu" if device == "auto" else device))
    lens, seqs, prompt = _workload(tokens, dev, sequences=sequences, min_len=min_len, max_len=max_len,
                                   decode_batch=decode_batch, decode_prompt=decode_prompt)
    if decode_prompt + decode_tokens + 1 > model_cfg.max_seq_len or max_len > model_cfg.max_seq_len:
        raise ValueError(f"sequences up to {max(max_len, decode_prompt + decode_tokens + 1)} tokens exceed "
                         f"the backbone's max_seq_len={model_cfg.max_seq_len}")
    store = StoreConfig(init_std=0.02, optimizer=OptimizerConfig(kind="none"))
    with ray_session():
        svc = deploy(engram_cfg, vocab=vocab, num_shards=shards, store=store, name="bench-offload",
                     max_resident_gib=max_resident_gib)
        try:
            layout = svc.layout
            resident = sum(d["resident_rows"] for d in svc.describe())
            client = svc.client()
            indexer = RowIndexer.build(engram_cfg, vocab, layout=layout)
            torch.manual_seed(0)
            with_engram = EngramLM(model_cfg, engram_cfg).eval().to(dev)
            torch.manual_seed(0)
            backbone = EngramLM(model_cfg, None).eval().to(dev)
            local = LocalMemory(layout, init_std=0.02, optimizer=OptimizerConfig(kind="none"),
                                resident_rows=resident).to(dev)
            setups = {"no_engram": (backbone, None), "local": (with_engram, local),
                      "remote": (with_engram, RemoteMemory(client, device=dev)),
                      "remote_lazy": (with_engram, RemoteMemory(client, device=dev, prefetch=False))}
            times, parts = _interleave(setups, indexer, seqs, prompt, decode_tokens, dev, repeats, progress)
            top = None
            if profile:  # one more remote run under cProfile, after the timed ones
                top = _profile(lambda: (_prefill(*setups["remote"], indexer, seqs, dev,
                                                 collections.defaultdict(float)),
                                        _decode(*setups["remote"], indexer, prompt, decode_tokens,
                                                dev, collections.defaultdict(float))))
            cstats = client.stats()
            server = svc.describe()
            client.close()
        finally:
            svc.shutdown()
    prefill_tokens, decode_tokens_total = int(lens.sum()), decode_batch * (decode_prompt + decode_tokens)
    res, breakdown, overhead = _throughput(times, parts, prefill_tokens, decode_tokens_total, repeats)
    return {
        "benchmark": "offload", "engram": engram_cfg.to_dict(), "model": model_cfg.to_dict(),
        "table": {"logical_rows": layout.total_rows, "logical_params": layout.num_params,
                  "logical_gib_float32": layout.nbytes("float32") / 2**30,
                  "resident_rows": resident, "resident_gib_float32": resident * layout.row_bytes("float32") / 2**30,
                  "capped": resident < layout.total_rows, "fingerprint": layout.fingerprint, "shards": shards},
        "workload": {"prefill_sequences": sequences, "length_uniform": [min_len, max_len],
                     "prefill_tokens": prefill_tokens, "decode_batch": decode_batch,
                     "decode_prompt": decode_prompt, "decode_tokens": decode_tokens},
        "repeats": repeats, "statistic": "median", "order": "interleaved a b c d per repetition, one warm-up",
        "results": res, "overhead": overhead,
        "lookup_p50_ms": cstats["latency_p50_ms"], "lookup_p99_ms": cstats["latency_p99_ms"],
        "dedup_ratio": cstats["dedup_ratio"],
        "breakdown": breakdown, "per_lookup": _per_lookup(cstats, server), "profile_top": top,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }
