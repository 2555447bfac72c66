"""``RemoteMemory``: the model's :class:`~engram_ray.model.memory.Memory` backed by the
memory service.

``fetch(row_ids)`` issues one prefetch per Engram layer at once, so layer i's rows travel
while the blocks before it compute, and ``rows(i)`` waits only for layer i. After backward,
``update(fetch)`` sends the rows' gradients to the shards, deduplicated, where the sparse
optimiser applies them. For the same table and batch this equals ``LocalMemory`` (tested).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..client import EngramClient, Prefetch
from ..core.layout import TableLayout
from ..model.memory import MemoryFetch, layer_gradients

__all__ = ["RemoteMemory", "RemoteFetch"]


def _host_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype.name == "bfloat16":  # ml_dtypes: reinterpret the bits
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


class RemoteFetch:
    """One batch's rows from the service: a :class:`~engram_ray.model.memory.MemoryFetch`."""

    def __init__(self, memory: RemoteMemory, row_ids_lbth: np.ndarray, requires_grad: bool):
        self.memory, self.row_ids = memory, row_ids_lbth
        self.requires_grad = requires_grad
        # prefetch: every layer's rows go out now; on demand: each when its layer asks.
        self.pending: list[Prefetch | None] = (
            list(memory.client.prefetch_many(list(row_ids_lbth))) if memory.prefetch
            else [None] * len(row_ids_lbth))
        self.tensors: dict[int, torch.Tensor] = {}
        #: Time spent blocked in rows(): the part of the fetch not hidden behind compute.
        self.wait_seconds = 0.0

    @property
    def fetch_seconds(self) -> float:
        """Issue-to-arrival time of the slowest layer's rows (0 until all arrived)."""
        secs = [p.fetch_seconds if p is not None else None for p in self.pending]
        arrived = [x for x in secs if x is not None]
        return max(arrived, default=0.0) if len(arrived) == len(secs) else 0.0

    def rows(self, layer_index: int) -> torch.Tensor:
        t0 = time.perf_counter()
        pending = self.pending[layer_index]
        if pending is None:  # on demand: this layer's rows go out only now
            pending = self.pending[layer_index] = self.memory.client.prefetch(self.row_ids[layer_index])
        arr = pending.result(timeout=self.memory.client.timeout * 4)     # [B, T, H, r]
        self.wait_seconds += time.perf_counter() - t0
        t = self.memory.to_device(_host_tensor(arr)).to(self.memory.dtype)
        if self.requires_grad:
            t.requires_grad_(True)
        self.tensors[layer_index] = t
        return t.flatten(-2)

    def push_gradients(self) -> int:
        """Send d(loss)/d(rows) of every layer used to the shards, once; returns rows updated."""
        ids, grads = layer_gradients(self.row_ids, self.tensors)
        if ids.size == 0:
            return 0
        updated = self.memory.client.push_gradients(ids, grads)
        self.tensors.clear()  # pushed: a second update() of this fetch sends nothing
        return updated


class RemoteMemory:
    """Rows from an :class:`EngramClient`. ``pin``: stage CUDA copies in pinned memory;
    ``prefetch=False`` fetches on demand (for measuring what prefetching saves)."""

    def __init__(self, client: EngramClient, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, pin: bool = True, prefetch: bool = True):
        self.client = client
        #: False: fetch each layer's rows only when the layer asks (the no-prefetch baseline).
        self.prefetch = prefetch
        self._layout = client.layout
        self.device = torch.device(device)
        self.dtype, self.pin = dtype, pin
        # CUDA: host-to-device copies of rows run on a side stream from pinned buffers, so
        # they overlap the compute stream; the compute stream waits only for that copy.
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def layout(self) -> TableLayout:
        return self._layout

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host rows -> the model's device (pinned, non-blocking, on the copy stream)."""
        if self.copy_stream is None:
            return t
        src = t.pin_memory() if self.pin else t
        with torch.cuda.stream(self.copy_stream):
            out = src.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.copy_stream)
        out.record_stream(compute)  # the allocator must not reuse it before compute is done
        return out

    def update(self, fetch: MemoryFetch) -> int:
        """After backward: push the fetch's row gradients to the shards; returns rows updated."""
        if not isinstance(fetch, RemoteFetch) or fetch.memory is not self:
            raise ValueError("RemoteMemory.update: pass a fetch of this memory")
        return fetch.push_gradients()

    def fetch(self, row_ids_lbth: np.ndarray, requires_grad: bool = True) -> RemoteFetch:
        """Start fetching global rows ``[L, B, T, H]`` (int64, host numpy); returns at once."""
        return RemoteFetch(self, np.asarray(row_ids_lbth, dtype=np.int64), requires_grad)
