"""The report of ``engram-ray analyze``: LogitLens curves and CKA alignment of an Engram model
against the MoE of the same budget, with the noise each finding has to beat.

- LogitLens (:mod:`.lens`): per state, the KL to the final distribution, per model its mean
  over seeds with its standard error over seeds, and the Engram-minus-MoE difference with its
  95 % interval. With one seed the se shown is over the probe batches (text sampling only, not
  training noise), and no verdict is given.
- CKA (:mod:`.similarity`): the soft alignment index ``a_j`` of every Engram state over the MoE
  states. The index is biased near the ends (the top-k rows of state 0 lie at 0 or above) and
  two models trained differently never match exactly, so it is read against a *reference*
  built the same way: for each seed ``s`` and the next seed ``s'`` (cyclically), rows MoE_s,
  columns Engram_{s'} against columns MoE_{s'}. Both pairs cross seeds (different init and data
  order) and share their rows; the finding is the shift ``a_j(Engram_{s'} | MoE_s) -
  a_j(MoE_{s'} | MoE_s)``, its mean over the pairs and 95 % interval. The pairs share models
  (each seed is used twice), so the interval is approximate; it needs two seeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .similarity import cka_matrix, soft_alignment
from .stats import compare, mean_se

__all__ = ["summarise_analysis"]


def summarise_analysis(runs: list[dict[str, Any]], moe: str, engram: str, top_k: int,
                       first_engram_state: int | None = None) -> dict[str, Any]:
    """The analysis of probed runs (:func:`~engram_ray.experiments.lens.probe_arm` results
    with their ``states``) of arms ``moe`` and ``engram``; JSON-ready (no states).
    ``first_engram_state``: the first state after an Engram layer (states before it are
    marked: a shift there comes from training, not from reading the table)."""
    by = {name: sorted((r for r in runs if r["arm"] == name), key=lambda r: r["seed"]) for name in (moe, engram)}
    if not by[moe] or not by[engram]:
        raise ValueError(f"analysis: need runs of both {moe!r} and {engram!r}")
    lens = {name: _lens(rs) for name, rs in by.items()}
    a, b = lens[engram], lens[moe]
    last = len(a["kl"]) - 1  # the final state: KL 0 by definition, nothing to compare
    lens_diff = [None if i == last else compare(a["kl"][i], a["kl_se"][i], a["df"], b["kl"][i], b["kl_se"][i], b["df"])
                 for i in range(len(a["kl"]))]

    moe_of = {r["seed"]: r for r in by[moe]}
    eng_of = {r["seed"]: r for r in by[engram]}
    seeds = sorted(set(moe_of) & set(eng_of))
    if not seeds:
        raise ValueError("analysis: the MoE and Engram runs share no seed to pair")
    # (rows: MoE of seed s, columns: seed t); one seed: the same-seed pair, and no reference
    pairs = [(s, seeds[(n + 1) % len(seeds)]) for n, s in enumerate(seeds)]
    s_eng = [cka_matrix(moe_of[s]["states"], eng_of[t]["states"]) for s, t in pairs]      # [I, J] each
    align = np.array([soft_alignment(x, top_k) for x in s_eng])                          # [pairs, J]
    s_ref = [cka_matrix(moe_of[s]["states"], moe_of[t]["states"]) for s, t in pairs] if len(seeds) > 1 else []
    ref_align = np.array([soft_alignment(x, top_k) for x in s_ref]) if s_ref else None

    per_state = []
    for j in range(align.shape[1]):
        m, se, _ = mean_se(align[:, j])
        row: dict[str, Any] = {"state": j, "alignment": m, "alignment_se": se, "per_pair": align[:, j].tolist(),
                               "before_engram": first_engram_state is not None and j < first_engram_state}
        if ref_align is not None:
            shift = align[:, j] - ref_align[:, j]                                          # paired: same rows
            sm, sse, sdf = mean_se(shift)
            row.update(reference=float(ref_align[:, j].mean()), shift=compare(sm, sse, sdf, 0.0, 0.0, sdf),
                       shift_per_pair=shift.tolist())
        per_state.append(row)
    return {
        "states": int(align.shape[1]), "top_k": top_k, "seeds": seeds, "first_engram_state": first_engram_state,
        "logit_lens": {"engram": a, "moe": b, "engram_minus_moe": lens_diff},
        "cka": {"pairs": [{"moe_rows": s, "columns_seed": t} for s, t in pairs],
                "engram_vs_moe": np.mean(s_eng, axis=0).tolist(),
                "engram_vs_moe_per_pair": [x.tolist() for x in s_eng],
                "moe_vs_moe": np.mean(s_ref, axis=0).tolist() if s_ref else None,
                "depth_resolution": _resolution(np.mean(s_ref, axis=0)) if s_ref else None,
                "alignment": per_state,
                "note": ("S[i][j]: CKA of MoE state i and Engram state j (state 0: the embedding), over the seed "
                         "pairs; alignment: the paper's soft alignment index of each Engram state over the top-k "
                         "MoE states; reference: the same index of another seed's MoE against the same rows; "
                         "shift: the difference, positive = the Engram state resembles deeper MoE states than "
                         "another MoE's does; the pairs share models, so its interval is approximate")
                if s_ref else "one seed: no MoE-vs-MoE reference, so no alignment verdict"},
    }


def _lens(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's LogitLens curve: mean over seeds, se over seeds (one seed: the se over the
    probe batches, shown but with df 0, so no verdict rests on text sampling alone)."""
    kl = np.array([r["logit_lens"]["kl"] for r in runs])                     # [seeds, states]
    loss = np.array([r["logit_lens"]["loss"] for r in runs])
    if len(runs) > 1:
        cols = [mean_se(kl[:, i]) for i in range(kl.shape[1])]
        over, df = "seeds", cols[0][2]
    else:
        cols = [mean_se(b) for b in runs[0]["logit_lens"]["kl_batches"]]      # per state, its batches
        over, df = "probe batches (one seed: text sampling only, no verdict)", 0
    return {"kl": [c[0] for c in cols], "kl_se": [c[1] for c in cols], "df": df, "se_over": over,
            "loss": loss.mean(axis=0).tolist(), "kl_per_seed": kl.tolist()}


def _resolution(s_ii: np.ndarray) -> dict[str, float]:
    """How well CKA tells depths apart here: between two MoE seeds, the mean CKA of the same
    state (the diagonal) against that of different states. Close together, the alignment index
    has little to read, whatever the models do."""
    n = s_ii.shape[0]
    off = ~np.eye(n, dtype=bool)
    diag, rest = float(np.trace(s_ii) / n), float(s_ii[off].mean())
    return {"same_state": diag, "other_states": rest, "gap": diag - rest}
