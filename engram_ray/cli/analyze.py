"""``engram-ray analyze``: LogitLens and CKA of an Engram model against the MoE of the same
parameter budget (the paper's section 6.2), each model and seed a Ray task."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..bench.common import write_report
from ..experiments.stats import interval_text
from .experiment import add_sweep_args, run_sweep, setup_sweep

__all__ = ["register"]


def _cmd_analyze(args: argparse.Namespace) -> int:
    from ..experiments.analysis import summarise_analysis
    from ..experiments.lens import probe_arm

    arms, train = setup_sweep(args, [args.experts])  # the shared flags first, by name
    _check(args)
    report = run_sweep(args, "analyze", arms, train, fn=probe_arm, probe_batches=args.probe_batches,
                       cka_tokens=args.cka_tokens)
    moe, eng = arms[0].name, arms[1].name
    first = min(args.engram_layers) + 1  # block b's Engram layer first shows in state b + 1
    report["analysis"] = summarise_analysis(report["runs"], moe, eng, args.align_top_k, first_engram_state=first)
    for r in report["runs"]:
        r.pop("states")  # a few MB of floats: compared above, not kept
    report["probe"] = {"batches": args.probe_batches, "cka_tokens": args.cka_tokens,
                       "lens_tokens": report["runs"][0]["logit_lens"]["tokens"]}
    _print(report["analysis"], moe, eng)
    write_report(report, args.out)
    if args.out:
        from ..bench.plot import plot_cka, plot_logit_lens
        stem = Path(args.out).with_suffix("")
        lens_png, cka_png = Path(f"{stem}_logit_lens.png"), Path(f"{stem}_cka.png")
        plot_logit_lens(report, lens_png)
        plot_cka(report, cka_png)
        print(f"wrote {args.out}, {lens_png} and {cka_png}")
    return 0


def _check(args: argparse.Namespace) -> None:
    """Refuse what would fail after training, before anything starts."""
    if not 1 <= args.probe_batches <= args.eval_batches:
        raise ValueError(f"--probe-batches {args.probe_batches}: expected 1..--eval-batches {args.eval_batches} "
                         "(the probes read the first of the fixed validation batches)")
    tokens = args.probe_batches * args.batch_size * args.seq_len
    if not 2 <= args.cka_tokens <= tokens:
        raise ValueError(f"--cka-tokens {args.cka_tokens}: expected 2..{tokens}, the probe tokens (--probe-batches "
                         f"{args.probe_batches} x --batch-size {args.batch_size} x --seq-len {args.seq_len})")
    if not 1 <= args.align_top_k <= args.layers + 1:
        raise ValueError(f"--align-top-k {args.align_top_k}: expected 1..{args.layers + 1} (the states: the "
                         f"embedding and {args.layers} layers; a third of them or fewer reads alignment best)")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds {' '.join(map(str, args.seeds))}: a seed twice trains the same model twice")


def _print(a: dict[str, Any], moe: str, eng: str) -> None:
    lens = a["logit_lens"]
    print(f"  LogitLens: KL(final || state) per state (0: embedding, i: after i blocks), {moe} vs {eng} "
          f"(se over {lens['engram']['se_over']}):")
    for i, d in enumerate(lens["engram_minus_moe"]):
        diff = "(the final state: 0 by definition)" if d is None else f"Engram - MoE {interval_text(d, 3)}"
        print(f"    state {i}: {lens['moe']['kl'][i]:7.3f}  {lens['engram']['kl'][i]:7.3f}   {diff}")
    print(f"  CKA soft alignment (top-{a['top_k']}) of each Engram state over the MoE states, against another "
          "seed's MoE:")
    for row in a["cka"]["alignment"]:
        ref = "" if "shift" not in row else (f"   MoE-vs-MoE {row['reference']:.2f}, shift "
                                             f"{interval_text(row['shift'], 2)}")
        mark = "  (before the first Engram layer)" if row["before_engram"] else ""
        print(f"    state {row['state']}: {row['alignment']:.2f}{ref}{mark}")
    res = a["cka"]["depth_resolution"]
    if res is not None:
        print(f"  CKA's depth resolution here (two MoE seeds): same state {res['same_state']:.3f}, other states "
              f"{res['other_states']:.3f} (gap {res['gap']:+.3f}; near 0, the alignment index has little to read)")
    if "shift" not in a["cka"]["alignment"][0]:
        print("    (one seed: no MoE-vs-MoE reference; run two or more seeds for a verdict)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="LogitLens and CKA: an Engram model against the MoE of the same budget",
                       description="Train an iso pair as `engram-ray experiment iso` does (the pure MoE and the "
                                   "same budget with --experts routed experts and an Engram table; 8 layers by "
                                   "default, so that there are layers to compare) on Ray, then "
                                   "probe both on held-out text at every state (0: the embedding, i: the residual "
                                   "stream after i blocks): LogitLens (the KL divergence of the state's readout to "
                                   "the final output distribution) and linear CKA between every state of the "
                                   "Engram model and every state of the MoE, with the paper's soft alignment index "
                                   "read against a MoE-vs-MoE reference of another seed. With --out FILE.json it "
                                   "also draws FILE_logit_lens.png and FILE_cka.png.")
    # deeper than the other experiments' default: layer-wise findings need layers to compare
    add_sweep_args(p, layers=8, engram_layers=(1, 4),
                   out="write the report here, and the two plots as FILE_logit_lens.png and FILE_cka.png")
    p.add_argument("--experts", type=int, default=6, help="routed experts of the Engram model (default: 6)")
    p.add_argument("--probe-batches", type=int, default=2,
                   help="validation batches the probes read (the first of the fixed ones; default: 2)")
    p.add_argument("--cka-tokens", type=int, default=2048,
                   help="held-out tokens whose states CKA compares (default: 2048)")
    p.add_argument("--align-top-k", type=int, default=3,
                   help="MoE states each alignment index weighs (the paper: 5 of ~30 layers; at most a third "
                        "of the states reads alignment best; default: 3)")
    p.set_defaults(func=_cmd_analyze)
