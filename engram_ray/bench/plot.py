"""PNG plots of benchmark reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_offload(report: dict[str, Any], path: str | Path) -> None:
    """Grouped bars: tokens/s of each mode per phase (prefill, decode, serving), whiskers from
    the fastest and slowest repetition, the remote modes' overhead vs local written in."""
    plt = _pyplot()

    from .phases import MODES

    phases = report.get("phases", ["prefill", "decode"])  # reports from before serving had two
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 4))
    for ax, phase in zip(axes, phases):
        res = report["results"]
        vals = [res[m][f"{phase}_tokens_per_s"] for m in MODES]
        # whiskers: the fastest and slowest repetition (tokens/s from max and min seconds)
        toks = [v * res[m][f"{phase}_s"] for m, v in zip(MODES, vals)]
        err = None
        if all(f"{phase}_spread_s" in res[m] for m in MODES):
            err = [[v - n / res[m][f"{phase}_spread_s"]["max"] for m, v, n in zip(MODES, vals, toks)],
                   [n / res[m][f"{phase}_spread_s"]["min"] - v for m, v, n in zip(MODES, vals, toks)]]
        bars = ax.bar(MODES, vals, yerr=err, capsize=3, color=["#999999", "#4c72b0", "#55a868", "#c44e52"])
        for m, b in zip(MODES, bars):
            if m in ("remote", "remote_lazy"):
                o = report["overhead"][f"{phase}:{m}_vs_local"]
                ax.annotate(f"{100 * o:+.1f}%\nvs local", (b.get_x() + b.get_width() / 2, b.get_height() / 2),
                            ha="center", va="center", fontsize=8, color="white")
        ax.set_title(f"{phase} (median of {report['repeats']}; whiskers min-max)", fontsize=10)
        ax.set_ylabel("tokens/s")
        ax.tick_params(axis="x", labelrotation=15)
    t = report["table"]
    iso = report.get("isolation") or {}
    cores = (f"model on cores {iso['compute_cores']}, memory side on {iso['memory_cores']}"
             if iso.get("enabled") else "cores shared")
    fig.suptitle(f"Engram table {t['logical_params'] / 1e9:.1f}B params ({t['resident_gib_float32']:.2f} GiB "
                 f"resident) on {t['shards']} shards - {report['device']}, {cores}", fontsize=10)
    _save(fig, path)


def plot_latency(report: dict[str, Any], path: str | Path) -> None:
    """p50/p99 lookup latency against resident table size (log x)."""
    plt = _pyplot()

    r = report["results"]
    x = [v["resident_gib"] for v in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [v["p50_ms"] for v in r], "o-", label="p50")
    ax.plot(x, [v["p99_ms"] for v in r], "s--", label="p99")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("resident table size (GiB, float32)")
    ax.set_ylabel(f"lookup of {report['batch_rows']:,} rows (ms)")
    ax.set_title(f"Lookup latency vs table size ({report['shards']} shards)", fontsize=10)
    ax.legend()
    _save(fig, path)


def plot_latency_mapped(report: dict[str, Any], path: str | Path) -> None:
    """The mmap series: warm and cold p50/p99 gather latency against the table's size."""
    plt = _pyplot()

    r = report["results"]
    x = [v["table_gib"] for v in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("warm", "-"), ("cold", "--")):
        ax.plot(x, [v[f"{kind}_p50_ms"] for v in r], "o" + style, label=f"{kind} p50")
        ax.plot(x, [v[f"{kind}_p99_ms"] for v in r], "s" + style, label=f"{kind} p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("table size on disk (GiB, float32)")
    ax.set_ylabel(f"gather of {report['batch_rows']:,} rows (ms)")
    ax.set_title("Memory-mapped shard: pages in the page cache (warm) or on disk (cold)", fontsize=10)
    ax.legend()
    _save(fig, path)


def plot_rates(report: dict[str, Any], path: str | Path, *, x: str, series: dict[str, str],
               xlabel: str, ylabel: str, title: str, group: str | None = None) -> None:
    """Lines of ``series`` (result key -> label) against result key ``x``, one per ``group``."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = sorted({r[group] for r in report["results"]}) if group else [None]
    for g in groups:
        rows = [r for r in report["results"] if group is None or r[group] == g]
        for key, label in series.items():
            name = f"{label} ({group} {g})" if group else label
            ax.plot([r[x] for r in rows], [r[key] for r in rows], "o-", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_load(report: dict[str, Any], path: str | Path) -> None:
    """RSS of the client and of each shard against lookups done (flat = no leak)."""
    plt = _pyplot()

    xs = [s["lookups"] for s in report["samples"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [s["client_rss"] / 2**20 for s in report["samples"]], label="client")
    for i in range(len(report["samples"][0]["shard_rss"])):
        ax.plot(xs, [s["shard_rss"][i] / 2**20 for s in report["samples"]], label=f"shard {i}")
    ax.set_xlabel("lookups done")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(f"{report['lookups']:,} lookups x {report['batch']} ids at concurrency "
                 f"{report['concurrency']}: {report['errors']} errors", fontsize=10)
    _save(fig, path)


def plot_cache(report: dict[str, Any], path: str | Path) -> None:
    """Hit rate against cache size (share of the table, log x), one panel per layout, a line
    per corpus and policy, and each stream's ceiling (its repeat reads) dotted."""
    plt = _pyplot()

    presets = sorted({r["preset"] for r in report["runs"]})
    fig, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 4), squeeze=False)
    styles = {"lru": "--", "tinylfu": "-"}
    for ax, preset in zip(axes[0], presets):
        for i, r in enumerate(x for x in report["runs"] if x["preset"] == preset):
            color = f"C{i}"
            for policy, style in styles.items():
                pts = [c for c in r["curves"] if c["policy"] == policy]
                if pts:
                    ax.plot([100 * c["share"] for c in pts], [100 * c["hit_rate"] for c in pts], "o" + style,
                            color=color, label=f"{r['corpus']} {policy} (Zipf s={r['zipf_exponent']:.2f})")
            ax.axhline(100 * r["hit_rate_ceiling"], color=color, linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_ylim(0, 100)
        ax.set_xlabel("cache size (% of the table's rows)")
        ax.set_ylabel("lookups served from the cache (%)")
        rows = next(r["table_rows"] for r in report["runs"] if r["preset"] == preset)
        ax.set_title(f"{preset}: {rows:,} rows (dotted: repeat-read ceiling)", fontsize=9)
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_allocation(report: dict[str, Any], path: str | Path) -> None:
    """Validation loss against rho (the paper's allocation plot), error bars of one standard
    error, each seed's loss as a dot."""
    plt = _pyplot()

    rows = report["summary"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter([r["rho"]] * len(r["val_losses"]), r["val_losses"], s=12, color="#999999", zorder=2)
    ax.errorbar([r["rho"] for r in rows], [r["val_loss"] for r in rows], yerr=[r["val_loss_se"] for r in rows],
                fmt="o-", capsize=3, zorder=3)
    for r in rows:
        ax.annotate(r["arm"], (r["rho"], r["val_loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("rho: share of the sparse parameters in routed experts (1 = pure MoE)")
    ax.set_ylabel("validation loss")
    s = report["scale"]
    ax.set_title(f"Sparsity allocation: {s['total_params'] / 1e6:.1f}M params, {s['tokens_per_run']:,} tokens "
                 f"per run, {len(report['seeds'])} seeds (bars: 1 se)", fontsize=9)
    _save(fig, path)


def plot_logit_lens(report: dict[str, Any], path: str | Path) -> None:
    """LogitLens (``engram-ray analyze``): per state, the KL of its readout to the final output
    distribution (left) and its own next-token loss (right), MoE against Engram-MoE; bars: one
    standard error, thin lines: each seed."""
    plt = _pyplot()

    a = report["analysis"]["logit_lens"]
    moe, eng = report["arms"][0], report["arms"][1]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, color in (("moe", f"MoE ({moe['routed_experts']} routed experts)", "#1f77b4"),
                              ("engram", f"Engram-MoE ({eng['routed_experts']} + table)", "#d62728")):
        m = a[key]
        xs = list(range(len(m["kl"])))
        for seed_kl in m["kl_per_seed"]:
            ax.plot(xs, seed_kl, color=color, alpha=0.3, linewidth=0.8)
        ax.errorbar(xs, m["kl"], yerr=m["kl_se"], fmt="o-", color=color, capsize=3, label=label)
        bx.plot(xs, m["loss"], "o-", color=color, label=label)
    for x in (ax, bx):
        for b in eng["engram"]["layer_ids"]:  # block b's Engram layer first shows in state b + 1
            x.axvline(b + 1, color="#999999", linestyle=":", linewidth=1)
        x.set_xticks(xs)
        x.set_xlabel("state (0: embedding, i: after i blocks)")
        x.legend(fontsize=8)
    ax.set_ylabel("KL(final || LogitLens readout), nats")
    over = "seeds" if a["engram"]["df"] else "probe batches"
    ax.set_yscale("symlog", linthresh=0.01)  # state 0's KL (~nats) would flatten the rest
    ax.set_ylim(bottom=0.0)
    ax.set_title("LogitLens: distance to the final distribution\n"
                 f"(bars: 1 se over {over}; dotted: first state after an Engram layer)", fontsize=9)
    bx.set_ylabel("next-token loss of the state's readout")
    bx.set_title("LogitLens: each state's own loss\n(mean over seeds)", fontsize=9)
    _save(fig, path)


def plot_cka(report: dict[str, Any], path: str | Path) -> None:
    """CKA (``engram-ray analyze``): the heatmap of CKA(MoE state i, Engram state j) with each
    Engram state's soft alignment index (dots) against the MoE-vs-MoE reference (crosses) and
    the diagonal; beside it, the reference's own heatmap (two MoE seeds)."""
    plt = _pyplot()
    import numpy as np

    c = report["analysis"]["cka"]
    panels = [("Engram-MoE (columns) vs MoE (rows), mean over seed pairs", c["engram_vs_moe"])]
    if c["moe_vs_moe"] is not None:
        panels.append(("reference: MoE of the next seed (columns) vs MoE (rows)", c["moe_vs_moe"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    align = c["alignment"]
    for ax, (title, s) in zip(axes[0], panels):
        s = np.asarray(s)
        im = ax.imshow(s, origin="lower", vmin=0.0, vmax=1.0, cmap="viridis")
        ax.plot([0, s.shape[1] - 1], [0, s.shape[0] - 1], color="white", linestyle=":", linewidth=1)
        ax.set_xticks(range(s.shape[1]))
        ax.set_yticks(range(s.shape[0]))
        ax.set_xlabel("state j of the compared model (j: after j blocks)")
        ax.set_ylabel("state i of the MoE")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="linear CKA")
    ax = axes[0][0]
    ax.plot([r["state"] for r in align], [r["alignment"] for r in align], "o", color="#ff7f0e",
            label=f"alignment index (top-{report['analysis']['top_k']})")
    if "reference" in align[0]:
        ax.plot([r["state"] for r in align], [r["reference"] for r in align], "x", color="white",
                label="MoE-vs-MoE reference")
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)


def plot_interference(report: dict[str, Any], path: str | Path) -> None:
    """Slowdown of the compute cores' forward per load on the memory cores (bars: median over
    rounds; dots: each round, against that round's idle run)."""
    plt = _pyplot()

    res = report["results"]
    kinds = [k for k in res if k != "idle"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.bar(kinds, [100 * res[k]["slowdown"] for k in kinds], color="#1f77b4", alpha=0.7)
    for i, k in enumerate(kinds):
        pts = res[k]["slowdown_per_round"]
        ax.scatter([i] * len(pts), [100 * x for x in pts], s=10, color="#333333", zorder=3)
    ax.axhline(0, color="#999999", linewidth=0.8)
    ax.set_ylabel("forward slower than its round's idle run (%)")
    iso = report["isolation"]
    ax.set_title(f"Compute on cores {iso['compute_cores']}, one load process per memory core "
                 f"{iso['memory_cores']}", fontsize=9)
    _save(fig, path)
