"""The timed phases of ``bench offload`` and their interleaved repetitions.

* ``prefill``: each sequence alone, its whole prompt in one forward;
* ``decode``: one batch of equal prompts generating token by token with a KV cache
  (``decode_mbM``: the same batch in M alternating micro-batches, so one part's rows travel
  while another part computes);
* ``serving``: requests of drawn prompt and output lengths through the continuous-batching
  engine of :mod:`.serving` -- what a serving deployment runs.

Indexing (compress, hash, offset) is inside every timing: it is part of what a worker pays.
Each phase adds to ``acc`` the seconds spent hashing, issuing fetches and blocked for rows; the
rest of a run is the model's compute.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .isolation import cores_busy_s
from .serving import Request, account, draw_requests, serve

__all__ = ["MODES", "PHASES", "Workload", "interleave", "microbatch_phase", "run_phase"]

MODES = ("no_engram", "local", "remote", "remote_lazy")
PHASES = ("prefill", "decode", "serving")
#: The model thread's time besides its forward: indexing tokens, handing lookups over, blocked
#: on rows, and the rest of taking rows (staging, the copy's event, the expand).
PARTS = ("hash_s", "issue_s", "wait_s", "stage_s")
#: Beside the parts, not one of them: the model thread's seconds off the CPU in a run (wall time
#: minus its CPU time): asleep waiting for rows (inside wait_s) or, on CUDA, for the device.
#: LocalMemory's wait_s is its gather, on the CPU; a remote mode's off-CPU time is true blocking.
#: And the memory cores' busy seconds in the run (every process on them: the shards, the agent,
#: Ray's daemons), at the kernel's 10 ms tick: what a mode's lookups cost the memory side, and
#: what runs beside the model (on a shared socket it slows the model's compute too).
INFO = ("off_cpu_s", "memory_busy_s")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Workload:
    """Every phase's inputs, fixed by seed 0 (the same for every mode)."""

    seqs: list[tuple[torch.Tensor, np.ndarray]]    # prefill: [1, n] on the device and the host
    prompt: torch.Tensor                            # decode: [batch, prompt] on the device
    decode_tokens: int
    requests: list[Request]                         # serving
    max_batch: int
    token_budget: int

    def tokens(self, phase: str) -> int:
        """Tokens a run of ``phase`` processes (prompt and generated), for tokens/s."""
        if phase == "prefill":
            return sum(h.size for _, h in self.seqs)
        if phase.startswith("decode"):
            return int(self.prompt.shape[0] * (self.prompt.shape[1] + self.decode_tokens))
        return sum(r.prompt.size + r.output_len for r in self.requests)

    @classmethod
    def draw(cls, tokens: np.ndarray, dev: torch.device, *, sequences: int, min_len: int, max_len: int,
             decode_batch: int, decode_prompt: int, decode_tokens: int, requests: int,
             prompt_len: tuple[int, int], output_len: tuple[int, int], max_batch: int,
             token_budget: int) -> Workload:
        rng = np.random.default_rng(0)
        lens = rng.integers(min_len, max_len + 1, size=sequences)
        starts = rng.integers(0, tokens.size - max_len - 1, size=sequences)
        host = [tokens[a:a + n].astype(np.int64)[None] for a, n in zip(starts, lens)]   # [1, n] each
        ps = rng.integers(0, tokens.size - decode_prompt - 1, size=decode_batch)
        prompt = torch.as_tensor(np.stack([tokens[a:a + decode_prompt] for a in ps]).astype(np.int64)).to(dev)
        reqs = draw_requests(tokens, requests, prompt_len, output_len, seed=1)
        return cls([(torch.from_numpy(t).to(dev), t) for t in host], prompt, decode_tokens, reqs,
                   max_batch, token_budget)


def _prefill(model, memory, indexer, work: Workload, device, acc) -> float:
    """The sequences one at a time, each one forward. Their tokens are known before they run
    (as a serving engine knows its queued prompts), so the next sequence's rows are asked for
    before this one's forward: they travel for a whole forward, not only the blocks before the
    first Engram layer -- what the serving engine's lookahead does for its prefill chunks.
    The in-process table gathers when a layer asks, so its runs are unchanged."""
    def issue(tokens_bt: np.ndarray) -> Any:
        t1 = time.perf_counter()
        rows = indexer.rows(tokens_bt)
        t2 = time.perf_counter()
        fetch = memory.fetch(rows, requires_grad=False)
        acc["hash_s"] += t2 - t1
        acc["issue_s"] += time.perf_counter() - t2
        return fetch

    _sync(device)
    t0 = time.perf_counter()
    ahead = issue(work.seqs[0][1]) if memory is not None and work.seqs else None
    fetch = None
    try:
        for i, (ids, _) in enumerate(work.seqs):  # the same tokens on the device and on the host
            fetch = ahead
            if memory is not None and i + 1 < len(work.seqs):
                ahead = issue(work.seqs[i + 1][1])
            model(ids, fetch)
            account(acc, fetch)
    finally:  # a forward that raised leaves the lookahead unused: give its buffers back now
        release = getattr(ahead, "release", None)
        if release is not None and ahead is not fetch:
            release()
    _sync(device)
    return time.perf_counter() - t0


def _decode(model, memory, indexer, work: Workload, device, acc, microbatches: int = 1) -> float:
    """The decode batch generating ``decode_tokens`` tokens after its prompt. With
    ``microbatches`` > 1 the batch is split and the parts alternate: a part's next fetch is
    issued as soon as its token is sampled, so it travels while the other parts compute."""
    parts = [_Part(model, indexer, rows, device) for rows in torch.tensor_split(work.prompt, microbatches)]
    _sync(device)
    t0 = time.perf_counter()
    for p in parts:
        p.issue(memory, acc)
    for step in range(work.decode_tokens + 1):  # the prompt, then `decode_tokens` single tokens
        for p in parts:
            p.forward(model, acc)
            if step < work.decode_tokens:
                p.issue(memory, acc)
    _sync(device)
    return time.perf_counter() - t0


class _Part:
    """One micro-batch of the decode batch: its cache, hashing history and pending fetch."""

    def __init__(self, model, indexer, prompt: torch.Tensor, device):
        self.indexer, self.new, self.pos = indexer, prompt, 0
        self.cache = model.new_cache(prompt.shape[0], device=device)
        self.hist = indexer.new_history(prompt.shape[0])
        self.fetch: Any = None

    def issue(self, memory, acc) -> None:
        """Index the part's new tokens and start fetching their rows (no Engram: nothing)."""
        if memory is None:
            return
        t1 = time.perf_counter()
        # the sampled ids come to the host to be indexed (the backbone alone never waits)
        rows, self.hist = self.indexer.step(self.hist, self.new.cpu().numpy())
        t2 = time.perf_counter()
        self.fetch = memory.fetch(rows, requires_grad=False)
        acc["hash_s"] += t2 - t1
        acc["issue_s"] += time.perf_counter() - t2

    def forward(self, model, acc) -> None:
        logits = model(self.new, self.fetch, cache=self.cache, start_pos=self.pos)
        account(acc, self.fetch)
        self.pos += self.new.shape[1]
        self.new = logits[:, -1].argmax(-1, keepdim=True)


def _serving(model, memory, indexer, work: Workload, device, acc) -> float:
    return serve(model, memory, indexer, work.requests, max_batch=work.max_batch,
                 token_budget=work.token_budget, device=device, acc=acc).seconds


_RUN = {"prefill": _prefill, "decode": _decode, "serving": _serving}


def microbatch_phase(m: int) -> str:
    """The name of the decode phase run in ``m`` alternating micro-batches."""
    return f"decode_mb{m}"


def run_phase(phase: str, model, memory, indexer, work: Workload, device: torch.device,
              acc: dict[str, float] | None = None, memory_cores: tuple[int, ...] = ()) -> float:
    """Seconds of one run of ``phase``; ``acc`` gathers its hash / issue / wait seconds (and
    the busy seconds of ``memory_cores``)."""
    acc = acc if acc is not None else collections.defaultdict(float)
    busy0 = cores_busy_s(memory_cores) if memory_cores else None
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    if phase.startswith("decode_mb"):
        s = _decode(model, memory, indexer, work, device, acc, microbatches=int(phase[len("decode_mb"):]))
    else:
        s = _RUN[phase](model, memory, indexer, work, device, acc)
    acc["off_cpu_s"] += max(0.0, (time.perf_counter() - wall0) - (time.thread_time() - cpu0))
    busy1 = cores_busy_s(memory_cores) if busy0 is not None else None
    if busy0 is not None and busy1 is not None:  # both read: else the run has no figure
        acc["memory_busy_s"] += busy1 - busy0
    return s


def interleave(setups: dict[str, tuple[Any, Any]], indexer, work: Workload, dev: torch.device,
               repeats: int, progress: bool, phases: tuple[str, ...] = PHASES,
               memory_cores: tuple[int, ...] = ()):
    """Run every mode ``repeats + 1`` times, a b c d a b c d ... (each run: every phase);
    repetition 0 warms up and is not counted. Returns the counted seconds
    ``{mode: {phase: [s, ...]}}`` and their parts ``{mode: {phase: {part: s}}}`` (:data:`PARTS`,
    and :data:`INFO`)."""
    times: dict[str, dict[str, list[float]]] = {m: {ph: [] for ph in phases} for m in MODES}
    # memory_busy_s only where it is measured (memory cores named): a 0 would read as "idle"
    info = INFO if memory_cores else tuple(k for k in INFO if k != "memory_busy_s")
    parts = {m: {ph: dict.fromkeys(PARTS + info, 0.0) for ph in phases} for m in MODES}
    bar = None
    if progress:
        from tqdm import tqdm
        # no monitor thread: it would be born on the model thread, on the compute cores
        tqdm.monitor_interval = 0
        bar = tqdm(total=(repeats + 1) * len(MODES), desc="bench offload", unit="run")
    for rep in range(repeats + 1):
        for mode in MODES:
            model, mem = setups[mode]
            for ph in phases:
                acc: dict[str, float] = collections.defaultdict(float)
                s = run_phase(ph, model, mem, indexer, work, dev, acc, memory_cores)
                if rep:
                    times[mode][ph].append(s)
                    for k in PARTS + info:
                        parts[mode][ph][k] += acc[k]
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return times, parts
