"""The training loop, evaluation and generation of an :class:`EngramLM`, against any memory
(``LocalMemory`` in-process, ``RemoteMemory`` from the service): plain torch, no Ray.

Per step: sample a batch, hash it (the row ids depend only on the tokens), start the fetch of
every Engram layer's rows, run the forward -- block 0.. compute while the rows travel, and an
Engram layer waits only if its rows have not arrived -- then backward, AdamW on the dense
weights and the sparse optimiser on the rows (on the shards for a remote memory).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import EngramConfig, ModelConfig, TrainConfig
from .core.hashing import NgramHasher
from .core.layout import TableLayout
from .core.tokens import CompressedVocab
from .model import EngramLM

__all__ = ["Trainer"]


class Trainer:
    """Owns the model, its dense optimiser, the data and the hasher; borrows a memory."""

    def __init__(self, model_cfg: ModelConfig, engram_cfg: EngramConfig | None, vocab: CompressedVocab,
                 memory: Any, train_tokens: np.ndarray, val_tokens: np.ndarray,
                 cfg: TrainConfig = TrainConfig(), device: str = "cpu"):
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
        self.hasher = NgramHasher.from_vocab(engram_cfg, vocab) if engram_cfg else None
        self.layout: TableLayout | None = memory.layout if engram_cfg else None
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.rng = np.random.default_rng(cfg.seed)
        self.step_count = 0

    # Data ----------------------------------------------------------------------------------
    def batch(self, split: str, rng: np.random.Generator | None = None) -> torch.Tensor:
        """``[B, seq_len+1]`` token windows from ``split`` ("train" or "val")."""
        data = self.train_tokens if split == "train" else self.val_tokens
        rng = rng or self.rng
        T = self.cfg.seq_len + 1
        starts = rng.integers(0, data.size - T, size=self.cfg.batch_size)
        return torch.as_tensor(np.stack([data[a:a + T] for a in starts]).astype(np.int64))

    def row_ids(self, tokens: torch.Tensor) -> np.ndarray:
        """Global row ids ``[L, B, T, H]`` of a token batch."""
        return self.layout.row_ids_stacked(self.hasher.hash_stacked(self.vocab(tokens.numpy())))

    def _fetch(self, tokens: torch.Tensor, requires_grad: bool):
        if self.hasher is None:
            return None
        return self.memory.fetch(self.row_ids(tokens), requires_grad=requires_grad)

    # Steps ---------------------------------------------------------------------------------
    def _lr(self) -> float:
        c = self.cfg
        if self.step_count < c.warmup_steps:
            return c.lr * (self.step_count + 1) / c.warmup_steps
        progress = (self.step_count - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def train_step(self) -> dict[str, float]:
        """One optimiser step; returns loss, timings and rows moved."""
        self.model.train()
        t0 = time.perf_counter()
        batch = self.batch("train").to(self.device)
        x, y = batch[:, :-1], batch[:, 1:]
        fetch = self._fetch(x, requires_grad=True)              # rows start travelling here
        logits = self.model(x, fetch)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        aux = self.model.aux_loss()
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        for g in self.opt.param_groups:
            g["lr"] = self._lr()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        rows_updated = self.memory.update(fetch) if fetch is not None else 0
        self.step_count += 1
        return {"step": self.step_count, "loss": loss.item(), "aux_loss": float(aux.detach()),
                "seconds": time.perf_counter() - t0, "tokens": x.numel(),
                "wait_seconds": getattr(fetch, "wait_seconds", 0.0),
                "fetch_seconds": getattr(fetch, "fetch_seconds", 0.0),
                "rows_updated": rows_updated}

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> float:
        """Mean validation loss over fixed batches (the same ones every call)."""
        self.model.eval()
        rng = np.random.default_rng(12345)
        losses = []
        for _ in range(batches or self.cfg.eval_batches):
            batch = self.batch("val", rng).to(self.device)
            x, y = batch[:, :-1], batch[:, 1:]
            logits = self.model(x, self._fetch(x, requires_grad=False))
            losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
        return float(np.mean(losses))

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int = 40, temperature: float = 0.8,
                 top_k: int = 40, seed: int = 0) -> list[int]:
        """Sample a continuation. Each step hashes only the new token against the sequence's
        last N-1 ids (the same rows as hashing the whole text) and fetches its rows as soon
        as it is sampled."""
        self.model.eval()
        if not prompt_ids:
            raise ValueError("generate: the prompt is empty")
        gen = torch.Generator().manual_seed(seed)
        limit = self.model.cfg.max_seq_len
        ids = list(prompt_ids)[-(limit - 1):]  # the loop stops when the cache is full
        cache = self.model.new_cache(1, device=self.device)
        hist = self.hasher.new_history(1) if self.hasher else None
        new = torch.tensor([ids], device=self.device)
        pos = 0
        out = []
        for _ in range(max_new_tokens):
            fetch = None
            if self.hasher is not None:
                heads, hist = self.hasher.hash_step(hist, self.vocab(new.cpu().numpy()))
                rows = np.stack([self.layout.row_ids(l, heads[l]) for l in self.engram_cfg.layer_ids])
                fetch = self.memory.fetch(rows, requires_grad=False)
            logits = self.model(new, fetch, cache=cache, start_pos=pos)[:, -1].float()
            pos += new.shape[1]
            if pos >= limit:
                break
            probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
            if top_k:
                v, i = probs.topk(min(top_k, probs.shape[-1]))
                nxt = i[0, torch.multinomial(v[0] / v[0].sum(), 1, generator=gen)]
            else:
                nxt = torch.multinomial(probs[0], 1, generator=gen)
            out.append(int(nxt))
            new = nxt.view(1, 1).to(self.device)
        return out
