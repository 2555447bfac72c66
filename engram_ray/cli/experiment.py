"""``engram-ray experiment ...``: the paper's experiments as commands that fan out over Ray."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import numpy as np

from ..bench.common import write_report
from ..config import MODEL_PRESETS, PRESETS
from ..experiments.stats import compare, interval_text, mean_se

__all__ = ["register", "summarise", "ablation", "setup_sweep", "run_sweep", "add_sweep_args", "paper_scale", "scale"]


def summarise(arms: list[Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm: its seeds' validation losses, their mean and standard error (over seeds when
    there are several, else over the fixed evaluation batches), and its difference from the
    first arm (the pure MoE) with the combined standard error and its 95 % interval (Student's t
    with the fewer arm's degrees of freedom: with 2 seeds, t = 12.7), and whether the
    difference lies outside it."""
    out = []
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm.name]
        losses = np.array([r["val_loss"] for r in mine])
        if losses.size > 1:
            _, se, df = mean_se(losses)
            over = "seeds"
        else:
            se, over, df = float(mine[0]["val_loss_se"] or 0.0), "evaluation batches", mine[0]["val_batches"] - 1
        out.append({"arm": arm.name, "routed_experts": arm.routed_experts, "rho": arm.params.rho,
                    "params": arm.params.to_dict(), "val_losses": losses.tolist(), "val_loss": float(losses.mean()),
                    "val_loss_se": se, "se_over": over, "df": int(df), "tokens": mine[0]["tokens"],
                    "flops": mine[0]["flops"], "train_seconds": [r["train_seconds"] for r in mine]})
    ref = out[0]
    for a in out:
        a["vs_moe"] = compare(a["val_loss"], a["val_loss_se"], a["df"], ref["val_loss"], ref["val_loss_se"], ref["df"])
    return out


def setup_sweep(args: argparse.Namespace, experts: list[int]) -> tuple[list[Any], Any]:
    """The arms (pure MoE first, then one per expert count) and the training config of a sweep."""
    from ..config import TrainConfig, model_preset, preset
    from ..data import load_tokenizer
    from ..experiments.allocation import allocation_arms

    _check_sweep(args)
    vocab_size = load_tokenizer("gpt2").get_vocab_size(with_added_tokens=True)  # what the runs train on
    model = dataclasses.replace(model_preset(args.model), n_routed_experts=args.routed_experts, top_k=args.top_k,
                                n_layers=args.layers, max_seq_len=max(args.seq_len, 16), vocab_size=vocab_size)
    engram = dataclasses.replace(preset(args.preset), layer_ids=tuple(args.engram_layers))
    arms = allocation_arms(model, engram, experts)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                        warmup_steps=min(20, max(1, args.steps // 10)), eval_every=args.steps)
    return arms, train


def paper_scale() -> dict[str, Any]:
    """The scale of the paper's main pair (MoE-27B and Engram-27B, its Table 1), to set ours against."""
    total, activated, tokens = 26.7e9, 3.8e9, 262e9
    return {"model": "Engram-27B / MoE-27B", "total_params": total, "activated_params": activated,
            "tokens": tokens, "flops": 6.0 * activated * tokens}


def scale(total: int, activated: int, tokens: int, flops: float) -> dict[str, Any]:
    """A run's scale, and its ratio to the paper's (:func:`paper_scale`)."""
    paper = paper_scale()
    ratio = {"total_params": total / paper["total_params"], "tokens": tokens / paper["tokens"],
             "flops": flops / paper["flops"]}
    return {"total_params": total, "activated_params": activated, "tokens_per_run": tokens, "flops_per_run": flops,
            "paper": paper, "vs_paper": ratio,
            "note": f"{ratio['total_params']:.0e} of the paper's parameters, {ratio['tokens']:.0e} of its tokens, "
                    f"{ratio['flops']:.0e} of its training FLOPs: a difference that does not exceed its noise "
                    "here is a finding, not a failure"}


def _check_sweep(args: argparse.Namespace) -> None:
    """The flags every sweep shares, checked before Ray starts, by the flag's name."""
    from ..data import check_corpus

    for flag, v in (("--layers", args.layers), ("--steps", args.steps), ("--batch-size", args.batch_size),
                    ("--seq-len", args.seq_len), ("--eval-batches", args.eval_batches)):
        if v < 1:
            raise ValueError(f"{flag} {v}: expected >= 1")
    bad = [b for b in args.engram_layers if not 0 <= b < args.layers]
    if bad:
        raise ValueError(f"--engram-layers {' '.join(map(str, args.engram_layers))}: expected block indices "
                         f"0..{args.layers - 1} (0-based, below --layers {args.layers})")
    if args.gpus_per_run is not None and args.gpus_per_run < 0:
        raise ValueError(f"--gpus-per-run {args.gpus_per_run}: expected >= 0")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds {' '.join(map(str, args.seeds))}: expected distinct seeds")
    check_corpus(args.corpus)  # a bad name or path is refused here, not inside a Ray task


def run_sweep(args: argparse.Namespace, name: str, arms: list[Any], train: Any, fn: Any = None,
              **task_args: Any) -> dict[str, Any]:
    """Train every arm and seed on Ray (each task ``fn``, default train_arm, with ``task_args``);
    the report with its summary (printed, not written)."""
    from ..experiments.run import train_arm
    from ..runtime import ray_session
    from ..runtime.experiments import run_arms

    fn = fn or train_arm

    print(f"{name}: {len(arms)} arms x {len(args.seeds)} seeds, {args.steps} steps of "
          f"{args.batch_size} x {args.seq_len} tokens on {args.corpus}")
    for a in arms:
        p = a.params
        print(f"  {a.name:<5} {a.routed_experts} routed experts, table {p.table:>12,} params: total "
              f"{p.total:,}, activated {p.activated:,}, rho {p.rho:.3f}")
    t0 = time.perf_counter()
    with ray_session(args.address):
        runs = run_arms(arms, args.seeds, train=train, gpus_per_run=args.gpus_per_run, progress=True, fn=fn,
                        corpus=args.corpus, eval_batches=args.eval_batches, **task_args)
    rows = summarise(arms, runs)
    report = {"experiment": name, "corpus": args.corpus, "seeds": args.seeds, "train": train.to_dict(),
              "eval_batches": args.eval_batches, "wall_s": time.perf_counter() - t0,
              "arms": [a.to_dict() for a in arms], "runs": runs,
              "summary": rows,
              "scale": scale(arms[0].params.total, arms[0].params.activated, rows[0]["tokens"], rows[0]["flops"])}
    print(f"  scale: {report['scale']['note']}")
    print(f"  {'arm':<5} {'rho':>6} {'val loss':>9} {'+-se':>7}  vs MoE, +- its 95 % interval")
    for r in rows:
        v = r["vs_moe"]
        verdict = "" if r is rows[0] else interval_text(v)
        print(f"  {r['arm']:<5} {r['rho']:>6.3f} {r['val_loss']:>9.4f} {r['val_loss_se']:>7.4f}  {verdict}")
    return report


def _cmd_allocation(args: argparse.Namespace) -> int:
    arms, train = setup_sweep(args, args.experts)
    report = run_sweep(args, "allocation", arms, train)
    write_report(report, args.out)
    if args.out:
        from ..bench.plot import plot_allocation
        from .bench import _plot_beside
        _plot_beside(args.out, lambda png: plot_allocation(report, png))
    return 0


def ablation(runs: list[dict[str, Any]], moe: str, engram: str) -> dict[str, Any]:
    """The §6.3 ablation of an iso pair: per seed, the Engram model's loss with its Engram layers
    off, and the share of its gain over the MoE that remains (1: all of it; 0: none; below 0:
    worse than the MoE without Engram)."""
    per_seed = []
    for r in runs:
        if r["arm"] != engram or r.get("val_loss_engram_off") is None:
            continue
        ref = next(x for x in runs if x["arm"] == moe and x["seed"] == r["seed"])
        gain = ref["val_loss"] - r["val_loss"]
        per_seed.append({"seed": r["seed"], "moe": ref["val_loss"], "engram": r["val_loss"],
                         "engram_off": r["val_loss_engram_off"], "gain": gain,
                         "gain_remaining": (ref["val_loss"] - r["val_loss_engram_off"]) / gain if gain else None})
    off = [p["engram_off"] for p in per_seed]
    return {"per_seed": per_seed, "engram_off_val_loss": float(np.mean(off)) if off else None}


def _cmd_iso(args: argparse.Namespace) -> int:
    arms, train = setup_sweep(args, [args.experts])
    report = run_sweep(args, "iso", arms, train, ablate=True)
    report["ablation"] = ablation(report["runs"], arms[0].name, arms[1].name)
    write_report(report, args.out)
    ab = report["ablation"]
    print(f"  Engram off at inference (§6.3): val loss {ab['engram_off_val_loss']:.4f}; share of the gain that "
          "remains per seed: " + ", ".join("-" if p["gain_remaining"] is None else f"{p['gain_remaining']:+.2f}"
                                           for p in ab["per_seed"]))
    return 0


def add_sweep_args(a: argparse.ArgumentParser, layers: int = 4, engram_layers: tuple[int, ...] = (1, 3),
                   out: str = "write the report here") -> None:
    """What every experiment's arms and runs are made of (defaults: ``layers`` blocks with
    Engram layers at ``engram_layers``; ``out``: what --out writes)."""
    a.add_argument("--model", default="demo", choices=sorted(MODEL_PRESETS), help="backbone preset (default: demo)")
    a.add_argument("--layers", type=int, default=layers, help=f"backbone layers (default: {layers})")
    a.add_argument("--routed-experts", type=int, default=8, help="routed experts of the pure MoE (default: 8)")
    a.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    a.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="the table's shape: orders, heads, row width; its row count is set so that the table "
                        "takes the removed experts' parameters (default: demo)")
    a.add_argument("--engram-layers", type=int, nargs="+", default=list(engram_layers),
                   help=f"blocks with an Engram layer, 0-based, below --layers (default: "
                        f"{' '.join(map(str, engram_layers))})")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds (default: 0 1 2; two give 1 degree of freedom, t = 12.7)")
    a.add_argument("--steps", type=int, default=100, help="training steps per run (default: 100)")
    a.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    a.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    a.add_argument("--lr", type=float, default=3e-3,
                   help="backbone AdamW peak rate (rows: 5x, the recipe; default: 0.003)")
    a.add_argument("--eval-batches", type=int, default=8, help="fixed validation batches (default: 8)")
    a.add_argument("--corpus", default="stdlib", help="training text (default: stdlib)")
    a.add_argument("--gpus-per-run", type=float, default=None,
                   help="GPUs per Ray task (default: 1 where the cluster has GPUs, else 0)")
    a.add_argument("--address", default=None, help="Ray address (default: a local Ray in-process)")
    a.add_argument("--out", metavar="FILE.json", help=out)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="the paper's experiments, fanned out over Ray: allocation, iso",
                       description="Experiments of the Engram paper, each arm and seed a Ray task.")
    esub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    a = esub.add_parser("allocation", help="val loss against rho: a fixed parameter budget split between "
                                           "routed experts and Engram memory",
                        description="Build arms from a MoE backbone by removing routed experts (top-k held, so "
                                    "activated compute is fixed) and giving their parameters to an Engram table; "
                                    "train each on the same tokens and seeds; report val loss against rho.")
    add_sweep_args(a, out="write the report here, and the loss-against-rho plot as FILE.png")
    a.add_argument("--experts", type=int, nargs="+", default=[6, 4, 2],
                   help="routed experts of the Engram arms (default: 6 4 2)")
    a.set_defaults(func=_cmd_allocation)
    b = esub.add_parser("iso", help="one iso-parameter pair, MoE vs Engram-MoE, and the ablation with Engram "
                                    "off at inference",
                        description="The pure MoE against the same budget with --experts routed experts and an "
                                    "Engram table; the loss gap with its interval, and the Engram model evaluated "
                                    "with its Engram layers off (the paper's section 6.3).")
    add_sweep_args(b)
    b.add_argument("--experts", type=int, default=6, help="routed experts of the Engram model (default: 6)")
    b.set_defaults(func=_cmd_iso)
