"""Hyper-connections (Zhu et al., 2024): ``n`` residual streams per token instead of one.

Around each sublayer, a learned read ``alpha`` mixes the streams into the sublayer's input,
a learned ``mix`` matrix carries the streams forward, and ``beta`` writes the sublayer's output
into each stream::

    x = sum_i alpha_i h_i          h'_j = sum_i mix_ij h_i + beta_j * f(x)

Initialised as in the paper (sublayer k reads stream k mod n, mix = I, beta = 1). With
``n = 1`` this is exactly the plain residual ``h + f(h)`` and has no parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["HyperConnection"]


class HyperConnection(nn.Module):
    def __init__(self, n: int, index: int):
        super().__init__()
        self.n = n
        if n > 1:
            self.alpha = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(index % n), n).float())
            self.mix = nn.Parameter(torch.eye(n))
            self.beta = nn.Parameter(torch.ones(n))

    def read(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, T, n, D]`` -> the sublayer input ``[B, T, D]``."""
        if self.n == 1:
            return h[:, :, 0]
        return torch.einsum("btnd,n->btd", h, self.alpha.to(h.dtype))

    def write(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Streams ``[B, T, n, D]`` plus sublayer output ``[B, T, D]`` -> new streams."""
        if self.n == 1:
            return h + y[:, :, None]
        return (torch.einsum("btnd,nm->btmd", h, self.mix.to(h.dtype))
                + self.beta.to(h.dtype)[:, None] * y[:, :, None])
