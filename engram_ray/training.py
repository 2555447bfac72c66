"""The training loop, evaluation and generation of an :class:`EngramLM`, against any memory
(``LocalMemory`` in-process, ``RemoteMemory`` from the service): plain torch, no Ray.

Per step: sample a batch on the host, index it (``RowIndexer``: the row ids depend only on
the tokens, and hashing is numpy, so it happens before the batch moves to the device), start
the fetch of every Engram layer's rows, move the batch, run the forward -- block 0.. compute
while the rows travel, and an Engram layer waits only if its rows have not arrived -- then
backward, AdamW on the dense
weights and the sparse optimiser on the rows (on the shards for a remote memory).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .config import MAX_LR, MIN_LR, EngramConfig, ModelConfig, TrainConfig
from .core.indexer import RowIndexer
from .core.tokens import CompressedVocab
from .model import EngramLM, Memory, MemoryFetch
from .model.engram import EngramLayer, ShortConv
from .model.hyper import HyperConnection

__all__ = ["Trainer", "decay_groups"]


def decay_groups(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(decayed, not decayed) parameters: weight decay only on the backbone's matrices. Not on
    vectors (biases, norm gains), not on the Engram layers' own gains (RMSNorms stored ``[n, D]``:
    matrices by shape, gains by role), not on hyper-connection mixing (the identity at init)."""
    own = (EngramLayer, ShortConv, HyperConnection)
    spared = {id(p) for m in model.modules() if isinstance(m, own) for p in m.parameters(recurse=False)}
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in spared else no_decay).append(p)
    return decay, no_decay


class Trainer:
    """Owns the model, its dense optimiser, the data and the row indexer; borrows a memory
    (``None`` for the no-Engram baseline, ``engram_cfg=None``)."""

    def __init__(self, model_cfg: ModelConfig, engram_cfg: EngramConfig | None, vocab: CompressedVocab,
                 memory: Memory | None, train_tokens: np.ndarray, val_tokens: np.ndarray,
                 cfg: TrainConfig = TrainConfig(), device: str | torch.device = "cpu"):
        if train_tokens.size <= cfg.seq_len + 1 or val_tokens.size <= cfg.seq_len + 1:
            raise ValueError(f"the corpus splits ({train_tokens.size} / {val_tokens.size} tokens) must be "
                             f"longer than seq_len+1={cfg.seq_len + 1}")
        if cfg.seq_len > model_cfg.max_seq_len:
            raise ValueError(f"TrainConfig.seq_len={cfg.seq_len} exceeds ModelConfig.max_seq_len="
                             f"{model_cfg.max_seq_len}")
        self.cfg, self.device = cfg, torch.device(device)
        torch.manual_seed(cfg.seed)
        self.model = EngramLM(model_cfg, engram_cfg).to(self.device)
        self.engram_cfg, self.vocab, self.memory = engram_cfg, vocab, memory
        self.indexer: RowIndexer | None = None
        if engram_cfg is not None:
            if memory is None:
                raise ValueError("Trainer: a model with Engram layers needs a memory")
            # against the memory's own layout: a table built for another config is refused here
            self.indexer = RowIndexer.build(engram_cfg, vocab, layout=memory.layout)
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        decay, no_decay = decay_groups(self.model)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.rng = np.random.default_rng(cfg.seed)
        self.step_count = 0

    # Data ----------------------------------------------------------------------------------
    def batch(self, split: str, rng: np.random.Generator | None = None) -> np.ndarray:
        """``[B, seq_len+1]`` int64 token windows from ``split`` ("train" or "val"), on the host."""
        data = self.train_tokens if split == "train" else self.val_tokens
        rng = rng or self.rng
        T = self.cfg.seq_len + 1
        starts = rng.integers(0, data.size - T, size=self.cfg.batch_size)
        return np.stack([data[a:a + T] for a in starts]).astype(np.int64)

    def _fetch(self, tokens_bt: np.ndarray, requires_grad: bool) -> MemoryFetch | None:
        """Start fetching the rows of host tokens ``[B, T]`` (None without Engram layers)."""
        if self.indexer is None or self.memory is None:
            return None
        return self.memory.fetch(self.indexer.rows(tokens_bt), requires_grad=requires_grad)

    def _inputs(self, batch_bt: np.ndarray, requires_grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor, MemoryFetch | None]:
        """Inputs, targets (on the device) and the started fetch of a host batch ``[B, T+1]``.

        The rows are indexed from the host array, then the batch moves: hashing is numpy, and
        a tensor on an accelerator has no ``.numpy()``."""
        fetch = self._fetch(batch_bt[:, :-1], requires_grad)      # rows start travelling here
        batch = torch.from_numpy(batch_bt).to(self.device)
        return batch[:, :-1], batch[:, 1:], fetch

    def held_out(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, MemoryFetch | None]:
        """A validation batch drawn with ``rng``: inputs and targets ``[B, T]`` on the device and
        the started fetch of its rows (without gradients): what evaluation and probes feed."""
        return self._inputs(self.batch("val", rng), requires_grad=False)

    # Steps ---------------------------------------------------------------------------------
    def _lr(self) -> float:
        c = self.cfg
        if self.step_count < c.warmup_steps:
            return c.lr * (self.step_count + 1) / c.warmup_steps
        progress = (self.step_count - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def table_lr(self) -> float | None:
        """This step's learning rate of the Engram rows: ``table_lr_mult`` x the backbone's
        scheduled rate (None: the table's own rate, when the multiplier is 0)."""
        if not self.cfg.table_lr_mult:
            return None
        # within the rates a push may carry (the config bounds the peak; rounding may not)
        return min(MAX_LR, max(MIN_LR, self.cfg.table_lr_mult * self._lr()))

    def train_step(self) -> dict[str, float]:
        """One optimiser step; returns loss, timings and rows moved."""
        self.model.train()
        t0 = time.perf_counter()
        x, y, fetch = self._inputs(self.batch("train"), requires_grad=True)
        logits = self.model(x, fetch)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        aux = self.model.aux_loss()
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        for g in self.opt.param_groups:
            g["lr"] = self._lr()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        rows_updated = 0
        if fetch is not None and self.memory is not None:
            lr = self.table_lr()  # passed only when set: a Memory of before rates still works
            rows_updated = self.memory.update(fetch, lr=lr) if lr is not None else self.memory.update(fetch)
        self.step_count += 1
        return {"step": self.step_count, "loss": loss.item(), "aux_loss": float(aux.detach()),
                "seconds": time.perf_counter() - t0, "tokens": x.numel(),
                "wait_seconds": fetch.wait_seconds if fetch is not None else 0.0,
                "fetch_seconds": fetch.fetch_seconds if fetch is not None else 0.0,
                "rows_updated": rows_updated}

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> float:
        """Mean validation loss over fixed batches (the same ones every call)."""
        rng = np.random.default_rng(12345)
        return float(np.mean([self.evaluate_batch(rng) for _ in range(batches or self.cfg.eval_batches)]))

    @torch.no_grad()
    def evaluate_batch(self, rng: np.random.Generator) -> float:
        """Validation loss of one batch drawn with ``rng`` (a fixed seed: the same batch for
        every model that is asked)."""
        self.model.eval()
        x, y, fetch = self.held_out(rng)
        logits = self.model(x, fetch)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int = 40, temperature: float = 0.8,
                 top_k: int = 40, seed: int = 0) -> list[int]:
        """Sample a continuation. Each step indexes only the new token against the sequence's
        last N-1 ids (the same rows as indexing the whole text) and fetches its rows as soon
        as it is sampled."""
        self.model.eval()
        if not prompt_ids:
            raise ValueError("generate: the prompt is empty")
        gen = torch.Generator().manual_seed(seed)
        limit = self.model.cfg.max_seq_len
        ids = list(prompt_ids)[-(limit - 1):]  # the loop stops when the cache is full
        cache = self.model.new_cache(1, device=self.device)
        hist = self.indexer.new_history(1) if self.indexer is not None else None
        new_bt = np.array([ids], dtype=np.int64)  # the tokens to feed next, kept on the host
        pos = 0
        out: list[int] = []
        for _ in range(max_new_tokens):
            fetch = None
            if self.indexer is not None and self.memory is not None and hist is not None:
                rows, hist = self.indexer.step(hist, new_bt)
                fetch = self.memory.fetch(rows, requires_grad=False)
            new = torch.from_numpy(new_bt).to(self.device)
            logits = self.model(new, fetch, cache=cache, start_pos=pos)[:, -1].float()
            pos += new.shape[1]
            if pos >= limit:
                break
            out.append(_sample(logits.cpu(), temperature, top_k, gen))
            new_bt = np.array([[out[-1]]], dtype=np.int64)
        return out


def _sample(logits_1v: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    """One token id from host logits ``[1, vocab]`` (on the host: ``gen`` is a CPU generator)."""
    probs = torch.softmax(logits_1v / max(temperature, 1e-5), dim=-1)
    if top_k:
        v, i = probs.topk(min(top_k, probs.shape[-1]))
        return int(i[0, torch.multinomial(v[0] / v[0].sum(), 1, generator=gen)])
    return int(torch.multinomial(probs[0], 1, generator=gen))
