"""``bench offload``'s figures from its timings: medians, spreads, breakdown, overheads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .phases import MODES, PARTS

__all__ = ["throughput", "paired_overhead", "per_lookup", "profile_top", "spread"]

#: The overhead pairs quoted: each Engram mode against the backbone alone and the local table.
PAIRS = [(x, ref) for x in ("local", "remote", "remote_lazy") for ref in ("no_engram", "local") if x != ref]


def spread(xs: list[float]) -> dict[str, float]:
    """min / quartiles / max of the repetitions, to judge a median by."""
    q1, q3 = np.percentile(xs, [25, 75])
    return {"min": float(min(xs)), "q1": float(q1), "q3": float(q3), "max": float(max(xs))}


def throughput(times: dict[str, dict[str, list[float]]], parts: dict[str, Any], tokens: dict[str, int],
               repeats: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """Per mode: median tokens/s and spreads, per phase; per ``phase:mode``: where the time
    went; per ``phase:x_vs_ref``: the throughput ``x`` loses against ``ref`` (0.05 = 5 %)."""
    phases = list(tokens)
    res: dict[str, Any] = {}
    for mode in MODES:
        res[mode] = {}
        for ph in phases:
            t = float(np.median(times[mode][ph]))
            res[mode].update({f"{ph}_tokens_per_s": tokens[ph] / t, f"{ph}_s": t,
                              f"{ph}_spread_s": spread(times[mode][ph])})
    breakdown = {}
    for mode in MODES:
        for ph in phases:
            total = float(np.mean(times[mode][ph]))
            b = {k: v / repeats for k, v in parts[mode][ph].items()}
            # the model's forward (and Python around it); off_cpu_s overlaps the parts: not taken
            b["compute_s"] = total - sum(b.get(k, 0.0) for k in PARTS)
            breakdown[f"{ph}:{mode}"] = {"total_s": total, **b}
    overhead = {f"{ph}:{x}_vs_{ref}": 1 - res[x][f"{ph}_tokens_per_s"] / res[ref][f"{ph}_tokens_per_s"]
                for ph in phases for x, ref in PAIRS}
    return res, breakdown, overhead


def paired_overhead(times: dict[str, dict[str, list[float]]], phases: list[str]) -> dict[str, dict[str, float]]:
    """Per ``phase:x_vs_ref``: the throughput ``x`` loses against ``ref`` within each
    repetition (the modes of one repetition run back to back, so a slow minute of the machine
    touches both), and the spread of those losses: a median of ratios with its quartiles says
    how sure a small difference is, which two medians taken apart cannot."""
    out: dict[str, dict[str, float]] = {}
    for ph in phases:
        for x, ref in PAIRS:
            losses = [1 - r / t for t, r in zip(times[x][ph], times[ref][ph])]
            out[f"{ph}:{x}_vs_{ref}"] = {"median": float(np.median(losses)), **spread(losses)}
    return out


def per_lookup(cstats: dict[str, Any] | None, server: list[dict[str, Any]]) -> dict[str, Any]:
    """Client I/O time per lookup, RPCs per lookup and the shards' handler time per RPC."""
    if not cstats:
        return {}
    n_lookups = max(1, cstats["lookups"])
    server_rpcs = sum(d["counters"]["lookups"] for d in server)
    return {"client_io_ms": {k: 1e3 * v / n_lookups for k, v in cstats["io_seconds"].items()},
            "rpcs_per_lookup": server_rpcs / n_lookups,
            # answered on an agent connection's thread (and tries of that which fell back)
            "lookups": cstats["lookups"], "lookups_direct": cstats.get("lookups_direct", 0),
            "lookups_direct_failed": cstats.get("lookups_direct_failed", 0),
            "lookups_streamed": cstats.get("lookups_streamed", 0),
            "server_handler_ms_per_rpc": 1e3 * sum(d["counters"]["lookup_seconds"] for d in server)
            / max(1, server_rpcs)}


def profile_top(fn, top: int = 30, path_of: tuple[str, ...] = ("remote_memory.py", "agent")) -> list[dict[str, Any]]:
    """Run ``fn`` under cProfile (this thread only); the ``top`` functions by own time, then
    every function of the memory path (files matching ``path_of``) by cumulative time, so a
    run shows what the remote modes add to the model's thread (``"path": true`` on those)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    st = pstats.Stats(prof)
    # Stats.stats: {(file, line, name): (calls, ncalls, own, cumulative, callers)}; typeshed omits it
    items = st.stats.items()  # type: ignore[attr-defined]
    rows = sorted(items, key=lambda kv: -kv[1][2])[:top]
    shown = {key for key, _ in rows}
    path = sorted((kv for kv in items if any(p in kv[0][0] for p in path_of) and kv[0] not in shown),
                  key=lambda kv: -kv[1][3])
    return [{"function": f"{Path(f).name}:{line}({name})", "calls": nc, "own_s": tt, "cumulative_s": ct,
             **({"path": True} if i >= len(rows) else {})}
            for i, ((f, line, name), (_, nc, tt, ct, _)) in enumerate(rows + path)]
