"""Where the model gets Engram rows from: the memory seam.

A :class:`Memory` turns the global row ids of a batch (``[L, B, T, H]``, from
``core.indexer.RowIndexer``) into a :class:`MemoryFetch`; the Engram layer at Engram-layer
index ``i`` asks the fetch for ``rows(i)``. After backward, ``memory.update(fetch)`` applies
the gradient the fetch's rows received (a sparse-optimiser step on exactly those rows).

The caller starts the fetch before the forward pass (the ids depend only on the tokens), so a
remote memory has the whole of block 0.. to move the rows; ``rows(i)`` waits only for what has
not arrived. ``LocalMemory`` is the in-process table; ``RemoteMemory`` (in
``engram_ray.runtime``, since it talks to the service) satisfies the same protocols, so the
model and the trainer never import a client. Both step their rows with the same numpy
optimiser (``core.optim``), so the same batch gives the same table either way (tested).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn

from ..config import OptimizerConfig
from ..core.layout import TableLayout
from ..core.optim import SparseOptimizer, lr_error, sum_duplicates
from ..core.rows import init_rows_f32

__all__ = ["Memory", "MemoryFetch", "LocalMemory", "LocalFetch", "layer_gradients"]


@runtime_checkable
class MemoryFetch(Protocol):
    """The rows of one batch, per Engram layer, as they arrive."""

    @property
    def wait_seconds(self) -> float:
        """Seconds blocked in :meth:`rows` so far: the part of the fetch not hidden behind
        compute (for a local table, the gathers themselves)."""
        ...

    @property
    def fetch_seconds(self) -> float:
        """Issue-to-arrival time of the slowest layer's rows; 0 until all arrived, and 0 for
        a local table (nothing travels)."""
        ...

    def rows(self, layer_index: int) -> torch.Tensor:
        """Rows of Engram layer ``layer_index`` (position in ``layout.layer_ids``), as
        ``[B, T, H*row_dim]``; a leaf that requires grad when the fetch was made for training."""
        ...


@runtime_checkable
class Memory(Protocol):
    """A table of Engram rows the model can read and train."""

    @property
    def layout(self) -> TableLayout:
        """The table's layout: the row ids it accepts (build the ``RowIndexer`` against it)."""
        ...

    def fetch(self, row_ids_lbth: np.ndarray, requires_grad: bool = True) -> MemoryFetch:
        """Start fetching global rows ``[L, B, T, H]`` (int64, host numpy); returns at once."""
        ...

    def fetch_many(self, row_ids: Sequence[np.ndarray], requires_grad: bool = True) -> Sequence[MemoryFetch]:
        """:meth:`fetch` for several forwards that will run in this order (e.g. a serving
        step's prefill chunks, then its decode batch): a remote memory sends their layers'
        lookups in the order the layers will ask."""
        ...

    def update(self, fetch: MemoryFetch, lr: float | None = None) -> int:
        """After backward: one sparse-optimiser step on the rows ``fetch`` read, with the
        gradient they received, at learning rate ``lr`` (a trainer's schedule; None: the
        table's configured rate). Returns the number of distinct rows updated."""
        ...


def layer_gradients(row_ids_lbth: np.ndarray, tensors: dict[int, torch.Tensor]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Row ids ``[n]`` and float32 gradients ``[n, row_dim]`` of every layer's rows that got a
    gradient, in layer order then lookup order (duplicates kept: the optimiser sums them)."""
    ids, grads = [], []
    for li, t in sorted(tensors.items()):
        if t.grad is not None:
            ids.append(row_ids_lbth[li].reshape(-1))
            grads.append(t.grad.float().cpu().numpy().reshape(ids[-1].size, -1))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(ids), np.concatenate(grads)


class LocalFetch:
    """Rows gathered from a :class:`LocalMemory`'s table, one leaf tensor per layer asked."""

    def __init__(self, memory: LocalMemory, row_ids_lbth: np.ndarray, requires_grad: bool):
        self.memory, self.row_ids = memory, row_ids_lbth
        self.requires_grad = requires_grad
        # Ids on the table's device once, for the gathers; self.row_ids stays host numpy for
        # update(), like RemoteFetch's.
        self._ids = torch.as_tensor(memory.resident_ids(row_ids_lbth), device=memory.table.device)
        #: Each layer's rows as handed out; their .grad is what update() applies.
        self.tensors: dict[int, torch.Tensor] = {}
        self.wait_seconds = 0.0
        self.fetch_seconds = 0.0  # nothing travels

    def rows(self, layer_index: int) -> torch.Tensor:
        t0 = time.perf_counter()
        # A gathered copy, not a view through autograd: its gradient is this fetch's alone, and
        # update() steps it with the shards' optimiser, exactly as RemoteFetch's rows.
        e = self.memory.table.detach()[self._ids[layer_index]]          # [B, T, H, row_dim]
        if self.requires_grad:
            e.requires_grad_(True)
        self.tensors[layer_index] = e
        self.wait_seconds += time.perf_counter() - t0
        return e.flatten(-2)


class LocalMemory(nn.Module):
    """The whole table as one tensor ``[total_rows, row_dim]`` in this process, initialised
    exactly like the shards (same seed, same rows) and stepped by the same sparse optimiser,
    so local and remote runs compare."""

    def __init__(self, layout: TableLayout, *, init_std: float = 1.0, init_seed: int = 0,
                 optimizer: OptimizerConfig = OptimizerConfig(), resident_rows: int = 0):
        super().__init__()
        self._layout = layout
        #: Benchmarks only: keep this many rows and read row r as r mod resident_rows (lookups
        #: only: a capped table refuses updates, as a capped shard does).
        self.resident_rows = min(resident_rows, layout.total_rows) if resident_rows else layout.total_rows
        values = init_rows_f32(0, self.resident_rows, layout.row_dim, seed=init_seed, std=init_std)
        # Stepped by the sparse optimiser in update(), never by autograd.
        self.table = nn.Parameter(torch.from_numpy(values), requires_grad=False)
        self.optimizer = SparseOptimizer(optimizer, self.resident_rows, layout.row_dim)

    @property
    def layout(self) -> TableLayout:
        return self._layout

    def resident_ids(self, row_ids: np.ndarray) -> np.ndarray:
        """Positions in the table of global ``row_ids``: the ids, or their residue when capped."""
        ids = np.asarray(row_ids, dtype=np.int64)
        return ids % self.resident_rows if self.resident_rows < self._layout.total_rows else ids

    def fetch(self, row_ids_lbth: np.ndarray, requires_grad: bool = True) -> LocalFetch:
        """Rows of global ids ``[L, B, T, H]`` (host numpy), gathered as each layer asks."""
        return LocalFetch(self, np.asarray(row_ids_lbth, dtype=np.int64), requires_grad)

    def fetch_many(self, row_ids: Sequence[np.ndarray], requires_grad: bool = True) -> list[MemoryFetch]:
        """:meth:`fetch` of each (nothing travels: there is no order to keep)."""
        return [self.fetch(r, requires_grad) for r in row_ids]

    @torch.no_grad()
    def update(self, fetch: MemoryFetch, lr: float | None = None) -> int:
        """After backward: step the rows ``fetch`` read with their gradients (the numpy code
        the shards run) at ``lr`` (None: the configured rate). Returns rows updated; 0 for a
        fetch made without gradients."""
        if lr is not None and lr_error(lr):
            raise ValueError(lr_error(lr))
        if not isinstance(fetch, LocalFetch) or fetch.memory is not self:
            raise ValueError("LocalMemory.update: pass a fetch of this memory")
        ids, grads = layer_gradients(fetch.row_ids, fetch.tensors)
        if ids.size == 0:
            return 0
        if self.resident_rows < self._layout.total_rows:
            raise ValueError("a capped LocalMemory (resident_rows) is for benchmarks: lookups only")
        uniq, summed = sum_duplicates(ids, grads)
        if self.table.device.type == "cpu":
            table = self.table.data.numpy()
            table[uniq] = self.optimizer.step(table[uniq], uniq, summed, lr)
        else:  # on an accelerator: step a host copy of the touched rows
            at = torch.as_tensor(uniq, device=self.table.device)
            new = self.optimizer.step(self.table.data[at].float().cpu().numpy(), uniq, summed, lr)
            self.table.data[at] = torch.as_tensor(new, device=self.table.device)
        fetch.tensors.clear()  # applied: a second update() of this fetch is a no-op
        return int(uniq.size)
