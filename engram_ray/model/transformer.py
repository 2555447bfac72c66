"""``EngramLM``: decoder-only transformer (RMSNorm, rotary attention, DeepSeek-style MoE or a
dense FFN, hyper-connections) with Engram layers at ``EngramConfig.layer_ids``.

Shapes: tokens ``[B, T]``; residual streams ``[B, T, n, D]`` (n = hc_mult); logits
``[B, T, vocab]``. A block is ``h += Engram(h, rows)`` (if it is an Engram layer), then
attention and FFN, each behind its own hyper-connection, pre-norm.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn

from ..config import EngramConfig, ModelConfig
from .attention import Attention, KVCache, RowPositions, rope_tables
from .engram import EngramLayer
from .hyper import HyperConnection
from .memory import MemoryFetch
from .moe import MoE, SwiGLU

__all__ = ["EngramLM", "Block"]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, engram: EngramConfig | None):
        super().__init__()
        self.layer = layer
        self.engram = (EngramLayer(layer, engram, cfg.dim, cfg.hc_mult, cfg.norm_eps)
                       if engram is not None and layer in engram.layer_ids else None)
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.ffn == "moe" else SwiGLU(cfg.dim, cfg.ffn_dim)
        self.hc_attn = HyperConnection(cfg.hc_mult, 2 * layer)
        self.hc_ffn = HyperConnection(cfg.hc_mult, 2 * layer + 1)
        #: False: the Engram layer is skipped (the paper's §6.3 ablation: Engram off at inference).
        self.engram_on = True

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                rows: torch.Tensor | None, cache: KVCache | None,
                start_pos: int | RowPositions) -> torch.Tensor:
        if self.engram is not None and self.engram_on:
            state = cache.extra.get(("conv", self.layer)) if cache is not None else None
            out, state = self.engram(h, rows, state)
            if cache is not None:
                cache.extra[("conv", self.layer)] = state
            h = h + out
        x = self.hc_attn.read(h)
        h = self.hc_attn.write(h, self.attn(self.attn_norm(x), cos, sin, cache, start_pos))
        x = self.hc_ffn.read(h)
        return self.hc_ffn.write(h, self.ffn(self.ffn_norm(x)))


class EngramLM(nn.Module):
    """The language model. ``engram=None`` gives the plain backbone (the no-Engram baseline)."""

    rope_cos: torch.Tensor  # buffers [max_seq_len, head_dim/2], registered in __init__
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig, engram: EngramConfig | None = None):
        super().__init__()
        if engram is not None and max(engram.layer_ids) >= cfg.n_layers:
            raise ValueError(f"EngramConfig.layer_ids={list(engram.layer_ids)}: every Engram layer "
                             f"must be < ModelConfig.n_layers={cfg.n_layers}")
        self.cfg, self.engram_cfg = cfg, engram
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i, engram) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        #: Engram layer id -> index into the fetch (the order of EngramConfig.layer_ids).
        self.engram_index = {layer: i for i, layer in enumerate(engram.layer_ids)} if engram else {}
        #: Per block, the index of its rows in the fetch (None: not an Engram layer).
        self.fetch_slots: list[int | None] = [self.engram_index.get(i) for i in range(cfg.n_layers)]

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            bias = getattr(m, "bias", None)  # nn.Embedding has none
            if isinstance(bias, torch.Tensor):
                nn.init.zeros_(bias)

    def new_cache(self, batch: int, device=None) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, batch, c.n_heads, c.dim // c.n_heads, c.max_seq_len,
                       device=device or self.head.weight.device, dtype=self.head.weight.dtype)

    def forward(self, tokens: torch.Tensor, fetch: MemoryFetch | None = None,
                cache: KVCache | None = None, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for tokens ``[B, T]`` at positions ``start_pos..``.

        ``fetch`` supplies the Engram rows of exactly these tokens (required when the model has
        Engram layers); ``cache`` makes decoding incremental. ``start_pos`` may be a CPU int
        tensor ``[B]`` with a cache: each row continues its own sequence at its own position
        (a serving engine's decode batch of sequences of different lengths).
        """
        B, T = tokens.shape
        at: int | RowPositions = start_pos if isinstance(start_pos, int) else \
            RowPositions.of(start_pos, T, tokens.device)
        end = at.end if isinstance(at, RowPositions) else at + T
        if end > self.cfg.max_seq_len:
            raise ValueError(f"positions up to {end} exceed max_seq_len={self.cfg.max_seq_len}")
        if self.engram_index and fetch is None and self.engram_enabled:
            raise ValueError("this model has Engram layers: pass the fetch of the batch's rows")
        if isinstance(at, RowPositions):
            if cache is None:
                raise ValueError("per-row positions need a cache (they continue cached sequences)")
            cos, sin = self.rope_cos[at.pos_bt][:, None], self.rope_sin[at.pos_bt][:, None]  # [B, 1, T, hd/2]
        else:
            cos, sin = self.rope_cos[at:end], self.rope_sin[at:end]
        h = self.tok_emb(tokens)[:, :, None].expand(B, T, self.cfg.hc_mult, self.cfg.dim)
        for block, slot in zip(self.blocks, self.fetch_slots):
            on = cast(Block, block).engram_on  # off: its rows are not read (the ablation)
            rows = fetch.rows(slot) if slot is not None and fetch is not None and on else None
            h = block(h, cos, sin, rows, cache, at)
        return self.head(self.norm(h.sum(dim=2)))

    @property
    def engram_enabled(self) -> bool:
        return all(cast(Block, b).engram_on for b in self.blocks)

    def set_engram(self, enabled: bool) -> None:
        """Switch every Engram layer on or off. Off, the blocks skip their Engram layer (its rows
        are not read: ``fetch`` may be None) -- the paper's §6.3 ablation, at inference."""
        for b in self.blocks:
            cast(Block, b).engram_on = bool(enabled)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE balance terms of the last forward, weighted by aux_loss_weight."""
        terms = [b.ffn.aux_loss for b in self.blocks if isinstance(b.ffn, MoE)]
        if not terms:
            return torch.zeros((), device=self.head.weight.device)
        return self.cfg.aux_loss_weight * torch.stack(terms).sum()
