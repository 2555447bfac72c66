"""Causal multi-head attention with rotary position embeddings and a KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig

__all__ = ["Attention", "KVCache", "RowPositions", "rope_tables"]


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[max_len, head_dim/2]`` for rotating (first half, second half) pairs."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, heads, T, hd]``; cos/sin ``[T, hd/2]`` (or ``[B, 1, T, hd/2]``, per row)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Keys and values of past positions, one slot per layer: ``[B, heads, max_len, hd]``."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
                 device=None, dtype=torch.float32):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        #: Per-layer state of stateful modules (the Engram ShortConv keeps its last inputs).
        self.extra: dict = {}


@dataclass(frozen=True)
class RowPositions:
    """Positions of a batch whose rows are sequences of different lengths (a serving engine's
    decode batch): ``pos_bt [B, T]`` absolute positions on the device, and ``end``, one past
    the largest (a host int, so no device sync is needed to slice the cache)."""

    pos_bt: torch.Tensor
    end: int

    @classmethod
    def of(cls, start_b: torch.Tensor, T: int, device: torch.device) -> RowPositions:
        """Rows starting at ``start_b [B]`` (a CPU int tensor), ``T`` tokens each."""
        end = int(start_b.max()) + T if start_b.numel() else T
        pos = start_b.to(device)[:, None] + torch.arange(T, device=device)
        return cls(pos, end)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads = layer, cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, start_pos: int | RowPositions = 0) -> torch.Tensor:
        """x ``[B, T, D]`` at positions ``start_pos..start_pos+T`` (or each row's own, with
        :class:`RowPositions` and a cache); cos/sin for those positions."""
        B, T, D = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)            # [B, heads, T, hd]
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(start_pos, RowPositions):
            out = self._rows_attend(q, k, v, cache, start_pos)
        else:
            end = start_pos + T
            cache.k[self.layer][:, :, start_pos:end] = k
            cache.v[self.layer][:, :, start_pos:end] = v
            k, v = cache.k[self.layer][:, :, :end], cache.v[self.layer][:, :, :end]
            # query i (absolute start_pos+i) sees keys 0..start_pos+i
            mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, D))

    def _rows_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                     at: RowPositions) -> torch.Tensor:
        """Attention of rows at their own positions: row b's keys go to its positions in the
        cache and its queries see keys ``0..pos`` of row b only (later slots of a shorter row
        hold stale keys of an earlier sequence: masked)."""
        rows = torch.arange(q.shape[0], device=q.device)[:, None]      # [B, 1]
        # advanced indices on dims 0 and 2 put the indexed dims first: [B, T, heads, hd]
        cache.k[self.layer][rows, :, at.pos_bt] = k.transpose(1, 2)
        cache.v[self.layer][rows, :, at.pos_bt] = v.transpose(1, 2)
        keys, values = cache.k[self.layer][:, :, :at.end], cache.v[self.layer][:, :, :at.end]
        mask = torch.arange(at.end, device=q.device) <= at.pos_bt[:, :, None]   # [B, T, end]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])
