"""Parameter accounting of an Engram-MoE, as the paper's sparsity-allocation study counts it.

For a backbone (:class:`~engram_ray.config.ModelConfig`) and an Engram table
(:class:`~engram_ray.config.EngramConfig`, or none):

* **total** -- every parameter: the dense ones (embedding, attention, norms, router, shared
  and routed experts, the Engram layers' projections, gains and convolutions) and every row of
  the table;
* **activated** per token -- what one token's forward reads: everything dense except the
  routed experts it is not sent to (``n_routed - top_k`` per MoE layer), plus the table rows
  it looks up (one per head, order and Engram layer). The token embedding is counted as
  activated whole, tied to the output head or not, as the dense weights are (one of its rows
  is read; the output head reads all of its own);
* **sparse** (inactive) = total - activated: the routed experts a token skips, and the rows
  it does not read;
* **rho** -- the share of the sparse budget that goes to routed experts:
  ``rho = sparse experts / (sparse experts + sparse table)``; 1 for a pure MoE, lower as
  parameters move into Engram memory (the paper finds loss lowest at rho ~ 0.75-0.8).

Counting is exact: the model is built on torch's meta device (shapes, no memory) and the table's
size comes from its prime head sizes (``core.hashing.head_primes``), so a 100B table costs
nothing to count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import EngramConfig, ModelConfig
from .engram import EngramLayer
from .moe import MoE
from .transformer import EngramLM

__all__ = ["ParamCount", "count_params"]


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one (backbone, Engram) pair; see the module for the definitions."""

    total: int
    activated: int
    #: Dense parameters outside the routed experts and the Engram layers (all activated).
    backbone: int
    #: Routed experts, all of them, and the part one token does not use.
    routed_experts: int
    routed_inactive: int
    #: The Engram layers' own weights (projections, gains, convolutions): activated.
    engram_layers: int
    #: Table rows x row width, and what one token reads of it.
    table: int
    table_activated: int

    @property
    def sparse(self) -> int:
        return self.total - self.activated

    @property
    def rho(self) -> float | None:
        """Share of the sparse parameters in routed experts (None: nothing is sparse)."""
        sparse_table = self.table - self.table_activated
        s = self.routed_inactive + sparse_table
        return self.routed_inactive / s if s else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sparse": self.sparse, "rho": self.rho}


def count_params(model_cfg: ModelConfig, engram_cfg: EngramConfig | None = None) -> ParamCount:
    """Exact parameter counts of ``EngramLM(model_cfg, engram_cfg)`` and its table."""
    with torch.device("meta"):
        model = EngramLM(model_cfg, engram_cfg)
    seen: set[int] = set()

    def size(params: Any) -> int:  # each tensor once (the tied head shares the embedding)
        n = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    routed = inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(p.numel() for p in m.experts[0].parameters())
            routed += size(m.experts.parameters())
            inactive += per_expert * (m.n_experts - m.top_k)
    engram_layers = size(p for m in model.modules() if isinstance(m, EngramLayer) for p in m.parameters())
    backbone = size(model.parameters())
    table = table_activated = 0
    if engram_cfg is not None:
        from ..core.hashing import head_primes

        primes = head_primes(engram_cfg)
        table = sum(p for layer in primes.values() for order in layer for p in order) * engram_cfg.row_dim
        heads = (engram_cfg.max_ngram_size - 1) * engram_cfg.n_head_per_ngram
        table_activated = len(engram_cfg.layer_ids) * heads * engram_cfg.row_dim
    total = backbone + routed + engram_layers + table
    activated = total - inactive - (table - table_activated)
    return ParamCount(total=total, activated=activated, backbone=backbone, routed_experts=routed,
                      routed_inactive=inactive, engram_layers=engram_layers, table=table,
                      table_activated=table_activated)
