"""``RemoteMemory``: the model's :class:`~engram_ray.model.memory.Memory` backed by the
memory service, through an :class:`~engram_ray.client.EngramClient` or a node's lookup agent
(:class:`~engram_ray.agent.AgentClient`). No Ray here: a worker without a cluster uses it too.

``fetch(row_ids)`` issues every Engram layer's lookup at once, so layer i's rows travel while
the blocks before it compute, and ``rows(i)`` waits only for layer i. Rows come as **unique
rows plus an inverse index**: ``rows_ud [U, D]`` and ``inverse [N]`` move to the device once
and are expanded there (``rows_ud[inverse]``, a gather), so host-to-device traffic and the
backward's row gradients are per distinct row. ``rows_ud`` is the autograd leaf; after
backward ``update(fetch)`` pushes its gradient, one row per distinct id (no dedup on the host).

Numbers equal today's and ``LocalMemory``'s: the rows are bit-identical (a gather), and on CPU
the expand's backward sums a row's gradients with ``core.optim.sum_duplicates`` -- what the
client, the shards and LocalMemory use -- so the pushed gradients are bit-identical too. On
CUDA (or for non-float32 gradients) it is ``index_add_``: equal up to the order in which a
row's duplicate gradients are summed.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from .agent.protocol import AgentRefused, AgentUnavailable
from .config import FLOAT_DTYPES
from .core.dtypes import FP8
from .core.fp8 import dequantize_packed
from .core.layout import TableLayout
from .core.optim import sum_duplicates
from .model.memory import MemoryFetch

log = logging.getLogger(__name__)

__all__ = ["RemoteMemory", "RemoteFetch", "RowSource", "expand_rows", "TORCH_DTYPES"]


class RowSource(Protocol):
    """What RemoteMemory needs of its source: an ``EngramClient`` or an ``AgentClient``."""

    layout: TableLayout
    timeout: float

    def prefetch_unique(self, row_ids: Any) -> Any: ...
    def prefetch_unique_many(self, row_ids: Any, *, ordered: bool = False) -> list[Any]: ...
    def push_gradients(self, row_ids: Any, grads: Any, timeout: float | None = None, *,
                       lr: float | None = None) -> int: ...


class _Expand(torch.autograd.Function):
    """``rows_ud[inverse]`` whose backward sums each row's gradients as the host's
    ``sum_duplicates`` does (on CPU, by calling it: every row of ``rows_ud`` occurs in
    ``inverse``, so its sorted unique ids are exactly ``0..U-1``)."""

    @staticmethod
    def forward(ctx: Any, rows_ud: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.num_rows = rows_ud.shape[0]
        return rows_ud.index_select(0, inverse)

    @staticmethod
    def backward(ctx: Any, grad_nd: torch.Tensor) -> tuple[torch.Tensor, None]:
        (inverse,) = ctx.saved_tensors
        if grad_nd.device.type == "cpu" and grad_nd.dtype == torch.float32:
            # The host's own sum (numpy's reduceat, not a sequential add): bit-identical to
            # what the client, the shards and LocalMemory compute for the same duplicates.
            _, summed = sum_duplicates(inverse.numpy(), grad_nd.detach().contiguous().numpy())
            return torch.from_numpy(summed), None
        out = torch.zeros((ctx.num_rows, grad_nd.shape[1]), dtype=grad_nd.dtype, device=grad_nd.device)
        return out.index_add_(0, inverse, grad_nd), None


def expand_rows(rows_ud: torch.Tensor, inverse_n: torch.Tensor) -> torch.Tensor:
    """Rows ``[N, D]`` from unique rows ``[U, D]`` and ``inverse [N]`` (int64, same device)."""
    if not (rows_ud.requires_grad and torch.is_grad_enabled()):
        return rows_ud.index_select(0, inverse_n)  # no backward: no autograd node to build
    return _Expand.apply(rows_ud, inverse_n)


#: At most this many source buffers lent at once (RemoteMemory.lend_host): a consumer that keeps
#: its rows tensors (say, an analysis storing every layer's input) gets the rows past it copied
#: and their buffers back at once, so a lookup agent's slots (64 per worker) never run out.
MAX_LENT = 16

#: The float dtypes by name (storage and model alike; config.FLOAT_DTYPES) -> torch's.
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in FLOAT_DTYPES}


def _is_bf16(arr: np.ndarray) -> bool:
    """Whether ``arr`` holds ml_dtypes' bfloat16 -- the only storage dtype numpy calls kind 'V'.
    (Not ``dtype.name``: a Python property, 10 us on the model's thread with caches cold.)"""
    return arr.dtype.kind == "V"


def _host_tensor(arr: np.ndarray, on_free: Callable[[], None] | None = None) -> torch.Tensor:
    """``arr`` as a tensor, no copy. ``on_free``: called once the tensor and every view of it
    are gone (torch holds the array it was made from until then; a finaliser on that array)."""
    bf16 = _is_bf16(arr)
    src = arr.view(np.int16) if bf16 else arr  # ml_dtypes' bfloat16: reinterpret the bits
    t = torch.from_numpy(src)
    if on_free is not None:
        weakref.finalize(src, on_free)
    return t.view(torch.bfloat16) if bf16 else t


class RemoteFetch:
    """One batch's rows from the service: a :class:`~engram_ray.model.memory.MemoryFetch`."""

    def __init__(self, memory: RemoteMemory, row_ids_lbth: np.ndarray, requires_grad: bool,
                 pending: list[Any] | None = None):
        self.memory, self.row_ids = memory, row_ids_lbth
        self.requires_grad = requires_grad
        # prefetch: every layer's rows asked for now (one hand-over; earliest layer first and
        # the next once it has its rows, when ordered) unless ``pending`` holds them already
        # (RemoteMemory.fetch_many); on demand: each when its layer asks.
        if pending is None:
            pending = (memory._prefetch(list(row_ids_lbth), requires_grad)
                       if memory.prefetch else [None] * len(row_ids_lbth))
        self.pending: list[Any] = pending
        #: Per layer asked: the unique rows ``[U, D]`` on the device (the autograd leaves) ...
        self.tensors: dict[int, torch.Tensor] = {}
        #: ... and their global ids ``[U]`` (host), for the push.
        self.unique_ids: dict[int, np.ndarray] = {}
        self._staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._seconds: list[float | None] = [None] * len(row_ids_lbth)
        #: Time spent blocked in rows(): the part of the fetch not hidden behind compute.
        self.wait_seconds = 0.0
        #: The rest of rows(): staging later layers' rows, the copy's event, the expand.
        self.stage_seconds = 0.0

    @property
    def fetch_seconds(self) -> float:
        """Issue-to-arrival time of the slowest layer's rows (0 until all arrived)."""
        secs = [s if s is not None else (getattr(p, "fetch_seconds", None) if p is not None else None)
                for s, p in zip(self._seconds, self.pending)]
        arrived = [x for x in secs if x is not None]
        return max(arrived, default=0.0) if len(arrived) == len(secs) else 0.0

    def _take(self, li: int) -> Any:
        """Layer ``li``'s unique rows, once they are in (views of the source's buffers until the
        fetch is released). A lookup agent that died meanwhile is re-attached (restarted by
        whoever supervises it) and the read asked again, once."""
        source = self.memory.source
        if self.pending[li] is None:  # on demand: this layer's rows go out only now
            self.pending[li] = source.prefetch_unique(self.row_ids[li])
        try:
            u = self.pending[li].result(timeout=source.timeout * 4)
        except AgentUnavailable:  # lookups are reads: safe to ask again of the re-attached agent
            self.pending[li] = source.prefetch_unique(self.row_ids[li])
            u = self.pending[li].result(timeout=source.timeout * 4)
        self._seconds[li] = getattr(self.pending[li], "fetch_seconds", None)
        return u

    def _arrive(self, li: int) -> None:
        """Wait for layer ``li``'s rows and stage them towards the device (copied out of the
        source's buffers, which are released)."""
        u = self._take(li)
        self.unique_ids[li] = np.array(u.ids, dtype=np.int64)  # a copy: u may view a shared slot
        release = getattr(self.pending[li], "release", None)
        # a pinned slot is copied from where it is, and given back once that copy is done
        direct = release is not None and self.memory.copy_stream is not None and \
            bool(getattr(self.pending[li], "pinned", False))
        self._staged[li] = self.memory.stage(li, u.rows, u.inverse, release=release if direct else None)
        if release is not None and not direct:
            release()

    def _stage_landed(self, after: int) -> None:
        """Stage the rows of later layers that have landed already, so their copies to the
        device start now, not when their layer asks (CUDA only: on CPU there is no copy)."""
        for lj in range(after + 1, len(self.pending)):
            p = self.pending[lj]
            if lj in self._staged or lj in self.tensors or p is None:
                continue
            try:
                landed = p.done()
            except (AgentUnavailable, AgentRefused):  # that layer's own rows() will meet it (and retry)
                landed = False
            if landed:
                self._arrive(lj)

    def rows(self, layer_index: int) -> torch.Tensor:
        if self.memory.copy_stream is None and not self.requires_grad:
            return self._rows_direct(layer_index)
        t0 = time.perf_counter()
        if layer_index not in self._staged:
            self._arrive(layer_index)
        t1 = time.perf_counter()
        self.wait_seconds += t1 - t0
        if self.memory.copy_stream is not None:
            self._stage_landed(layer_index)
        rows_ud, inverse = self._staged.pop(layer_index)
        rows_ud = self.memory.ready(rows_ud)
        if self.requires_grad:
            rows_ud.requires_grad_(True)
        self.tensors[layer_index] = rows_ud
        shape = self.row_ids[layer_index].shape                                      # [B, T, H]
        out = expand_rows(rows_ud, inverse).view(*shape, rows_ud.shape[-1]).flatten(-2)
        self.stage_seconds += time.perf_counter() - t1
        return out

    def release(self) -> None:
        """Give back the source's buffers of every layer not taken yet: a fetch that will not
        be used (e.g. a serving engine's lookahead planned otherwise)."""
        for li, p in enumerate(self.pending):
            release = getattr(p, "release", None)
            if release is not None and li not in self._staged and li not in self.tensors:
                release()

    def _rows_direct(self, li: int) -> torch.Tensor:
        """Rows without gradients on the host: expanded in one gather straight out of the
        source's buffers, which are then released -- no staged copy of the unique rows, no copy
        of their ids (nothing is pushed), no autograd node. Every op here runs on the model's
        thread between its layers, with caches cold from its compute: measured on this 2-core
        box (decode-shaped, 2 layers x 128 ids) the staged path cost the thread ~120 us a step
        more than LocalMemory's gather. Where the agent expanded the rows (``expand``), not
        even that gather: the layer reads them in the slot (:meth:`RemoteMemory.lend_host`)."""
        t0 = time.perf_counter()
        p, out = self.pending[li], None
        if getattr(p, "expanded", False):
            try:
                lent = p.lend(timeout=self.memory.source.timeout * 4)
            except AgentUnavailable:  # re-attached: asked again below, as unique rows
                self.pending[li] = self.memory.source.prefetch_unique(self.row_ids[li])
            else:
                t1 = time.perf_counter()
                self.wait_seconds += t1 - t0
                self._seconds[li] = p.fetch_seconds
                if getattr(self.memory.source, "lent", 0) > MAX_LENT:  # rows kept elsewhere: a copy, the slot back now
                    try:
                        out = _host_tensor(lent).clone()
                    finally:
                        p.give_back()
                else:
                    out = self.memory.lend_host(lent, p.give_back)
        if out is None:
            u = self._take(li)
            t1 = time.perf_counter()
            self.wait_seconds += t1 - t0
            try:
                out = self.memory.expand_host(u.rows, u.inverse)
            finally:
                release = getattr(self.pending[li], "release", None)
                if release is not None:
                    release()
        *bt, h = self.row_ids[li].shape
        out = out.view(*bt, h * out.shape[-1])                                     # [B, T, H * D]
        self.stage_seconds += time.perf_counter() - t1
        return out

    def push_gradients(self, lr: float | None = None) -> int:
        """Send d(loss)/d(rows) of every layer used to the shards, once, one row per distinct
        id (layers' ids never overlap: each layer has its own tables), to be applied at ``lr``
        (None: the shards' own rate); returns rows updated."""
        ids, grads = [], []
        for li, t in sorted(self.tensors.items()):
            if t.grad is not None:
                ids.append(self.unique_ids[li])
                grads.append(t.grad.float().cpu().numpy())
        if not ids:
            return 0
        ids_n, grads_nd = np.concatenate(ids), np.concatenate(grads)
        source = self.memory.source  # lr passed only when set: a RowSource of before rates still works
        updated = source.push_gradients(ids_n, grads_nd, lr=lr) if lr is not None else source.push_gradients(
            ids_n, grads_nd)
        self.tensors.clear()  # pushed: a second update() of this fetch sends nothing
        return updated


class _Pinned:
    """A layer's pinned staging buffers (rows bytes, inverse) and the event of the last
    host-to-device copy out of them: they are refilled only once that copy is done."""

    def __init__(self) -> None:
        self.rows = torch.empty(0, dtype=torch.uint8)
        self.inverse = torch.empty(0, dtype=torch.int64)
        self.event: Any = None

    def fill(self, rows: np.ndarray, inverse: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()  # the last copy out of these buffers has left
        if self.rows.numel() < rows.nbytes:
            self.rows = torch.empty(max(rows.nbytes, 2 * self.rows.numel()), dtype=torch.uint8).pin_memory()
        if self.inverse.numel() < inverse.size:
            self.inverse = torch.empty(max(inverse.size, 2 * self.inverse.numel()), dtype=torch.int64).pin_memory()
        r = self.rows[:rows.nbytes]
        r.numpy()[:] = np.ascontiguousarray(rows).view(np.uint8).reshape(-1)
        i = self.inverse[:inverse.size]
        i.numpy()[:] = inverse
        return _host_tensor(r.numpy().view(rows.dtype).reshape(rows.shape)), i


class RemoteMemory:
    """Rows from ``source``: an :class:`~engram_ray.client.EngramClient` or a node's lookup agent
    (:class:`~engram_ray.agent.AgentClient`). ``pin``: CUDA copies read pinned memory -- a lookup
    agent's slots registered in place (cudaHostRegister: no copy on the model's thread), else
    a pinned staging buffer the rows are copied into;
    ``prefetch=False`` fetches on demand (for measuring what prefetching saves).

    ``ordered`` (default): a fetch's layers are looked up one after the other, earliest layer
    first, each once the one before has its rows. The first Engram layer has the least compute
    to hide behind (two blocks of sixteen in the paper's layout); sent alone, its rows do not
    queue behind a later layer's on the memory side, and a later layer still has every block
    in between. Measured with ``engram-ray bench offload --via agent`` on 2 cores: the time
    decode blocks for rows fell from 0.022-0.024 s to 0.015 s a run, serving from 0.080-0.088 s
    to 0.042 s (worker-side staggering; this ordering is done by the client or the agent)."""

    def __init__(self, source: RowSource, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, pin: bool = True, prefetch: bool = True,
                 ordered: bool = True):
        self.source = source
        #: False: fetch each layer's rows only when the layer asks (the no-prefetch baseline).
        self.prefetch = prefetch
        self.ordered = ordered
        self._layout = source.layout
        self.device = torch.device(device)
        self.dtype, self.pin = dtype, pin
        #: The source serves packed FP8 rows (codes + ue8m0 scales): dequantised where they are
        #: used -- on the device after the copy (so the copy moves 264 B a row, not 512), or here.
        self.fp8 = getattr(source, "dtype_name", "") == FP8
        # CUDA: host-to-device copies of rows run on a side stream from pinned buffers, so
        # they overlap the compute stream; the compute stream waits only on that copy's event.
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pinned: dict[int, _Pinned] = {}
        self._events: dict[int, Any] = {}
        #: (copy's event, release) of lent source buffers that copies read in place.
        self._lent: list[tuple[Any, Callable[[], None]]] = []
        #: Inference on the host from a source that expands rows (a lookup agent) stored in the
        #: model's dtype: the layers read the rows in the agent's slots (see lend_host).
        self.lends = (self.copy_stream is None and bool(getattr(source, "expands", False))
                      and TORCH_DTYPES.get(getattr(source, "dtype_name", "")) == dtype)
        pin_slots = getattr(source, "pin_slots", None)
        if self.copy_stream is not None and pin and pin_slots is not None:
            # a lookup agent's slots become pinned memory: rows go to the device from where the
            # agent wrote them, with no copy on the model's thread (a slot that cannot be
            # registered is staged through _Pinned as before)
            pin_slots(self._register, self._unregister)

    @property
    def layout(self) -> TableLayout:
        return self._layout

    def _prefetch(self, row_ids: list[np.ndarray], requires_grad: bool) -> list[Any]:
        """Every layer's lookup asked now, in one hand-over (expanded by the source where the
        rows will be lent, see :attr:`lends`)."""
        if self.lends and not requires_grad:
            expanding: Any = self.source  # a source with ``expands`` takes expand=
            return list(expanding.prefetch_unique_many(row_ids, ordered=self.ordered, expand=True))
        return list(self.source.prefetch_unique_many(row_ids, ordered=self.ordered))

    @staticmethod
    def lend_host(rows_nd: np.ndarray, give_back: Callable[[], None]) -> torch.Tensor:
        """A tensor over rows ``[N, D]`` in the model's dtype that live in a source's buffer
        (an agent slot; no copy), and ``give_back()`` once nothing can read them: torch holds
        the array it was made from until the last tensor over that memory is gone, so a
        finaliser on that array runs then -- after the Engram layer that read them, never
        during it. Why: the gather on the model's thread cost ~60 us a layer in decode and
        ~90 us in serving's prefill chunks on this 2-core box, caches cold from the model's
        compute; the agent's expand runs on the memory side."""
        try:
            return _host_tensor(rows_nd, give_back)
        except BaseException:
            give_back()
            raise

    def expand_host(self, rows_ud: np.ndarray, inverse_n: np.ndarray) -> torch.Tensor:
        """Rows ``[N, D]`` in the model's dtype gathered on the host from unique rows ``[U, D]``
        (storage dtype, e.g. a lent agent slot) and ``inverse [N]``: one gather (FP8 rows are
        dequantised first). The result owns its memory: the source's buffers may go at once."""
        inv = torch.from_numpy(np.asarray(inverse_n, dtype=np.int64))
        if self.fp8:
            values = torch.from_numpy(dequantize_packed(rows_ud, self._layout.row_dim))
        else:
            values = _host_tensor(rows_ud)
        return values.index_select(0, inv).to(self.dtype)

    def stage(self, layer: int, rows_ud: np.ndarray, inverse_n: np.ndarray,
              release: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unique rows ``[U, D]`` (storage dtype) and ``inverse [N]`` -> tensors of their own on
        the model's device (the source's buffers may be reused at once). On CUDA the copy is
        issued on the side stream now; :meth:`ready` makes the compute stream wait for it.
        ``release`` (CUDA): the arrays are in pinned memory the source lent (a registered
        agent slot): the copy reads them there, and ``release()`` runs once it is done."""
        if self.copy_stream is None:
            if self.fp8:  # dequantised into an array of its own: no second copy
                values = torch.from_numpy(dequantize_packed(rows_ud, self._layout.row_dim)).to(self.dtype)
            else:
                values = _host_tensor(rows_ud).to(self.dtype, copy=True)
            return values, torch.from_numpy(np.array(inverse_n, np.int64))
        self._reap()
        if release is not None:
            src_rows, src_inv = _host_tensor(rows_ud), torch.from_numpy(inverse_n)
        elif self.pin:
            buf = self._pinned.setdefault(layer, _Pinned())
            src_rows, src_inv = buf.fill(rows_ud, inverse_n)
        else:
            src_rows, src_inv = _host_tensor(np.array(rows_ud)), torch.from_numpy(np.array(inverse_n, np.int64))
        try:
            with torch.cuda.stream(self.copy_stream):
                dev_rows = src_rows.to(self.device, non_blocking=True)
                dev_inv = src_inv.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
        except BaseException:
            if release is not None:  # a copy may have been queued from the lent buffer
                self.copy_stream.synchronize()
                release()
            raise
        if release is not None:
            self._lent.append((event, release))
        elif self.pin:
            self._pinned[layer].event = event
        self._events[id(dev_rows)] = (event, dev_inv)
        return dev_rows, dev_inv

    def _reap(self) -> None:
        """Give back the lent buffers whose copies are done (an event query does not block)."""
        if self._lent:
            waiting = []
            for event, release in self._lent:
                if event.query():
                    release()
                else:
                    waiting.append((event, release))
            self._lent = waiting

    def _register(self, address: int, nbytes: int) -> bool:
        """cudaHostRegister an agent slot, portable to every device of the process (as torch
        pins shared memory itself): device copies read it directly. False: not registered."""
        try:
            err = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, 1))  # 1: cudaHostRegisterPortable
        except Exception as e:  # noqa: BLE001 - no binding: stage that slot's rows as before
            err, why = -1, str(e)
        else:
            why = f"cudaError {err}"
        if err != 0:
            log.warning("cudaHostRegister of a %d-byte agent slot failed (%s): staging its rows instead", nbytes, why)
        return err == 0

    def _unregister(self, address: int) -> None:
        # every stream of the device: another RemoteMemory on the same agent (its hooks were
        # replaced by ours) may have copies from these pages in flight on its own stream
        torch.cuda.synchronize(self.device)
        err = int(torch.cuda.cudart().cudaHostUnregister(address))
        if err != 0:
            log.warning("cudaHostUnregister of an agent slot failed (cudaError %d)", err)

    def ready(self, rows_ud: torch.Tensor) -> torch.Tensor:
        """Staged rows, usable on the compute stream, in the model's dtype."""
        if self.copy_stream is None:
            return rows_ud
        event, dev_inv = self._events.pop(id(rows_ud))
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)  # the layer waits on the copy, not the host
        rows_ud.record_stream(compute)  # the allocator must not reuse them before compute is done
        dev_inv.record_stream(compute)
        return (self._dequantize(rows_ud) if self.fp8 else rows_ud).to(self.dtype)

    def _dequantize(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed FP8 rows ``[U, D + D/32]`` (uint8, on the device) -> float32 ``[U, D]``: the
        codes viewed as torch's float8_e4m3fn, times 2**(scale - 127) per block of 32."""
        d = self._layout.row_dim
        codes = packed[:, :d].contiguous().view(torch.float8_e4m3fn).to(torch.float32)   # [U, D]
        scales = torch.exp2(packed[:, d:].to(torch.float32) - 127.0)                      # [U, D/32]
        return (codes.view(-1, d // 32, 32) * scales[..., None]).view(-1, d)

    def update(self, fetch: MemoryFetch, lr: float | None = None) -> int:
        """After backward: push the fetch's row gradients to the shards, to be applied at
        ``lr`` (the trainer's schedule; None: the shards' own rate); returns rows updated."""
        if not isinstance(fetch, RemoteFetch) or fetch.memory is not self:
            raise ValueError("RemoteMemory.update: pass a fetch of this memory")
        return fetch.push_gradients(lr)

    def fetch(self, row_ids_lbth: np.ndarray, requires_grad: bool = True) -> RemoteFetch:
        """Start fetching global rows ``[L, B, T, H]`` (int64, host numpy); returns at once."""
        self._reap()  # lent slots whose copies are done serve this fetch, not new ones
        return RemoteFetch(self, np.asarray(row_ids_lbth, dtype=np.int64), requires_grad)

    def fetch_many(self, row_ids: Sequence[np.ndarray], requires_grad: bool = True) -> list[RemoteFetch]:
        """:meth:`fetch` for forwards that run in this order, in one hand-over: with
        ``ordered``, the lookups go out in the order the layers will ask -- every layer of the
        first forward, then of the next -- so a forward that runs later (a serving step's
        decode batch, after its prefill chunks) never slows the rows needed first."""
        arrays = [np.asarray(r, dtype=np.int64) for r in row_ids]
        self._reap()
        if not self.prefetch or not arrays:
            return [self.fetch(a, requires_grad) for a in arrays]
        flat = self._prefetch([layer for a in arrays for layer in a], requires_grad)
        out, k = [], 0
        for a in arrays:
            out.append(RemoteFetch(self, a, requires_grad, pending=list(flat[k:k + len(a)])))
            k += len(a)
        return out
