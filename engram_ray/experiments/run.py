"""Train one arm of an experiment and measure its validation loss (plain torch, no Ray).

Every arm trains on the same tokens in the same order for a seed (the batch sampler's seed),
with the paper's recipe (:class:`~engram_ray.config.TrainConfig`), and is evaluated on the same
held-out batches. The table lives in this process (:class:`~engram_ray.model.LocalMemory`):
at experiment scale it is small, and it gives the same numbers as the memory service (tested
bit for bit), so an arm's loss depends on its configuration and seed only.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..config import OptimizerConfig, TrainConfig
from ..core.layout import TableLayout
from ..data import default_vocab, load_corpus, load_tokenizer
from ..model import LocalMemory
from ..training import Trainer
from .allocation import Arm

__all__ = ["train_arm", "train_model", "run_record", "val_batch_rng"]


def train_model(arm: Arm, *, corpus: str, train: TrainConfig, table_lr: float = 1e-2, threads: int = 1,
                device: str | None = None) -> tuple[Trainer, list[float], float]:
    """Train ``arm`` for ``train.steps`` steps (seed ``train.seed``) on ``corpus``: the trainer
    (its model, memory and data), the training losses and the seconds it took. ``device``:
    None is CUDA where this process sees a GPU (a Ray task given one), else the CPU."""
    torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer("gpt2")
    vocab = default_vocab(tok)
    data = load_corpus(corpus, tok)
    memory = None
    if arm.engram is not None:
        layout = TableLayout.build(arm.engram, vocab)
        # the rows' own rate applies only if the recipe's multiplier is off (table_lr_mult=0)
        memory = LocalMemory(layout, init_std=0.02, init_seed=train.seed,
                             optimizer=OptimizerConfig(kind="adam", lr=table_lr)).to(device)
    t0 = time.perf_counter()
    trainer = Trainer(arm.model, arm.engram, vocab, memory, data.train, data.val, cfg=train, device=device)
    losses = [trainer.train_step()["loss"] for _ in range(train.steps)]
    return trainer, losses, time.perf_counter() - t0


def train_arm(arm: Arm, *, corpus: str, train: TrainConfig, eval_batches: int, table_lr: float = 1e-2,
              threads: int = 1, ablate: bool = False, device: str | None = None) -> dict[str, Any]:
    """Train ``arm`` for ``train.steps`` steps (seed ``train.seed``) on ``corpus``; returns its
    validation loss (mean over ``eval_batches`` fixed batches, with their standard error),
    training loss curve, tokens, FLOPs (6 x activated parameters x tokens) and seconds.
    ``ablate``: also the validation loss with the Engram layers switched off (same batches)."""
    trainer, losses, train_s = train_model(arm, corpus=corpus, train=train, table_lr=table_lr, threads=threads,
                                           device=device)
    return run_record(arm, trainer, losses, train_s, eval_batches, ablate=ablate)


def run_record(arm: Arm, trainer: Trainer, losses: list[float], train_s: float, eval_batches: int,
               ablate: bool = False) -> dict[str, Any]:
    """What every experiment reports of a trained arm (see :func:`train_arm`)."""
    train = trainer.cfg
    val = _val_losses(trainer, eval_batches)
    off = None
    if ablate and arm.engram is not None:
        trainer.model.set_engram(False)
        off = float(_val_losses(trainer, eval_batches).mean())
        trainer.model.set_engram(True)
    tokens = train.steps * train.batch_size * train.seq_len
    return {"arm": arm.name, "seed": train.seed, "val_loss": float(val.mean()), "val_loss_engram_off": off,
            "val_loss_se": float(val.std(ddof=1) / np.sqrt(val.size)) if val.size > 1 else None,
            "val_batches": int(val.size), "train_loss_last10": float(np.mean(losses[-10:])),
            "train_loss": [float(x) for x in losses], "tokens": tokens,
            "flops": 6.0 * arm.params.activated * tokens, "train_seconds": train_s, "device": str(trainer.device)}


def val_batch_rng(i: int) -> np.random.Generator:
    """The generator of fixed validation batch ``i``: the same held-out text for every arm."""
    return np.random.default_rng(10_000 + i)


def _val_losses(trainer: Trainer, batches: int) -> np.ndarray:
    """The loss of each of ``batches`` fixed validation batches (the same for every arm)."""
    out = []
    for i in range(batches):
        out.append(trainer.evaluate_batch(val_batch_rng(i)))
    return np.array(out)
