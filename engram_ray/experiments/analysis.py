"""The report of ``engram-ray analyze``: LogitLens curves and CKA alignment of an Engram model
against the MoE of the same budget, with the noise each finding has to beat.

- LogitLens (:mod:`.lens`): per state, the KL to the final distribution, per model its mean
  over seeds (standard error over seeds; over the probe batches with one seed), and the
  Engram-minus-MoE difference with its 95 % interval.
- CKA (:mod:`.similarity`): per seed, ``S[i, j]`` = CKA(MoE state i, Engram state j) of the two
  models trained with that seed, and the soft alignment index ``a_j`` of every Engram state.
  The index is biased near the ends (the top-k rows of state 0 lie at 0 or above), so it is read
  against a *reference*: the same index between two MoE models of different seeds, which shows
  what seed noise and the index's own bias give. The finding is the shift beyond it, paired by
  seed: ``a_j(Engram_s vs MoE_s) - a_j(MoE_s' vs MoE_s)`` (``s'`` the next seed), its mean over
  seeds and 95 % interval; it needs two seeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .similarity import cka_matrix, soft_alignment
from .stats import compare, mean_se

__all__ = ["summarise_analysis"]


def summarise_analysis(runs: list[dict[str, Any]], moe: str, engram: str, top_k: int) -> dict[str, Any]:
    """The analysis of probed runs (:func:`~engram_ray.experiments.lens.probe_arm` results
    with their ``states``) of arms ``moe`` and ``engram``; JSON-ready (no states)."""
    by = {name: sorted((r for r in runs if r["arm"] == name), key=lambda r: r["seed"]) for name in (moe, engram)}
    if not by[moe] or not by[engram]:
        raise ValueError(f"analysis: need runs of both {moe!r} and {engram!r}")
    lens = {name: _lens(rs) for name, rs in by.items()}
    a, b = lens[engram], lens[moe]
    lens_diff = [compare(a["kl"][i], a["kl_se"][i], a["df"], b["kl"][i], b["kl_se"][i], b["df"])
                 for i in range(len(a["kl"]))]

    seeds = sorted({r["seed"] for r in by[moe]} & {r["seed"] for r in by[engram]})
    if not seeds:
        raise ValueError("analysis: the MoE and Engram runs share no seed to pair")
    moe_of = {r["seed"]: r for r in by[moe]}
    eng_of = {r["seed"]: r for r in by[engram]}
    s_pairs = [cka_matrix(moe_of[s]["states"], eng_of[s]["states"]) for s in seeds]     # [I, J] each
    align = np.array([soft_alignment(x, top_k) for x in s_pairs])                         # [seeds, J]
    # the reference of seed s: the next seed's MoE read against MoE s (the same rows)
    ref_pairs = [cka_matrix(moe_of[s]["states"], moe_of[seeds[(n + 1) % len(seeds)]]["states"])
                 for n, s in enumerate(seeds)] if len(seeds) > 1 else []
    ref_align = np.array([soft_alignment(x, top_k) for x in ref_pairs]) if ref_pairs else None

    per_state = []
    for j in range(align.shape[1]):
        m, se, _ = mean_se(align[:, j])
        row: dict[str, Any] = {"state": j, "alignment": m, "alignment_se": se, "per_seed": align[:, j].tolist()}
        if ref_align is not None:
            shift = align[:, j] - ref_align[:, j]                                          # paired by seed
            sm, sse, sdf = mean_se(shift)
            row.update(reference=float(ref_align[:, j].mean()), shift=compare(sm, sse, sdf, 0.0, 0.0, sdf),
                       shift_per_seed=shift.tolist())
        per_state.append(row)
    return {
        "states": align.shape[1], "top_k": top_k, "seeds": seeds,
        "logit_lens": {"engram": a, "moe": b, "engram_minus_moe": lens_diff},
        "cka": {"engram_vs_moe": np.mean(s_pairs, axis=0).tolist(),
                "engram_vs_moe_per_seed": [s.tolist() for s in s_pairs],
                "moe_vs_moe": np.mean(ref_pairs, axis=0).tolist() if ref_pairs else None,
                "alignment": per_state,
                "note": ("S[i][j]: CKA of MoE state i and Engram state j (state 0: the embedding); alignment: "
                         "the paper's soft alignment index of each Engram state over the top-k MoE states; "
                         "reference: the same index between MoE models of different seeds; shift: the "
                         "difference, positive = the Engram state resembles deeper MoE states")
                if ref_pairs else "one seed: no MoE-vs-MoE reference, so no alignment verdict"},
    }


def _lens(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's LogitLens curve: mean over seeds, se over seeds (one seed: over batches)."""
    kl = np.array([r["logit_lens"]["kl"] for r in runs])                     # [seeds, states]
    loss = np.array([r["logit_lens"]["loss"] for r in runs])
    if len(runs) > 1:
        cols = [mean_se(kl[:, i]) for i in range(kl.shape[1])]
        over = "seeds"
    else:
        cols = [mean_se(b) for b in runs[0]["logit_lens"]["kl_batches"]]      # per state, its batches
        over = "probe batches"
    return {"kl": [c[0] for c in cols], "kl_se": [c[1] for c in cols], "df": cols[0][2], "se_over": over,
            "loss": loss.mean(axis=0).tolist(), "kl_per_seed": kl.tolist()}
