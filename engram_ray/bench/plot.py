"""PNG plots of benchmark reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_offload(report: dict[str, Any], path: str | Path) -> None:
    """Grouped bars: tokens/s of each mode, prefill and decode, with overhead vs local."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .offload import MODES

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, phase in zip(axes, ("prefill", "decode")):
        vals = [report["results"][m][f"{phase}_tokens_per_s"] for m in MODES]
        bars = ax.bar(MODES, vals, color=["#999999", "#4c72b0", "#55a868", "#c44e52"])
        for m, b in zip(MODES, bars):
            if m in ("remote", "remote_lazy"):
                o = report["overhead"][f"{phase}:{m}_vs_local"]
                ax.annotate(f"{100 * o:+.1f}% vs local", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{phase} (median of {report['repeats']})")
        ax.set_ylabel("tokens/s")
        ax.tick_params(axis="x", labelrotation=15)
    t = report["table"]
    fig.suptitle(f"Engram table {t['logical_params'] / 1e9:.1f}B params ({t['resident_gib_float32']:.2f} GiB "
                 f"resident) on {t['shards']} shards - {report['device']}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
