"""The children of ``scripts/gpu_check.py`` that need torch and engram_ray: the environment
report and the training run through the standalone shards. Each prints or writes JSON.
Neither imports Ray (on the GPU machine there is none)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def environment() -> dict:
    """torch and CUDA as this interpreter sees them, and the versions of what the service uses."""
    import importlib.util

    import google.protobuf
    import grpc
    import numpy
    import torch

    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                  "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__,
                  "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                  "ray_importable": importlib.util.find_spec("ray") is not None, "cpus": torch.get_num_threads()}
    from engram_ray.bench.isolation import smt_siblings  # stdlib only
    groups = {tuple(g) for g in smt_siblings(sorted(os.sched_getaffinity(0))).values()}
    info["physical_cores"] = sorted(list(g) for g in groups)  # hardware threads per physical core
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=list(torch.cuda.get_device_capability(0)),
                    memory_gib=round(props.total_memory / 2**30, 2), multiprocessors=props.multi_processor_count,
                    devices=torch.cuda.device_count())
    return info


def remote_memory_class():
    """``RemoteMemory`` from its Ray-free home, or (an older tree) from ``engram_ray.runtime``."""
    try:
        from engram_ray.remote_memory import RemoteMemory
    except ImportError:  # before the move: needs Ray, so this step then fails and says why
        from engram_ray.runtime.remote_memory import RemoteMemory  # type: ignore[no-redef]
    return RemoteMemory


def _configs(preset: str, model: str):
    from engram_ray import config as C

    ecfg = C.preset(preset)
    if model == "demo":
        return ecfg, C.model_demo()
    # tiny: the demo's backbone shrunk to a CPU dry run's size (still GPT-2's vocabulary)
    return ecfg, dataclasses.replace(C.model_demo(), dim=32, n_layers=3, n_heads=2, ffn_dim=64, max_seq_len=64)


def train(args: argparse.Namespace) -> dict:
    """``args.steps`` optimiser steps of the demo model on ``args.device``, its Engram rows
    served by the shards at ``args.addresses``; the loss before and after, tokens/s, and how
    long the model waited for rows."""
    import torch

    from engram_ray.client import EngramClient
    from engram_ray.config import TrainConfig
    from engram_ray.core.layout import TableLayout
    from engram_ray.data import default_vocab, load_corpus, load_tokenizer
    from engram_ray.training import Trainer

    t_start = time.perf_counter()
    ecfg, mcfg = _configs(args.preset, args.model)
    tok = load_tokenizer("gpt2")
    vocab = default_vocab(tok)
    layout = TableLayout.build(ecfg, vocab)
    corpus = load_corpus(REPO / "engram_ray", tok)  # the package's own source: small, always there
    seq = min(128, mcfg.max_seq_len)
    tcfg = TrainConfig(steps=args.steps, batch_size=8, seq_len=seq, warmup_steps=2, eval_batches=2)
    from engram_ray.rpc.wire import read_token_file

    token = read_token_file(args.token_file)
    with EngramClient(args.addresses.split(","), layout, token=token) as client:
        memory = remote_memory_class()(client, device=args.device)
        trainer = Trainer(mcfg, ecfg, vocab, memory, corpus.train, corpus.val, tcfg, device=args.device)
        val_before = trainer.evaluate()
        t0 = time.perf_counter()
        steps = [trainer.train_step() for _ in range(args.steps)]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        val_after = trainer.evaluate()
        stats = client.stats()
    tokens = sum(s["tokens"] for s in steps)
    return {"device": args.device, "preset": args.preset, "model": dataclasses.asdict(mcfg),
            "steps": len(steps), "tokens": tokens, "train_seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1),
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
            "val_loss_before": val_before, "val_loss_after": val_after,
            "fetch_seconds": sum(s["fetch_seconds"] for s in steps),
            "fetch_wait_seconds": sum(s["wait_seconds"] for s in steps),
            "step_seconds_median": sorted(s["seconds"] for s in steps)[len(steps) // 2],
            "lookups": stats.get("lookups"), "rows_pushed": stats.get("rows_pushed"),
            "remote_memory": remote_memory_class().__module__,
            "total_seconds": round(time.perf_counter() - t_start, 2)}


def run_step(step: str, argv: list[str]) -> int:
    if step == "env":
        print(json.dumps(environment()))
        return 0
    p = argparse.ArgumentParser(prog="gpu_check.py --step train")
    p.add_argument("--addresses", required=True)
    p.add_argument("--token-file", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="demo")
    p.add_argument("--model", default="demo", choices=["demo", "tiny"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    result = train(args)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens_per_second", "loss_first", "loss_last")}))
    return 0
