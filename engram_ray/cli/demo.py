"""``engram-ray demo`` (the main job) and ``engram-ray train``: train an Engram-MoE whose
Engram table lives in the memory service, on a local Ray or a cluster."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..config import OptimizerConfig, ServiceConfig, StoreConfig, TrainConfig, model_demo, preset
from .common import gib, table_use


def _train(worker: Any, tcfg: TrainConfig) -> tuple[list[dict[str, float]], list[tuple[int, float]], float]:
    """Train in chunks of ``eval_every`` steps with a validation after each; returns every
    step's metrics, ``(step, val_loss)`` from step 0, and the seconds spent training."""
    from tqdm import tqdm

    val = [(0, worker.evaluate())]
    steps: list[dict[str, float]] = []
    bar = tqdm(total=tcfg.steps, desc="training", unit="step")
    t_train = time.perf_counter()
    while len(steps) < tcfg.steps:
        chunk = worker.train(min(tcfg.eval_every, tcfg.steps - len(steps)))
        steps.extend(chunk)
        val.append((len(steps), worker.evaluate()))
        bar.update(len(chunk))
        bar.set_postfix(loss=f"{chunk[-1]['loss']:.2f}", val=f"{val[-1][1]:.2f}")
    bar.close()
    return steps, val, time.perf_counter() - t_train


def _run(args: argparse.Namespace, *, title: str) -> dict[str, Any]:
    from ..data import default_vocab, load_corpus, load_tokenizer
    from ..runtime import deploy, ray_session, start_worker

    t_start = time.perf_counter()
    ecfg, mcfg = preset(args.preset), model_demo()
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       eval_every=args.eval_every, lr=args.lr, table_lr_mult=args.table_lr_mult)
    store = StoreConfig(init_std=0.02, optimizer=OptimizerConfig(kind="adam", lr=args.engram_lr))
    print(title)
    tok = load_tokenizer(args.tokenizer)
    vocab = default_vocab(tok)
    corpus = load_corpus(args.corpus, tok, progress=True)
    cs = corpus.summary()
    print(f"  data       {cs['corpus']}: {cs['train_tokens']:,} train / {cs['val_tokens']:,} val tokens; "
          f"vocabulary {vocab.num_tokens:,} -> {vocab.size:,} compressed ids")
    with ray_session(args.address):
        # a demo's own service may write its checkpoint where the user asked, and nowhere else
        service = ServiceConfig(save_root=str(Path(args.checkpoint).resolve())) if args.checkpoint else ServiceConfig()
        svc = deploy(ecfg, vocab=vocab, num_shards=args.shards, store=store, name=args.name, service=service)
        worker = None
        try:
            lay = svc.layout
            print(f"  service    {args.shards} shards at {', '.join(svc.addresses)}: {lay.total_rows:,} rows x "
                  f"{lay.row_dim} ({lay.num_params / 1e6:.1f} M Engram params, "
                  f"{gib(lay.nbytes('float32'))} + Adam state), {lay.fingerprint}")
            worker = start_worker(args.name, mcfg, ecfg, tcfg, tokenizer=args.tokenizer, corpus=args.corpus)
            winfo = worker.info()
            print(f"  worker     {winfo['device']}, {winfo['threads']} threads: Engram-MoE with "
                  f"{winfo['params'] / 1e6:.1f} M dense params, {mcfg.n_layers} layers, Engram at "
                  f"{list(ecfg.layer_ids)}, {mcfg.n_routed_experts} routed + {mcfg.n_shared_experts} shared experts")
            steps, val, train_s = _train(worker, tcfg)
            sample = worker.generate(args.prompt, args.sample_tokens)
            cstats, shards = worker.stats(), svc.describe()
            if args.checkpoint:
                Path(args.checkpoint).mkdir(parents=True, exist_ok=True)
                svc.save("engram")  # relative to the save root: <checkpoint>/engram
                worker.save(str(Path(args.checkpoint) / "dense.pt"))
        finally:
            if worker is not None:
                worker.shutdown()
            svc.shutdown()
    return _summary(args, steps, val, train_s, time.perf_counter() - t_start, cstats, shards, sample)


def _summary(args: argparse.Namespace, steps: list[dict[str, Any]], val: list[tuple[int, float]], train_s: float,
             total_s: float, cstats: dict[str, Any], shards: list[dict[str, Any]], sample: str) -> dict[str, Any]:
    """The demo's figures (what ``--out`` writes and the summary prints)."""
    tokens = sum(s["tokens"] for s in steps)
    fetch = sum(s["fetch_seconds"] for s in steps)
    wait = sum(s["wait_seconds"] for s in steps)
    first = sum(s["loss"] for s in steps[:10]) / min(10, len(steps))
    last = sum(s["loss"] for s in steps[-10:]) / min(10, len(steps))
    return {
        "steps": len(steps), "tokens": tokens, "train_seconds": train_s,
        "tokens_per_second": tokens / train_s, "total_seconds": total_s,
        "train_loss_first10": first, "train_loss_last10": last,
        "val_loss": [{"step": s, "loss": v} for s, v in val],
        "lookups": cstats["lookups"], "ids_requested": cstats["ids"], "unique_rows_fetched": cstats["unique_ids"],
        "dedup_ratio": cstats["dedup_ratio"], "bytes_received": cstats["bytes_received"],
        "rows_pushed": cstats["rows_pushed"], "lookup_p50_ms": cstats["latency_p50_ms"],
        "lookup_p99_ms": cstats["latency_p99_ms"],
        "fetch_seconds": fetch, "wait_seconds": wait,
        "hidden_fraction": (1 - wait / fetch) if fetch > 0 else None,
        "shards": [{"shard": d["shard_index"], "rows_served": d["counters"]["rows_served"],
                    "rows_updated": d["counters"]["rows_updated"], "bytes_served": d["counters"]["bytes_served"]}
                   for d in shards],
        "table_use": table_use(shards),
        "sample_prompt": args.prompt, "sample": sample,
    }


def _print_summary(r: dict[str, Any]) -> None:
    v0, v1 = r["val_loss"][0]["loss"], r["val_loss"][-1]["loss"]
    print("\nsummary")
    print(f"  loss         val {v0:.3f} -> {v1:.3f}  (train {r['train_loss_first10']:.3f} -> "
          f"{r['train_loss_last10']:.3f});  val by step: "
          + ", ".join(f"{x['step']}:{x['loss']:.2f}" for x in r["val_loss"]))
    print(f"  throughput   {r['tokens']:,} tokens in {r['train_seconds']:.0f} s = "
          f"{r['tokens_per_second']:,.0f} tokens/s (whole run {r['total_seconds']:.0f} s)")
    print(f"  lookups      {r['lookups']:,} calls for {r['ids_requested']:,} row ids -> {r['unique_rows_fetched']:,} "
          f"unique rows fetched (dedup ratio {r['dedup_ratio']:.2f}), {r['bytes_received'] / 2**20:,.1f} MiB received, "
          f"p50 {r['lookup_p50_ms']:.1f} ms / p99 {r['lookup_p99_ms']:.1f} ms")
    print(f"  updates      {r['rows_pushed']:,} row gradients pushed; per shard rows served/updated: "
          + ", ".join(f"#{s['shard']} {s['rows_served']:,}/{s['rows_updated']:,}" for s in r["shards"]))
    if r["hidden_fraction"] is not None:
        print(f"  prefetch     fetch {r['fetch_seconds']:.2f} s in all, waited {r['wait_seconds']:.2f} s: "
              f"{100 * r['hidden_fraction']:.0f} % of the fetch time hidden behind compute")
    if r["table_use"]:
        print("  table use    rows read of each table (HyperLogLog): " + ", ".join(
            f"layer {t['layer']} {t['order']}-grams {100 * t['utilisation']:.1f} %" for t in r["table_use"]))
    print(f"  sample       {r['sample_prompt']!r} -> {r['sample']!r}")


def _cmd(args: argparse.Namespace, title: str) -> int:
    report = _run(args, title=title)
    _print_summary(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _add_args(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--preset", default="demo", help="Engram table preset (default: demo)")
    p.add_argument("--tokenizer", default="gpt2", metavar="gpt2|PATH")
    p.add_argument("--corpus", default="stdlib", metavar="stdlib|shakespeare|PATH",
                   help="training text (default: the CPython standard library)")
    p.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default: {steps})")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=30, help="validation every N steps (default: 30)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the dense weights")
    p.add_argument("--table-lr-mult", type=float, default=5.0,
                   help="the rows' sparse Adam rate as a multiple of --lr, on its warmup and decay (default: 5, "
                        "the paper's); 0: a constant --engram-lr")
    p.add_argument("--engram-lr", type=float, default=1e-2,
                   help="the shards' own rate of the rows, used when --table-lr-mult is 0 (default: 1e-2)")
    p.add_argument("--shards", type=int, default=2, help="memory service shards (default: 2)")
    p.add_argument("--name", default="engram-demo", help="service name (default: engram-demo)")
    p.add_argument("--address", default=None, help="Ray address (default: a local Ray in-process)")
    p.add_argument("--prompt", default="import", help="prompt of the generated sample (default: import)")
    p.add_argument("--sample-tokens", type=int, default=40)
    p.add_argument("--checkpoint", metavar="DIR", help="save the Engram rows (shards) and dense weights here")
    p.add_argument("--out", metavar="FILE.json", help="write the summary figures as JSON")


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job: train an Engram-MoE through the memory service "
                                    "on a local Ray (no cluster, offline, a few minutes of CPU)",
                       description="Start a local Ray, deploy the memory service (2 shards), start a "
                                   "worker, train on the real corpus through the service, show the "
                                   "validation loss fall, generate a sample and summarise.")
    _add_args(p, steps=150)
    p.set_defaults(func=lambda a: _cmd(a, "engram-ray demo: an Engram-MoE trained through a sharded "
                                          "memory service, on a local Ray"))
    p = sub.add_parser("train", help="train an Engram-MoE through the memory service",
                       description="Like demo, with every knob exposed and checkpoints.")
    _add_args(p, steps=1000)
    p.set_defaults(func=lambda a: _cmd(a, "engram-ray train"))
