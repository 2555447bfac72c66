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
  the start of the step, so the decode batch's rows travel while the chunks compute;
* **lookahead**: prompt tokens are known before they run, so the rows of the *next* step's
  prefill chunks are asked for at the start of this one, after this step's own lookups (an
  ordered memory sends them last). A chunk's rows then travel for a whole step, not just the
  two blocks before the first Engram layer -- only the decode batch's rows (sampled one step
  earlier) still race the blocks. The next plan is predicted exactly as the loop will make
  it (who retires, who is admitted, where slots move); a chunk planned otherwise is fetched
  as usual and the unused lookahead is dropped (counted in ``ServeResult.lookahead``).
  Measured in ``engram-ray bench offload``'s serving phase on 2 cores (5 runs each way): the
  chunks' time blocked for rows at the first Engram layer fell from 2.1 to 1.1 ms a run --
  little here, where two CPU blocks of a 256-token chunk outlast its lookup; on a GPU, whose
  blocks take microseconds, a chunk's rows otherwise arrive late. The decode batch's rows
  (~9 ms a run blocked here) are what still waits.

Why slots stay ordered ``[decoding..., prefilling...]``: the decode batch is then a contiguous
view ``[0, d)`` of the cache (no gather of the cache each step). Chunks complete in FIFO order,
so the sequence that finishes its prompt is always the first prefilling one; when a decoding
sequence finishes, the last decoding one moves into its slot and the last prefilling one into
the hole (a copy of one sequence's cache, up to its length).
"""

from __future__ import annotations

import collections
import itertools
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
    #: Prefill chunks whose rows were asked for a step ahead and used ("hits"), chunks fetched
    #: in their own step ("misses"), and lookahead fetches planned otherwise and dropped.
    lookahead: dict[str, int] = field(default_factory=dict)


class _Engine:
    """The continuous-batching loop over one model and memory (``memory=None``: no Engram)."""

    def __init__(self, model: Any, memory: Any, indexer: Any, reqs: list[Request], *, max_batch: int,
                 token_budget: int, device: torch.device, acc: dict[str, float], lookahead: bool = True):
        self.model, self.memory, self.indexer, self.device, self.acc = model, memory, indexer, device, acc
        self.max_batch, self.budget = max_batch, token_budget
        self.slots = SlotCache(model, max_batch, device)
        self.waiting = collections.deque((i, r, indexer.new_history(1)) for i, r in enumerate(reqs))
        self.live: list[_Seq] = []
        self.n_decoding = 0                  # live[:n_decoding] have their whole prompt cached
        self.outputs: list[list[int]] = [[] for _ in reqs]
        self.lookahead = lookahead and memory is not None
        #: (request, start, stop) -> (fetch, history after the chunk): next step's chunks, asked
        #: for a step ahead.
        self.ahead: dict[tuple[int, int, int], tuple[Any, np.ndarray]] = {}
        self.counts = {"hits": 0, "misses": 0, "dropped": 0}

    def step(self) -> None:
        """Admit, issue every fetch of the step, prefill chunks, decode once, retire."""
        while self.waiting and len(self.live) < self.max_batch:
            i, req, hist = self.waiting.popleft()
            self.live.append(_Seq(i, req, hist))
        chunks = self._plan_chunks()
        decoding = self.live[:self.n_decoding]
        # Chunks asked for a step ahead are taken; the rest, and the decode batch, are asked
        # for now, in one hand-over in the order the forwards run (chunks, then the decode
        # batch): an ordered memory sends the lookups in the order layers ask.
        ready: dict[int, Any] = {}
        rows, new = [], []
        for k, (s, _, a, b) in enumerate(chunks):
            got = self.ahead.pop((s.index, a, b), None)
            if got is not None:
                ready[k], s.history = got
            else:
                rows.append(self._index(s, s.req.prompt[None, a:b]))
                new.append(k)
        if self.lookahead:
            self.counts["hits"] += len(ready)
            self.counts["misses"] += len(new)
        self._drop_ahead()  # planned otherwise: their slots go back before new lookups take some
        if decoding:
            rows.append(self._index_decode(decoding))
        # next step's chunks last: this step's rows first on the memory side
        following = self._next_chunks(chunks) if self.lookahead else []
        ahead_rows = [self._index_ahead(s, a, b) for s, a, b in following]
        fetches = self._issue(rows + [r for r, _ in ahead_rows])
        for k, f in zip(new, fetches):
            ready[k] = f
        dec_fetch = fetches[len(new)] if decoding else None
        for (s, a, b), (_, hist), f in zip(following, ahead_rows, fetches[len(rows):]):
            self.ahead[(s.index, a, b)] = (f, hist)
        chunk_fetches = [ready[k] for k in range(len(chunks))]
        for (seq, slot, a, b), fetch in zip(chunks, chunk_fetches):
            self._prefill(seq, slot, a, b, fetch)
        if decoding:
            self._decode(decoding, dec_fetch)
        self._retire()

    def _plan_chunks(self) -> list[tuple[_Seq, int, int, int]]:
        """Prompt chunks ``(seq, slot, start, stop)`` of this step: FIFO up to the budget."""
        prefilling = [(self.live[k], self.live[k].done) for k in range(self.n_decoding, len(self.live))]
        return [(s, self.n_decoding + k, a, b) for k, (s, a, b) in enumerate(self._fill(prefilling))]

    def _fill(self, prefilling: list[tuple[Any, int]]) -> list[tuple[Any, int, int]]:
        """``(seq, start, stop)`` for prefilling ``(seq, done)`` in slot order, up to the budget."""
        out, left = [], self.budget
        for s, done in prefilling:
            if left <= 0:
                break
            n = min(left, s.req.prompt.size - done)
            out.append((s, done, done + n))
            left -= n
        return out

    def _next_chunks(self, chunks: list[tuple[_Seq, int, int, int]]) -> list[tuple[Any, int, int]]:
        """The prefill chunks the next step will plan, predicted from this step's: every live
        sequence one token further (or its chunk done), the same retirements and slot moves as
        :meth:`_retire`, then the same admissions from ``waiting``."""
        done = {id(s): b for s, _, _, b in chunks}
        n_dec, outs = self.n_decoding, {}
        for s in self.live:
            d = done.get(id(s), s.done)
            if s.done == s.req.prompt.size:
                outs[id(s)] = len(s.out) + 1          # one decode step
            elif d == s.req.prompt.size:
                outs[id(s)], n_dec = 1, n_dec + 1     # its last chunk samples its first token
        live = list(self.live)
        n_dec = _retire_order(live, n_dec, lambda s: outs.get(id(s), 0) >= s.req.output_len)
        prefilling = [(s, done.get(id(s), s.done)) for s in live[n_dec:]]
        free = self.max_batch - len(live)
        prefilling += [(_Seq(i, r, h), 0) for i, r, h in itertools.islice(self.waiting, max(0, free))]
        return self._fill(prefilling)

    def _index_ahead(self, seq: Any, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """A next-step chunk's rows and the history after it (not kept by the sequence yet):
        its history now is the sequence's after this step's chunk, which was indexed first."""
        return self._hash(seq.history, seq.req.prompt[None, a:b])

    def _drop_ahead(self) -> None:
        """Give back the lookahead fetches no chunk of this step took."""
        for fetch, _ in self.ahead.values():
            release = getattr(fetch, "release", None)
            if release is not None:
                release()
        self.counts["dropped"] += len(self.ahead)
        self.ahead.clear()

    def _hash(self, history: np.ndarray, new_bt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of new tokens ``[B, n]`` after ``history`` and the history after them, timed."""
        t1 = time.perf_counter()
        rows, hist = self.indexer.step(history, new_bt)
        self.acc["hash_s"] += time.perf_counter() - t1
        return rows, hist

    def _index(self, seq: _Seq, new_bt: np.ndarray) -> np.ndarray | None:
        """One sequence's new tokens -> their rows ``[L, 1, n, H]`` (None without a memory)."""
        if self.memory is None:
            return None
        rows, seq.history = self._hash(seq.history, new_bt)
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
        for s in self.live[:self.n_decoding]:
            if len(s.out) >= s.req.output_len:
                self.outputs[s.index] = s.out
        self.n_decoding = _retire_order(self.live, self.n_decoding, lambda s: len(s.out) >= s.req.output_len,
                                        move=lambda src, dst: self.slots.move(src, dst, self.live[src].pos))


def _retire_order(live: list[Any], n_decoding: int, finished: Any, move: Any = None) -> int:
    """Take the ``finished`` decoding sequences out of ``live`` (slots ``[decoding...,
    prefilling...]``), in place: the last decoding one fills a hole and the last live one the
    slot that frees (``move(src, dst)`` first, for the cache). Returns the new decoding count.
    The engine retires with it and predicts the next step's plan with it: one rule for both."""
    def relocate(src: int, dst: int) -> None:
        if src != dst:
            if move is not None:
                move(src, dst)
            live[dst] = live[src]

    for i in range(n_decoding - 1, -1, -1):  # high slots first: what moves is live
        if not finished(live[i]):
            continue
        last_dec, last = n_decoding - 1, len(live) - 1
        relocate(last_dec, i)
        relocate(last, last_dec)
        live.pop()
        n_decoding -= 1
    return n_decoding


def serve(model: Any, memory: Any, indexer: Any, reqs: list[Request], *, max_batch: int, token_budget: int,
          device: torch.device, acc: dict[str, float] | None = None, lookahead: bool = True) -> ServeResult:
    """Serve ``reqs`` to completion (greedy); ``acc`` gathers hash / issue / wait seconds.
    ``lookahead``: ask for the next step's prefill rows a step ahead (see the module)."""
    acc = acc if acc is not None else collections.defaultdict(float)
    eng = _Engine(model, memory, indexer, reqs, max_batch=max_batch, token_budget=token_budget,
                  device=device, acc=acc, lookahead=lookahead)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    steps = 0
    while eng.waiting or eng.live:
        eng.step()
        steps += 1
    eng._drop_ahead()  # nothing is left to plan: a lookahead predicted otherwise goes back
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ServeResult(time.perf_counter() - t0, sum(r.prompt.size for r in reqs),
                       sum(r.output_len for r in reqs), steps, eng.outputs,
                       dict(eng.counts) if eng.lookahead else {})
