"""Feed-forward layers: a SwiGLU FFN, and DeepSeek-style MoE (shared experts that every
token uses + top-k routed experts) with a load-balancing term."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig

__all__ = ["SwiGLU", "MoE"]


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """``y = shared(x) + sum_k w_k * expert_{i_k}(x)`` over the top-k of a softmax router, with
    the top-k weights renormalised to sum to 1.

    ``aux_loss`` (set by forward) is the Switch-style balance term
    ``E * sum_e f_e * P_e``: ``f_e`` the share of routed slots that went to expert e, ``P_e``
    its mean router probability. It is 1 when routing is perfectly balanced.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_experts = cfg.top_k, cfg.n_routed_experts
        self.router = nn.Linear(cfg.dim, cfg.n_routed_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.dim, cfg.ffn_dim) for _ in range(cfg.n_routed_experts))
        self.shared = SwiGLU(cfg.dim, cfg.ffn_dim * cfg.n_shared_experts) if cfg.n_shared_experts else None
        self.aux_loss = torch.zeros(())

    def route(self, x_nd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities ``[N, E]``, top-k weights ``[N, k]`` (sum 1) and indices ``[N, k]``."""
        probs = self.router(x_nd).float().softmax(dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        return probs, w / w.sum(dim=-1, keepdim=True), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_nd = x.reshape(-1, shape[-1])
        probs, w, idx = self.route(x_nd)
        out = self.shared(x_nd) if self.shared is not None else torch.zeros_like(x_nd)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out = out.index_add(0, tok, expert(x_nd[tok]) * w[tok, slot, None].to(x.dtype))
        frac = torch.bincount(idx.reshape(-1), minlength=self.n_experts).float() / idx.numel()
        self.aux_loss = self.n_experts * (frac * probs.mean(dim=0)).sum()
        return out.reshape(shape)
