"""Probe a trained model's layers on held-out text: LogitLens and the states CKA compares.

A state is the residual stream between blocks, summed over the hyper-connection streams (what
the output head reads): ``[B, T, n, D] -> [B, T, D]``. State 0 is the embedding (the input of
block 0), state ``i`` the stream after ``i`` blocks (the output of block ``i - 1``), state ``L``
the last block's output; an Engram layer in block ``b`` first shows in state ``b + 1``.
LogitLens reads every state through the model's own final norm and head::

    p_l = softmax(head(norm(state_l)))        KL_l = E_tokens[ KL(p_L || p_l) ]

``KL_L = 0`` (the final state gives the model's output). The paper's finding: an Engram model's
early layers sit closer to the final distribution than a MoE model's (lower ``KL_l`` for small
``l``): static patterns come from memory, so fewer layers are spent reconstructing them. Each
state's own next-token loss is reported beside its KL. Plain torch, no Ray.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..model import EngramLM, MemoryFetch
from .allocation import Arm
from .run import run_record, train_model, val_batch_rng

__all__ = ["layer_states", "logit_lens", "probe_arm"]


@torch.no_grad()
def layer_states(model: EngramLM, tokens_bt: torch.Tensor, fetch: MemoryFetch | None
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The ``n_layers + 1`` states ``[B, T, D]`` of one forward (embedding first) and its logits
    ``[B, T, vocab]``. Read with forward hooks: the model runs its own, unchanged forward."""
    states: list[torch.Tensor] = []
    blocks = list(model.blocks)
    hooks = [blocks[0].register_forward_pre_hook(lambda _m, args: states.append(args[0].sum(dim=2)))]
    hooks += [b.register_forward_hook(lambda _m, _a, out: states.append(out.sum(dim=2))) for b in blocks]
    try:
        logits = model(tokens_bt, fetch)
    finally:
        for h in hooks:
            h.remove()
    return states, logits


@torch.no_grad()
def logit_lens(model: EngramLM, states: list[torch.Tensor], logits_btv: torch.Tensor, targets_bt: torch.Tensor,
               chunk: int = 512) -> tuple[list[float], list[float]]:
    """Per state: the mean KL(final || LogitLens) over the tokens, and the state's own
    next-token cross-entropy against ``targets_bt``."""
    logits_nv, targets_n = logits_btv.flatten(0, 1), targets_bt.flatten()
    n = targets_n.numel()
    kl_sum, ce_sum = [0.0] * len(states), [0.0] * len(states)
    # a few [chunk, V] float32 tensors at a time, not [N, V] per state (V = 50k: 200 MB per 1k tokens)
    for a in range(0, n, chunk):
        final = F.log_softmax(logits_nv[a:a + chunk].float(), dim=-1)             # [c, V]
        p_final = final.exp()
        for i, s in enumerate(states):
            lens = F.log_softmax(model.head(model.norm(s.flatten(0, 1)[a:a + chunk])).float(), dim=-1)
            kl_sum[i] += float((p_final * (final - lens)).sum())
            ce_sum[i] += float(F.nll_loss(lens, targets_n[a:a + chunk], reduction="sum"))
    return [k / n for k in kl_sum], [c / n for c in ce_sum]


def probe_arm(arm: Arm, *, corpus: str, train: TrainConfig, eval_batches: int, probe_batches: int,
              cka_tokens: int, table_lr: float = 1e-2, threads: int = 1, device: str | None = None
              ) -> dict[str, Any]:
    """Train ``arm`` as :func:`~engram_ray.experiments.run.train_arm` does, then probe it on the
    first ``probe_batches`` fixed validation batches: the run's record plus ``logit_lens`` (per
    state: KL and loss, over all probe tokens, and per batch) and ``states`` (per state, the
    first ``cka_tokens`` tokens' ``[N, D]`` float32 array: a few MB, what CKA compares)."""
    if probe_batches < 1 or cka_tokens < 2:
        raise ValueError(f"probe_batches={probe_batches} and cka_tokens={cka_tokens}: expected >= 1 and >= 2")
    trainer, losses, train_s = train_model(arm, corpus=corpus, train=train, table_lr=table_lr, threads=threads,
                                           device=device)
    rec = run_record(arm, trainer, losses, train_s, eval_batches)
    model = trainer.model
    model.eval()
    kl_b, ce_b, kept = [], [], []
    n = have = 0
    for i in range(probe_batches):
        x, y, fetch = trainer.held_out(val_batch_rng(i))
        states, logits = layer_states(model, x, fetch)
        kl, ce = logit_lens(model, states, logits, y)
        kl_b.append(kl)
        ce_b.append(ce)
        n += y.numel()
        if have < cka_tokens:  # only the tokens CKA compares are kept
            kept.append([s.flatten(0, 1)[:cka_tokens - have].float().cpu().numpy() for s in states])
            have += kept[-1][0].shape[0]
    if have < cka_tokens:
        raise ValueError(f"cka_tokens={cka_tokens}: the {probe_batches} probe batches hold only {n} tokens")
    rec["logit_lens"] = {"kl": np.mean(kl_b, axis=0).tolist(), "loss": np.mean(ce_b, axis=0).tolist(),
                         "kl_batches": np.array(kl_b).T.tolist(), "tokens": n}
    rec["states"] = [np.concatenate([k[layer] for k in kept]) for layer in range(len(kept[0]))]
    return rec
