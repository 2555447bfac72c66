"""The Engram layer: gate memory rows against the hidden state and add them to the streams.

For each hyper-connection branch i (shared/DESIGN.md, "Model"):

    k_i = RMSNorm(W_k,i e)            q_i = RMSNorm(h_i)
    g_i = sigmoid(ssqrt(<k_i, q_i> / sqrt(D)))      ssqrt(x) = sign(x) sqrt(|x|)
    v_i = g_i * (W_v e)                             (one value projection for all branches)
    out_i = v_i + SiLU(DepthwiseCausalConv(RMSNorm(v_i)))   kernel 4, dilation = max n-gram

where ``e [B, T, H*row_dim]`` are the fetched rows of the token's n-grams. The output is added
to every residual stream.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import EngramConfig

__all__ = ["EngramLayer", "ShortConv"]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with a per-branch weight broadcast from the left."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class ShortConv(nn.Module):
    """Causal depthwise convolution over time of each branch's RMS-normalised value, SiLU.

    ``state`` carries the last ``(kernel-1)*dilation`` normalised inputs between decoding
    steps, so stepping token by token equals convolving the whole sequence (zeros before t=0,
    as the reference's left padding).
    """

    def __init__(self, dim: int, n: int, kernel: int, dilation: int, eps: float, zero_init: bool = True):
        super().__init__()
        self.n, self.dim, self.eps = n, dim, eps
        self.reach = (kernel - 1) * dilation
        self.norm = nn.Parameter(torch.ones(n, dim))
        self.conv = nn.Conv1d(n * dim, n * dim, kernel, groups=n * dim, bias=False, dilation=dilation)
        if zero_init:  # the paper: the branch starts as nothing, Y = V (EngramConfig.short_conv_init)
            nn.init.zeros_(self.conv.weight)

    def forward(self, v: torch.Tensor, state: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """v ``[B, T, n, D]`` -> (y ``[B, T, n, D]``, new state ``[B, reach, n*D]``)."""
        B, T, n, D = v.shape
        x = _rms(v, self.norm, self.eps).reshape(B, T, n * D)
        if state is None:
            state = x.new_zeros(B, self.reach, n * D)
        full = torch.cat([state, x], dim=1)                       # [B, reach + T, n*D]
        y = F.silu(self.conv(full.transpose(1, 2))).transpose(1, 2)
        return y.reshape(B, T, n, D), full[:, full.shape[1] - self.reach:]


class EngramLayer(nn.Module):
    def __init__(self, layer_id: int, engram: EngramConfig, dim: int, n: int, eps: float):
        super().__init__()
        self.layer_id, self.n, self.dim, self.eps = layer_id, n, dim, eps
        mem = engram.memory_dim
        self.value_proj = nn.Linear(mem, dim)
        self.key_proj = nn.Linear(mem, n * dim)                    # W_k of every branch at once
        self.norm_k = nn.Parameter(torch.ones(n, dim))
        self.norm_q = nn.Parameter(torch.ones(n, dim))
        self.short_conv = ShortConv(dim, n, engram.kernel_size, engram.max_ngram_size, eps,
                                    zero_init=engram.short_conv_init == "zero")

    def gates(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Per-branch gates in (0, 1): ``[B, T, n, 1]`` for streams ``h`` and rows ``e``."""
        B, T = e.shape[:2]
        k = _rms(self.key_proj(e).view(B, T, self.n, self.dim), self.norm_k, self.eps)
        q = _rms(h, self.norm_q, self.eps)
        g = (k * q).sum(-1, keepdim=True) / math.sqrt(self.dim)
        return torch.sigmoid(g.sign() * g.abs().clamp_min(1e-6).sqrt())

    def forward(self, h: torch.Tensor, e: torch.Tensor, state: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """h ``[B, T, n, D]``, e ``[B, T, H*row_dim]`` -> (out ``[B, T, n, D]``, conv state)."""
        v = self.gates(h, e) * self.value_proj(e.to(h.dtype))[:, :, None]
        y, state = self.short_conv(v, state)
        return v + y, state
