"""``engram-ray bench offload``: what an Engram table costs in throughput, by where it lives.

The same backbone and workload run in four modes, interleaved (a b c d a b c d ...) so drift
on a shared machine biases none, medians quoted:

  (a) no_engram      the backbone alone
  (b) local          the Engram table in-process (LocalMemory)
  (c) remote         the table in the memory service, every layer's rows prefetched before block 0
  (d) remote_lazy    the same service, each layer's rows fetched only when the layer asks

Prefill (each sequence alone, its length drawn from Uniform(min_len, max_len), as the paper's
workload of 512 sequences of Uniform(100, 1024), scaled down) and decode (a batch of sequences
generating token by token with a KV cache) are timed apart. Hashing is inside the timing: it is
part of what a worker pays.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..config import EngramConfig, ModelConfig, StoreConfig, OptimizerConfig
from ..core.hashing import NgramHasher
from ..model import EngramLM, LocalMemory

MODES = ("no_engram", "local", "remote", "remote_lazy")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(model, memory, hasher, layout, seqs, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for ids, comp in seqs:
        fetch = None
        if memory is not None:
            rows = layout.row_ids_stacked(hasher.hash_stacked(comp))
            fetch = memory.fetch(rows, requires_grad=False)
        model(ids, fetch)
    _sync(device)
    return time.perf_counter() - t0


def _decode(model, memory, hasher, layout, vocab, prompt, steps, device) -> float:
    B, P = prompt.shape
    cache = model.new_cache(B, device=device)
    _sync(device)
    t0 = time.perf_counter()
    hist = hasher.new_history(B)
    new = prompt
    pos = 0
    for _ in range(steps + 1):  # the prompt, then `steps` single tokens
        fetch = None
        if memory is not None:
            heads, hist = hasher.hash_step(hist, vocab(new.cpu().numpy()))
            rows = np.stack([layout.row_ids(l, heads[l]) for l in layout.layer_ids])
            fetch = memory.fetch(rows, requires_grad=False)
        logits = model(new, fetch, cache=cache, start_pos=pos)
        pos += new.shape[1]
        new = logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def run(engram_cfg: EngramConfig, model_cfg: ModelConfig, vocab: Any, tokens: np.ndarray, *,
        shards: int = 2, max_resident_gib: float | None = 1.0, sequences: int = 8, min_len: int = 32,
        max_len: int = 192, decode_batch: int = 8, decode_prompt: int = 32, decode_tokens: int = 16,
        repeats: int = 3, device: str = "auto", progress: bool = False) -> dict[str, Any]:
    from ..runtime import RemoteMemory, deploy, ray_session

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                       else ("cpu" if device == "auto" else device))
    rng = np.random.default_rng(0)
    lens = rng.integers(min_len, max_len + 1, size=sequences)
    starts = rng.integers(0, tokens.size - max_len - 1, size=sequences)
    seqs = [(torch.as_tensor(tokens[a:a + n].astype(np.int64))[None].to(dev),
             vocab(tokens[a:a + n].astype(np.int64))[None]) for a, n in zip(starts, lens)]
    ps = rng.integers(0, tokens.size - decode_prompt - 1, size=decode_batch)
    prompt = torch.as_tensor(np.stack([tokens[a:a + decode_prompt] for a in ps]).astype(np.int64)).to(dev)
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
            hasher = NgramHasher.from_vocab(engram_cfg, vocab)
            torch.manual_seed(0)
            with_engram = EngramLM(model_cfg, engram_cfg).eval().to(dev)
            torch.manual_seed(0)
            backbone = EngramLM(model_cfg, None).eval().to(dev)
            local = LocalMemory(layout, init_std=0.02, optimizer=OptimizerConfig(kind="none"),
                                resident_rows=resident).to(dev)
            setups = {"no_engram": (backbone, None), "local": (with_engram, local),
                      "remote": (with_engram, RemoteMemory(client, device=dev)),
                      "remote_lazy": (with_engram, RemoteMemory(client, device=dev, prefetch=False))}
            times: dict[str, dict[str, list[float]]] = {m: {"prefill": [], "decode": []} for m in MODES}
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=(repeats + 1) * len(MODES), desc="bench offload", unit="run")
            for rep in range(repeats + 1):  # repetition 0 warms up and is not counted
                for mode in MODES:
                    model, mem = setups[mode]
                    p = _prefill(model, mem, hasher, layout, seqs, dev)
                    d = _decode(model, mem, hasher, layout, vocab, prompt, decode_tokens, dev)
                    if rep:
                        times[mode]["prefill"].append(p)
                        times[mode]["decode"].append(d)
                    if bar is not None:
                        bar.update(1)
            if bar is not None:
                bar.close()
            cstats = client.stats()
            client.close()
        finally:
            svc.shutdown()
    prefill_tokens, decode_tokens_total = int(lens.sum()), decode_batch * (decode_prompt + decode_tokens)
    res: dict[str, Any] = {}
    for mode in MODES:
        tp = float(np.median(times[mode]["prefill"]))
        td = float(np.median(times[mode]["decode"]))
        res[mode] = {"prefill_tokens_per_s": prefill_tokens / tp, "decode_tokens_per_s": decode_tokens_total / td,
                     "prefill_s": tp, "decode_s": td}
    overhead = {}
    for phase in ("prefill", "decode"):
        key = f"{phase}_tokens_per_s"
        for x in ("local", "remote", "remote_lazy"):
            for ref in ("no_engram", "local"):
                if x != ref:
                    overhead[f"{phase}:{x}_vs_{ref}"] = 1 - res[x][key] / res[ref][key]
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
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }
