"""N-gram hashing: compressed token ids -> per-head row ids, bit-exact with the reference.

For each Engram layer, order n in 2..N and head h (shared/DESIGN.md, "Hashing"):

    mix_n[b, t] = x[b, t]*m0 XOR x[b, t-1]*m1 XOR ... XOR x[b, t-n+1]*m(n-1)   (wrapping int64)
    id[b, t, (n-2)*K + h] = mix_n[b, t] mod prime[layer][n][h]               (numpy's % on int64)

with x left-padded by the compressed pad id, multipliers drawn from
``default_rng(seed + 10007*layer)`` and primes found by walking layers, orders and heads in
order, each the smallest prime above the previous start that no head has taken yet.

The reference loops over heads with ``mix % p`` and stacks the heads (a copy). Here large
inputs compute each head as ``mix - (mix // p) * p`` (numpy divides by a scalar with
libdivide: multiply + shift) straight into head-major storage, and small decode batches take
a few broadcast calls; the result is a strided view, never transposed or stacked.
"""

from __future__ import annotations

import numpy as np

from ..config import EngramConfig

__all__ = ["NgramHasher", "head_primes", "layer_multipliers"]

_PRIME_1 = 10007  # the reference's per-layer seed stride
# Below this many tokens a few broadcast calls (generic % at ~2.4 ns) beat ~100 per-head calls
# (libdivide at ~1 ns, but ~1.5 us of overhead each): measured crossover ~3k tokens.
_SMALL_BATCH_TOKENS = 3072


def head_primes(config: EngramConfig) -> dict[int, tuple[tuple[int, ...], ...]]:
    """Table size of every head: ``{layer_id: ((primes of order 2), (order 3), ...)}``.

    Primes are unique across all layers, orders and heads, found in hashing order.
    """
    from sympy import nextprime  # imported here: sympy is slow to import and only needed once

    seen: set[int] = set()
    out: dict[int, tuple[tuple[int, ...], ...]] = {}
    for layer_id in config.layer_ids:
        per_order = []
        for n in config.orders:
            start = config.engram_vocab_size[n - 2] - 1
            heads = []
            for _ in range(config.n_head_per_ngram):
                p = int(nextprime(start))  # smallest prime strictly greater than start
                while p in seen:
                    p = int(nextprime(p))
                seen.add(p)
                heads.append(p)
                start = p
            per_order.append(tuple(heads))
        out[layer_id] = tuple(per_order)
    return out


def layer_multipliers(config: EngramConfig, compressed_vocab_size: int, layer_id: int) -> np.ndarray:
    """The odd int64 multipliers ``[max_ngram_size]`` of one layer's hash."""
    half_bound = max(1, (np.iinfo(np.int64).max // compressed_vocab_size) // 2)
    rng = np.random.default_rng(int(config.seed + _PRIME_1 * int(layer_id)))
    r = rng.integers(0, half_bound, size=(config.max_ngram_size,), dtype=np.int64)
    return r * 2 + 1


class NgramHasher:
    """Hashes compressed token ids into per-head row ids for every Engram layer.

    Stateless after construction (multipliers and primes are fixed), so one hasher may be
    shared by threads; decoding state is the caller's ``history`` array.
    """

    def __init__(self, config: EngramConfig, compressed_vocab_size: int, compressed_pad_id: int):
        if isinstance(compressed_vocab_size, bool) or not isinstance(compressed_vocab_size, (int, np.integer)) \
                or compressed_vocab_size < 1:
            raise ValueError(f"NgramHasher: compressed_vocab_size={compressed_vocab_size!r}: "
                             "expected a positive integer")
        if not 0 <= int(compressed_pad_id) < int(compressed_vocab_size):
            raise ValueError(f"NgramHasher: compressed_pad_id={compressed_pad_id!r}: expected "
                             f"an id in [0, {compressed_vocab_size})")
        self.config = config
        self.compressed_vocab_size = int(compressed_vocab_size)
        self.compressed_pad_id = int(compressed_pad_id)
        self._primes = head_primes(config)
        self._multipliers = {layer: layer_multipliers(config, self.compressed_vocab_size, layer)
                             for layer in config.layer_ids}
        # [L, H] primes in output-column order and [L, N] multipliers, in layer_ids order.
        self._primes_lh = np.array([[p for order in self._primes[layer] for p in order]
                                    for layer in config.layer_ids], dtype=np.int64)
        self._mult_ln = np.stack([self._multipliers[layer] for layer in config.layer_ids])

    @classmethod
    def from_vocab(cls, config: EngramConfig, vocab) -> NgramHasher:
        """Build from a :class:`~engram_ray.core.tokens.CompressedVocab`, compressing the pad id."""
        return cls(config, vocab.size, vocab.compress_id(config.pad_id))

    # Introspection ----------------------------------------------------------------------
    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.config.layer_ids

    @property
    def num_heads(self) -> int:
        """Output columns per layer: (N-1) orders x K heads."""
        return self.config.heads_per_layer

    @property
    def history_len(self) -> int:
        """Tokens of context a decoder must keep per sequence: N-1."""
        return self.config.max_ngram_size - 1

    def multipliers(self, layer_id: int) -> np.ndarray:
        """The layer's odd multipliers, ``[max_ngram_size]`` int64 (a copy)."""
        return self._multipliers[self._check_layer(layer_id)].copy()

    def table_sizes(self, layer_id: int) -> list[list[int]]:
        """The layer's head primes, one list per n-gram order."""
        return [list(order) for order in self._primes[self._check_layer(layer_id)]]

    def _check_layer(self, layer_id: int) -> int:
        if layer_id not in self._multipliers:
            raise ValueError(f"NgramHasher: layer_id={layer_id} is not an Engram layer; "
                             f"Engram layers are {list(self.config.layer_ids)}")
        return layer_id

    # Hashing ----------------------------------------------------------------------------
    def hash(self, compressed_ids_bt: np.ndarray) -> dict[int, np.ndarray]:
        """Row ids of every layer: ``{layer_id: int64 [B, T, (N-1)*K]}`` for ids ``[B, T]``."""
        return self._split(self.hash_stacked(compressed_ids_bt))

    def hash_stacked(self, compressed_ids_bt: np.ndarray) -> np.ndarray:
        """Like :meth:`hash` but one array ``[L, B, T, (N-1)*K]`` in ``layer_ids`` order."""
        x = self._check_ids(compressed_ids_bt)
        # A fresh sequence's history is N-1 pad ids: the reference's left padding.
        return self._hash_padded(np.concatenate([self.new_history(x.shape[0]), x], axis=1))

    def new_history(self, batch_size: int) -> np.ndarray:
        """Decoding state for ``batch_size`` empty sequences: ``[B, N-1]`` pad ids."""
        return np.full((batch_size, self.history_len), self.compressed_pad_id, dtype=np.int64)

    def hash_step(self, history_bn: np.ndarray, new_ids_bt: np.ndarray
                  ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Hash newly decoded tokens given each sequence's last N-1 compressed ids.

        Returns ``({layer_id: [B, T_new, H]}, new_history [B, N-1])``; the ids equal those of
        hashing each whole sequence at once (tested), so decoding reads the same rows.
        """
        ids_lbth, history = self.hash_step_stacked(history_bn, new_ids_bt)
        return self._split(ids_lbth), history

    def hash_step_stacked(self, history_bn: np.ndarray, new_ids_bt: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`hash_step` but one array ``[L, B, T_new, H]`` in ``layer_ids`` order."""
        x = self._check_ids(new_ids_bt)
        hist = np.asarray(history_bn)
        if hist.shape != (x.shape[0], self.history_len):
            raise ValueError(f"NgramHasher.hash_step: history shape {hist.shape}; expected "
                             f"({x.shape[0]}, {self.history_len}) = (batch, max_ngram_size-1)")
        xp = np.concatenate([hist.astype(np.int64, copy=False), x], axis=1)
        return self._hash_padded(xp), xp[:, -self.history_len:].copy()

    def _split(self, ids_lbth: np.ndarray) -> dict[int, np.ndarray]:
        return {layer: ids_lbth[i] for i, layer in enumerate(self.config.layer_ids)}

    def _check_ids(self, ids) -> np.ndarray:
        x = np.asarray(ids)
        if x.ndim != 2:
            raise ValueError(f"NgramHasher: compressed ids must be [batch, time], got shape {x.shape}")
        if x.dtype.kind not in "iu":
            raise ValueError(f"NgramHasher: compressed ids must be integers, got dtype {x.dtype}")
        x = x.astype(np.int64, copy=False)
        if x.size and x.max() >= self.compressed_vocab_size:
            raise ValueError(
                f"NgramHasher: id {int(x.max())} >= compressed vocabulary size "
                f"{self.compressed_vocab_size}; pass ids through CompressedVocab first")
        return x

    def _hash_padded(self, xp: np.ndarray) -> np.ndarray:
        """Hash positions ``N-1..`` of ``xp [B, N-1+T]``; returns ``[L, B, T, H]`` int64.

        Computed head-major (``[L, H, B*T]``: each head's values contiguous, no transpose
        pass) and returned as a strided ``[L, B, T, H]`` view of that storage: the values and
        shape of the reference's ``np.stack(..., axis=2)`` without its copy.
        """
        n_hist = self.history_len
        B, T = xp.shape[0], xp.shape[1] - n_hist
        L, H = len(self.config.layer_ids), self.num_heads
        # shifts[k] = the sequence shifted right by k (pad on the left), flat: [N, B*T]
        shifts = np.stack([xp[:, n_hist - k: n_hist - k + T].reshape(-1) for k in range(n_hist + 1)])
        if B * T < _SMALL_BATCH_TOKENS:
            heads = self._hash_small(shifts)
        else:
            heads = self._hash_large(shifts)
        return heads.reshape(L, H, B, T).transpose(0, 2, 3, 1)

    def _hash_small(self, shifts: np.ndarray) -> np.ndarray:
        """Few tokens (decoding): a handful of whole-array calls, as per-call overhead
        dominates. ``mix`` of order n is the running XOR of the first n shifted products."""
        N, K = self.config.max_ngram_size, self.config.n_head_per_ngram
        prod = shifts[None, :, :] * self._mult_ln[:, :, None]           # [L, N, tokens], wraps
        mix = np.empty((prod.shape[0], N - 1, prod.shape[2]), dtype=np.int64)  # [L, N-1, tokens]
        np.bitwise_xor(prod[:, 0], prod[:, 1], out=mix[:, 0])
        for k in range(2, N):  # (ufunc.accumulate along a middle axis is ~10x slower)
            np.bitwise_xor(mix[:, k - 2], prod[:, k], out=mix[:, k - 1])
        heads = np.remainder(mix[:, :, None, :], self._primes_lh.reshape(-1, N - 1, K, 1))
        return heads.reshape(heads.shape[0], -1, shifts.shape[1])        # [L, H, tokens]

    def _hash_large(self, shifts: np.ndarray) -> np.ndarray:
        """Many tokens (prefill): per head ``mix - (mix // p) * p`` with a scalar divisor,
        which numpy computes with libdivide (multiply + shift) at ~3x its generic ``%``."""
        K = self.config.n_head_per_ngram
        n_tok = shifts.shape[1]
        out = np.empty((len(self.config.layer_ids), self.num_heads, n_tok), dtype=np.int64)
        mix = np.empty(n_tok, dtype=np.int64)
        tmp = np.empty(n_tok, dtype=np.int64)
        for li, (mults, primes) in enumerate(zip(self._mult_ln.tolist(), self._primes_lh.tolist())):
            np.multiply(shifts[0], mults[0], out=mix)
            for n in self.config.orders:
                np.multiply(shifts[n - 1], mults[n - 1], out=tmp)  # wraps in int64, as the reference
                np.bitwise_xor(mix, tmp, out=mix)
                for j in range((n - 2) * K, (n - 1) * K):
                    q = out[li, j]
                    np.floor_divide(mix, primes[j], out=q)
                    np.multiply(q, primes[j], out=q)
                    np.subtract(mix, q, out=q)                     # floor-mod: 0 <= q < p, like %
        return out
