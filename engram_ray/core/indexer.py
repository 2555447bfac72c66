"""Tokens -> global row ids, in one place: compress, hash, offset.

    tokens [B, T] --CompressedVocab--> compressed ids [B, T]
                  --NgramHasher------> head ids [L, B, T, H]      (per-head table positions)
                  --TableLayout------> row ids  [L, B, T, H]      (global: offset + head id)

Every caller that turns a batch into the rows it reads -- the trainer, generation, the
benchmarks, the examples -- goes through :class:`RowIndexer`, so the pipeline is written once
and decoding (``step``) and whole-sequence hashing (``rows``) cannot drift apart.

It takes numpy arrays in host memory only: hashing is numpy work, so callers index a batch
*before* it moves to a device. A torch tensor is refused outright, even a CPU one, because
accepting CPU tensors is what let a device tensor reach ``.numpy()`` unnoticed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import EngramConfig
from .hashing import NgramHasher
from .layout import TableLayout
from .tokens import CompressedVocab

__all__ = ["RowIndexer"]


class RowIndexer:
    """Turns tokenizer ids into the global row ids every Engram layer reads.

    Stateless after construction (like :class:`NgramHasher`), so one indexer may be shared
    by threads; a decoder's state is the ``history`` array it passes to :meth:`step`.
    """

    def __init__(self, vocab: CompressedVocab, hasher: NgramHasher, layout: TableLayout):
        _check_agree(vocab, hasher, layout)
        self.vocab, self.hasher, self.layout = vocab, hasher, layout

    @classmethod
    def build(cls, config: EngramConfig, vocab: CompressedVocab,
              layout: TableLayout | None = None) -> RowIndexer:
        """The indexer of ``config`` over ``vocab``. Pass ``layout`` to index into a table that
        exists already (a memory's or a service's): it is checked against config and vocab."""
        return cls(vocab, NgramHasher.from_vocab(config, vocab),
                   layout if layout is not None else TableLayout.build(config, vocab))

    # Introspection ----------------------------------------------------------------------
    @property
    def layer_ids(self) -> tuple[int, ...]:
        """The Engram layers, in the order of the rows' first axis."""
        return self.layout.layer_ids

    @property
    def num_heads(self) -> int:
        """Row ids per token and layer: (N-1) orders x K heads."""
        return self.layout.num_heads

    def new_history(self, batch_size: int) -> np.ndarray:
        """Decoding state for ``batch_size`` empty sequences: ``[B, N-1]`` compressed pad ids."""
        return self.hasher.new_history(batch_size)

    # Indexing ---------------------------------------------------------------------------
    def rows(self, tokens_bt: np.ndarray) -> np.ndarray:
        """Global row ids ``[L, B, T, H]`` int64 of tokenizer ids ``[B, T]`` (host numpy)."""
        tokens_bt = _host_ids(tokens_bt, "rows", "tokens_bt")
        return self.layout.row_ids_stacked(self.hasher.hash_stacked(self.vocab(tokens_bt)))

    def step(self, history_bn: np.ndarray, new_bt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of newly decoded tokens ``[B, n]`` given each sequence's history ``[B, N-1]``.

        Returns ``(rows [L, B, n, H], new history [B, N-1])``. The rows equal those of
        :meth:`rows` on each whole sequence, so decoding reads what training wrote.
        """
        history_bn = _host_ids(history_bn, "step", "history_bn")
        new_bt = _host_ids(new_bt, "step", "new_bt")
        heads_lbnh, history_bn = self.hasher.hash_step_stacked(history_bn, self.vocab(new_bt))
        return self.layout.row_ids_stacked(heads_lbnh), history_bn


def _host_ids(ids: Any, method: str, name: str) -> np.ndarray:
    """``ids`` if it is a 2-D numpy array; else a TypeError/ValueError that says what to pass."""
    if not isinstance(ids, np.ndarray):
        kind = f"{type(ids).__module__}.{type(ids).__qualname__}"
        raise TypeError(f"RowIndexer.{method}: {name} must be a numpy array in host memory, got "
                        f"{kind}; index a batch before it moves to a device (from a CPU tensor: "
                        ".numpy())")
    if ids.ndim != 2:
        raise ValueError(f"RowIndexer.{method}: {name} must be [batch, time], got shape {ids.shape}")
    return ids


def _check_agree(vocab: CompressedVocab, hasher: NgramHasher, layout: TableLayout) -> None:
    """Refuse a layout hashed from another vocabulary or config: its ids would silently
    address other rows (or run past the table)."""
    cfg = hasher.config
    mine = {"layer_ids": tuple(cfg.layer_ids),
            "head_sizes": tuple(tuple(p for order in hasher.table_sizes(layer) for p in order)
                                for layer in cfg.layer_ids),
            "max_ngram_size": cfg.max_ngram_size, "n_head_per_ngram": cfg.n_head_per_ngram,
            "seed": cfg.seed, "compressed_vocab_size": hasher.compressed_vocab_size,
            "compressed_pad_id": hasher.compressed_pad_id, "vocab_digest": vocab.digest}
    if vocab.size != hasher.compressed_vocab_size:
        raise ValueError(f"RowIndexer: the vocabulary has {vocab.size} compressed ids, the hasher "
                         f"was built for {hasher.compressed_vocab_size}")
    differ = [k for k, v in mine.items() if getattr(layout, k) != v]
    if differ:
        raise ValueError(f"RowIndexer: table layout {layout.fingerprint} was not built from this "
                         f"config and vocabulary ({', '.join(differ)} differ)")
