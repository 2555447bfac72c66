"""A small continuous-batching engine: the serving workload of ``engram-ray bench offload``.

The paper measures throughput with nano-vLLM: 512 requests, prompts of Uniform(100, 1024)
tokens, outputs of Uniform(100, 1024), served with continuous batching. This module runs the
same shape of work on :class:`~engram_ray.model.EngramLM` (scaled down by flags on a CPU):

* at most ``max_batch`` sequences are live, each in a *slot* of one KV cache; a finished
  sequence leaves and a waiting request takes a slot at the next step;
* a step spends up to ``token_budget`` prompt tokens on prefill chunks (FIFO, a long prompt is
  chunked over several steps), each chunk a batch-1 forward on its slot, then runs one decode
  step over every sequence whose prompt is done, as one batch with per-row positions
  (:class:`~engram_ray.model.attention.RowPositions`), so a decode step costs what a
  serving engine's does (one ``[d, 1]`` forward, not ``d`` forwards);
* every forward's Engram rows come from the memory: all of a step's fetches (the chunks' and
  the decode batch's, whose tokens were sampled at the end of the previous step) are issued at
  the start of the step, so the decode batch's rows travel while the chunks compute.

Why slots stay ordered ``[decoding..., prefilling...]``: the decode batch is then a contiguous
view ``[0, d)`` of the cache (no gather of the cache each step). Chunks complete in FIFO order,
so the sequence that finishes its prompt is always the first prefilling one; when a decoding
sequence finishes, the last decoding one moves into its slot and the last prefilling one into
the hole (a copy of one sequence's cache, up to its length).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..model.attention import KVCache

__all__ = ["Request", "draw_requests", "SlotCache", "serve", "account"]


def account(acc: dict[str, float], fetch: Any) -> None:
    """Add a used fetch's time in ``rows()`` to ``acc`` (nothing without a memory): blocked
    (``wait_seconds``, every memory's) and the rest of taking the rows (``stage_seconds``, a
    RemoteFetch's: staging, the copy's event, the expand; a local gather is all waiting)."""
    if fetch is not None:
        acc["wait_s"] += fetch.wait_seconds
        acc["stage_s"] += getattr(fetch, "stage_seconds", 0.0)


@dataclass(frozen=True)
class Request:
    """One request: its prompt (tokenizer ids) and how many tokens to generate."""

    prompt: np.ndarray
    output_len: int


def draw_requests(tokens: np.ndarray, n: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                  seed: int = 0) -> list[Request]:
    """``n`` requests: prompts cut from ``tokens`` with lengths ~ Uniform(prompt_len), output
    lengths ~ Uniform(output_len) (both inclusive), as the paper's nano-vLLM bench draws them."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(prompt_len[0], prompt_len[1] + 1, size=n)
    outs = rng.integers(output_len[0], output_len[1] + 1, size=n)
    starts = rng.integers(0, tokens.size - prompt_len[1] - 1, size=n)
    return [Request(tokens[a:a + k].astype(np.int64), int(o)) for a, k, o in zip(starts, lens, outs)]


class SlotCache:
    """One KV cache of ``slots`` sequences; views of slot ranges share its storage."""

    def __init__(self, model: Any, slots: int, device: torch.device):
        self.cache: KVCache = model.new_cache(slots, device=device)
        #: Engram ShortConv states per layer ``[slots, reach, n*D]``, made on first write.
        self.conv: dict[Any, torch.Tensor] = {}

    def view(self, lo: int, hi: int, fresh: bool = False) -> KVCache:
        """Slots ``[lo, hi)`` as a cache of batch ``hi - lo`` (``fresh``: no conv state yet)."""
        v = KVCache(0, 0, 0, 0, 0)
        v.k = [k[lo:hi] for k in self.cache.k]
        v.v = [x[lo:hi] for x in self.cache.v]
        if not fresh:
            v.extra = {key: st[lo:hi] for key, st in self.conv.items()}
        return v

    def keep(self, view: KVCache, lo: int) -> None:
        """Write the states a forward left in ``view`` back to slots ``lo..`` (the Engram layer
        replaces its state tensor instead of writing into it)."""
        for key, st in view.extra.items():
            big = self.conv.get(key)
            if big is None:
                big = self.conv[key] = st.new_zeros(self.cache.k[0].shape[0], *st.shape[1:])
            big[lo:lo + st.shape[0]] = st

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions and conv state into slot ``dst``."""
        for k in (*self.cache.k, *self.cache.v):
            k[dst, :, :length] = k[src, :, :length]
        for st in self.conv.values():
            st[dst] = st[src]


@dataclass
class _Seq:
    """A live sequence: its request, progress and hashing history."""

    index: int
    req: Request
    history: np.ndarray                  # [1, N-1] compressed ids (or empty without Engram)
    done: int = 0                        # prompt tokens prefilled
    out: list[int] = field(default_factory=list)

    @property
    def pos(self) -> int:
        """Tokens in the cache: the prompt so far, then every generated token but the last."""
        return self.done + max(0, len(self.out) - 1)


@dataclass
class ServeResult:
    """What a serving run did and how long it took."""

    seconds: float
    prompt_tokens: int
    output_tokens: int
    steps: int
    outputs: list[list[int]]


class _Engine:
    """The continuous-batching loop over one model and memory (``memory=None``: no Engram)."""

    def __init__(self, model: Any, memory: Any, indexer: Any, reqs: list[Request], *, max_batch: int,
                 token_budget: int, device: torch.device, acc: dict[str, float]):
        self.model, self.memory, self.indexer, self.device, self.acc = model, memory, indexer, device, acc
        self.max_batch, self.budget = max_batch, token_budget
        self.slots = SlotCache(model, max_batch, device)
        self.waiting = collections.deque(enumerate(reqs))
        self.live: list[_Seq] = []
        self.n_decoding = 0                  # live[:n_decoding] have their whole prompt cached
        self.outputs: list[list[int]] = [[] for _ in reqs]

    def step(self) -> None:
        """Admit, issue every fetch of the step, prefill chunks, decode once, retire."""
        while self.waiting and len(self.live) < self.max_batch:
            i, req = self.waiting.popleft()
            self.live.append(_Seq(i, req, self.indexer.new_history(1)))
        chunks = self._plan_chunks()
        decoding = self.live[:self.n_decoding]
        # Every fetch of the step in one hand-over, in the order the forwards run (chunks, then
        # the decode batch): an ordered memory sends the lookups in the order layers ask.
        rows = [self._index(s, s.req.prompt[None, a:b]) for s, _, a, b in chunks]
        if decoding:
            rows.append(self._index_decode(decoding))
        fetches = self._issue(rows)
        chunk_fetches = fetches[:len(chunks)]
        dec_fetch = fetches[len(chunks)] if decoding else None
        for (seq, slot, a, b), fetch in zip(chunks, chunk_fetches):
            self._prefill(seq, slot, a, b, fetch)
        if decoding:
            self._decode(decoding, dec_fetch)
        self._retire()

    def _plan_chunks(self) -> list[tuple[_Seq, int, int, int]]:
        """Prompt chunks ``(seq, slot, start, stop)`` of this step: FIFO up to the budget."""
        out, left = [], self.budget
        for slot in range(self.n_decoding, len(self.live)):
            if left <= 0:
                break
            s = self.live[slot]
            n = min(left, s.req.prompt.size - s.done)
            out.append((s, slot, s.done, s.done + n))
            left -= n
        return out

    def _index(self, seq: _Seq, new_bt: np.ndarray) -> np.ndarray | None:
        """One sequence's new tokens -> their rows ``[L, 1, n, H]`` (None without a memory)."""
        if self.memory is None:
            return None
        t1 = time.perf_counter()
        rows, seq.history = self.indexer.step(seq.history, new_bt)
        self.acc["hash_s"] += time.perf_counter() - t1
        return rows

    def _index_decode(self, decoding: list[_Seq]) -> np.ndarray | None:
        """The decode batch's last tokens (one array for all) -> rows ``[L, d, 1, H]``."""
        if self.memory is None:
            return None
        t1 = time.perf_counter()
        hist = np.concatenate([s.history for s in decoding])
        rows, hist = self.indexer.step(hist, np.array([[s.out[-1]] for s in decoding], dtype=np.int64))
        for i, s in enumerate(decoding):
            s.history = hist[i:i + 1]
        self.acc["hash_s"] += time.perf_counter() - t1
        return rows

    def _issue(self, rows: list[np.ndarray | None]) -> list[Any]:
        """Start every fetch of the step at once (None without a memory)."""
        if self.memory is None:
            return [None] * len(rows)
        t2 = time.perf_counter()
        fetches = self.memory.fetch_many([r for r in rows if r is not None], requires_grad=False)
        self.acc["issue_s"] += time.perf_counter() - t2
        return fetches

    def _forward(self, tokens: torch.Tensor, fetch: Any, view: KVCache, start: Any) -> torch.Tensor:
        logits = self.model(tokens, fetch, cache=view, start_pos=start)
        account(self.acc, fetch)
        return logits[:, -1]

    def _prefill(self, seq: _Seq, slot: int, a: int, b: int, fetch: Any) -> None:
        """One chunk, batch 1, on the sequence's slot; the last chunk samples its first token."""
        view = self.slots.view(slot, slot + 1, fresh=a == 0)
        tokens = torch.from_numpy(seq.req.prompt[None, a:b]).to(self.device)
        last = self._forward(tokens, fetch, view, a)
        self.slots.keep(view, slot)
        seq.done = b
        if b == seq.req.prompt.size:
            seq.out.append(int(last.argmax(-1)[0]))  # the sampled id comes to the host
            self.n_decoding += 1                      # FIFO: this is slot n_decoding

    def _decode(self, decoding: list[_Seq], fetch: Any) -> None:
        """One token for every decoding sequence: one ``[d, 1]`` forward at per-row positions."""
        d = len(decoding)
        view = self.slots.view(0, d)
        tokens = torch.tensor([[s.out[-1]] for s in decoding], device=self.device)
        start = torch.tensor([s.pos for s in decoding])
        last = self._forward(tokens, fetch, view, start)
        self.slots.keep(view, 0)
        for s, t in zip(decoding, last.argmax(-1).tolist()):
            s.out.append(int(t))

    def _retire(self) -> None:
        """Finished sequences leave; slots stay ``[decoding..., prefilling...]`` (see module)."""
        for i in range(self.n_decoding - 1, -1, -1):  # high slots first: what moves is live
            s = self.live[i]
            if len(s.out) < s.req.output_len:
                continue
            self.outputs[s.index] = s.out
            last_dec, last = self.n_decoding - 1, len(self.live) - 1
            self._relocate(last_dec, i)
            self._relocate(last, last_dec)
            self.live.pop()
            self.n_decoding -= 1

    def _relocate(self, src: int, dst: int) -> None:
        if src != dst:
            self.slots.move(src, dst, self.live[src].pos)
            self.live[dst] = self.live[src]


def serve(model: Any, memory: Any, indexer: Any, reqs: list[Request], *, max_batch: int, token_budget: int,
          device: torch.device, acc: dict[str, float] | None = None) -> ServeResult:
    """Serve ``reqs`` to completion (greedy); ``acc`` gathers hash / issue / wait seconds."""
    acc = acc if acc is not None else collections.defaultdict(float)
    eng = _Engine(model, memory, indexer, reqs, max_batch=max_batch, token_budget=token_budget,
                  device=device, acc=acc)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    steps = 0
    while eng.waiting or eng.live:
        eng.step()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ServeResult(time.perf_counter() - t0, sum(r.prompt.size for r in reqs),
                       sum(r.output_len for r in reqs), steps, eng.outputs)
