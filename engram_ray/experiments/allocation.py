"""The sparsity-allocation sweep's configurations: one parameter budget, split between routed
experts and Engram memory at several rho (the paper's Figure 3 set-up, at any scale).

Start from a MoE backbone with ``E`` routed experts and ``top_k`` of them per token. For each
expert count ``E' <= E`` (``E' >= top_k``, so every token still uses ``top_k`` experts: the
activated compute is held), the ``(E - E')`` experts removed free their parameters, and the
Engram table gets them: its rows are sized so that the whole model's total matches the pure
MoE's (the Engram layers' own projections come out of the same budget). rho -- the share of the
sparse parameters left in routed experts (:mod:`engram_ray.model.params`) -- falls from 1 (pure
MoE) as ``E'`` falls. The table's head sizes become distinct primes at least the requested size,
so the sizes are trimmed until the total is at most the budget (short of it by less than a
row per table); every arm's exact counts are reported.

Pure: no torch training, no Ray here; :mod:`engram_ray.experiments.run` trains an arm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import EngramConfig, ModelConfig
from ..model.params import ParamCount, count_params

__all__ = ["Arm", "allocation_arms"]


@dataclass(frozen=True)
class Arm:
    """One configuration of the sweep: its backbone, its table (None: pure MoE), its counts."""

    name: str
    routed_experts: int
    model: ModelConfig
    engram: EngramConfig | None
    params: ParamCount

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "routed_experts": self.routed_experts, "model": self.model.to_dict(),
                "engram": self.engram.to_dict() if self.engram else None, "params": self.params.to_dict()}


def allocation_arms(model: ModelConfig, engram: EngramConfig, experts: list[int]) -> list[Arm]:
    """The sweep's arms: the pure MoE ``model`` (its ``n_routed_experts``) first, then one arm per
    count in ``experts`` with the freed parameters in a table shaped like ``engram`` (its layers,
    orders, heads and row width; its sizes are replaced)."""
    if model.ffn != "moe":
        raise ValueError(f"the allocation sweep starts from a MoE backbone; got ffn={model.ffn!r}")
    bad = [e for e in experts if not model.top_k <= e < model.n_routed_experts]
    if bad:
        raise ValueError(f"expert counts {bad}: expected top_k={model.top_k} <= E' < "
                         f"n_routed_experts={model.n_routed_experts} (the pure MoE is always the first arm)")
    base = count_params(model, None)
    arms = [Arm("moe", model.n_routed_experts, model, None, base)]
    orders = engram.max_ngram_size - 1
    for e in sorted(set(experts), reverse=True):
        m = dataclasses.replace(model, n_routed_experts=e)
        # the Engram layers' own weights come out of the freed budget too: count them with a
        # token-sized table, then give the table what is left
        probe = count_params(m, dataclasses.replace(engram, engram_vocab_size=(2,) * orders))
        room = base.total - (probe.total - probe.table)
        if room <= 0:
            raise ValueError(f"E'={e}: removing {model.n_routed_experts - e} experts frees too little for the "
                             "Engram layers' own weights; remove more experts or use a smaller row width")
        tables = len(engram.layer_ids) * orders * engram.n_head_per_ngram
        per_head = max(2, room // (engram.row_dim * tables))
        # head sizes become primes at least as large (and distinct): take the overshoot back
        for _ in range(4):
            cfg = dataclasses.replace(engram, engram_vocab_size=(int(per_head),) * orders)
            pc = count_params(m, cfg)
            over = pc.total - base.total
            if over <= 0 or per_head <= 2:
                break
            per_head = max(2, per_head - -(-over // (engram.row_dim * tables)))
        arms.append(Arm(f"E{e}", e, m, cfg, pc))
    return arms
