"""``engram-ray bench hash``: tokens/s of :class:`NgramHasher` at realistic batch shapes,
side by side with the reference's algorithm (a Python loop of ``mix % p`` per head, then
``np.stack``), interleaved so drift on a shared machine biases neither."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import EngramConfig
from ..core.hashing import NgramHasher

#: (name, batch, sequence length): prefill at a few batch shapes, and one decode step.
DEFAULT_SHAPES = (("prefill", 1, 4096), ("prefill", 8, 2048), ("prefill", 64, 1024),
                  ("decode", 512, 1))


def reference_loop(hasher: NgramHasher, x: np.ndarray) -> dict[int, np.ndarray]:
    """The reference's per-head loop, as the baseline (same ids, tested)."""
    cfg = hasher.config
    B, T = x.shape
    out = {}
    for layer in cfg.layer_ids:
        m = hasher.multipliers(layer)
        shifts = [x] + [np.pad(x, ((0, 0), (k, 0)), constant_values=hasher.compressed_pad_id)[:, :T]
                        for k in range(1, cfg.max_ngram_size)]
        heads: list[np.ndarray] = []
        for n, primes in zip(cfg.orders, hasher.table_sizes(layer)):
            mix = shifts[0] * m[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * m[k])
            heads.extend(mix % int(p) for p in primes)
        out[layer] = np.stack(heads, axis=2)
    return out


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(config: EngramConfig, *, vocab_size: int = 32962, shapes=DEFAULT_SHAPES,
        repeats: int = 7, min_tokens: int = 200_000, progress: bool = False) -> dict[str, Any]:
    """Median tokens/s of ours and the reference loop per shape (same inputs, interleaved)."""
    hasher = NgramHasher(config, vocab_size, 0)
    rng = np.random.default_rng(0)
    rows = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(shapes) * repeats, desc="bench hash", unit="rep")
    for name, B, T in shapes:
        x = rng.integers(0, vocab_size, size=(B, T))
        # Repeat small shapes inside one timing so each sample is long enough to measure.
        inner = max(1, min_tokens // (B * T))
        ours = lambda x=x, inner=inner: [hasher.hash(x) for _ in range(inner)]  # noqa: E731
        ref = lambda x=x, inner=inner: [reference_loop(hasher, x) for _ in range(inner)]  # noqa: E731
        got, want = hasher.hash(x), reference_loop(hasher, x)
        assert all(np.array_equal(got[layer], want[layer]) for layer in config.layer_ids)
        t_ours, t_ref = [], []
        for _ in range(repeats):
            t_ours.append(_time(ours))
            t_ref.append(_time(ref))
            if bar is not None:
                bar.update(1)
        tokens = B * T * inner
        med_o, med_r = float(np.median(t_ours)), float(np.median(t_ref))
        rows.append({"phase": name, "batch": B, "seq_len": T, "tokens_per_sample": tokens,
                     "ours_tokens_per_s": tokens / med_o, "reference_tokens_per_s": tokens / med_r,
                     "speedup": med_r / med_o,
                     "ours_us_per_call": 1e6 * med_o / inner, "reference_us_per_call": 1e6 * med_r / inner})
    if bar is not None:
        bar.close()
    return {"benchmark": "hash", "config": config.to_dict(), "compressed_vocab_size": vocab_size,
            "layers": len(config.layer_ids), "heads_per_layer": config.heads_per_layer,
            "repeats": repeats, "statistic": "median", "results": rows}
