"""Where the model gets Engram rows from: a *memory* turns the row ids of a batch into a
*fetch*, and the Engram layer at Engram-layer index ``i`` asks the fetch for ``rows(i)``.

The caller starts the fetch before the forward pass (the ids depend only on the tokens), so a
remote memory has the whole of block 0.. to move the rows; ``rows(i)`` waits only for what has
not arrived. ``LocalMemory`` is the in-process table trained by autograd; ``RemoteMemory``
(in ``engram_ray.runtime``, since it talks to the service) has the same interface, so the
model never imports a client.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import OptimizerConfig
from ..core.layout import TableLayout
from ..core.optim import SparseOptimizer, sum_duplicates
from ..core.rows import init_rows_f32

__all__ = ["MemoryFetch", "LocalMemory", "LocalFetch"]


class MemoryFetch(Protocol):
    #: Seconds spent waiting in rows() for rows that had not arrived (0 for a local table).
    wait_seconds: float

    def rows(self, layer_index: int) -> torch.Tensor:
        """Rows of Engram layer ``layer_index`` (position in ``layout.layer_ids``), as
        ``[B, T, H*row_dim]``."""
        ...


class LocalFetch:
    def __init__(self, memory: "LocalMemory", row_ids_lbth: torch.Tensor):
        self.memory, self.row_ids = memory, row_ids_lbth
        self.wait_seconds = 0.0

    def rows(self, layer_index: int) -> torch.Tensor:
        t0 = time.perf_counter()
        ids = self.row_ids[layer_index]                                   # [B, T, H]
        if self.memory.resident_rows < self.memory.layout.total_rows:
            ids = ids % self.memory.resident_rows                         # capped (benchmarks)
        # sparse=True: the gradient touches only the looked-up rows, as on the shards.
        e = F.embedding(ids, self.memory.table, sparse=True)              # [B, T, H, row_dim]
        self.wait_seconds += time.perf_counter() - t0
        return e.flatten(-2)


class LocalMemory(nn.Module):
    """The whole table as one trainable parameter ``[total_rows, row_dim]``, initialised
    exactly like the shards (same seed, same rows), so local and remote runs compare."""

    def __init__(self, layout: TableLayout, *, init_std: float = 1.0, init_seed: int = 0,
                 optimizer: OptimizerConfig = OptimizerConfig(), resident_rows: int = 0):
        super().__init__()
        self.layout = layout
        #: Benchmarks: keep only this many rows and map row r to r mod resident_rows.
        self.resident_rows = min(resident_rows, layout.total_rows) if resident_rows else layout.total_rows
        values = init_rows_f32(0, self.resident_rows, layout.row_dim, seed=init_seed, std=init_std)
        self.table = nn.Parameter(torch.from_numpy(values))
        self.optimizer = SparseOptimizer(optimizer, self.resident_rows, layout.row_dim)

    @torch.no_grad()
    def apply_gradients(self) -> int:
        """One step of the shards' sparse optimiser on the rows the last backward touched
        (the same numpy code the shards run); clears the gradient. Returns rows updated."""
        grad = self.table.grad
        if grad is None:
            return 0
        if self.resident_rows < self.layout.total_rows:
            raise ValueError("a capped LocalMemory (resident_rows) is for benchmarks: lookups only")
        self.table.grad = None
        if not grad.is_sparse:
            raise ValueError("LocalMemory expects the sparse gradient of its lookups")
        # uncoalesced: one entry per looked-up row, in lookup order (as RemoteMemory pushes)
        ids = grad._indices()[0].cpu().numpy()
        g = grad._values().float().cpu().numpy()
        uniq, summed = sum_duplicates(ids, g)
        table = self.table.data.cpu().numpy() if self.table.device.type == "cpu" else None
        if table is None:  # on an accelerator: step a host copy of the touched rows
            w = self.table.data[torch.as_tensor(uniq)].float().cpu().numpy()
            new = self.optimizer.step(w, uniq, summed)
            self.table.data[torch.as_tensor(uniq)] = torch.as_tensor(new, device=self.table.device)
        else:
            table[uniq] = self.optimizer.step(table[uniq], uniq, summed)
        return int(uniq.size)

    def update(self, fetch: LocalFetch) -> int:
        """After backward: step the rows the fetch read (same call as RemoteMemory.update)."""
        return self.apply_gradients()

    def fetch(self, row_ids_lbth, requires_grad: bool = True) -> LocalFetch:
        """``row_ids_lbth``: global row ids ``[L, B, T, H]`` (numpy or tensor)."""
        return LocalFetch(self, torch.as_tensor(row_ids_lbth, dtype=torch.long, device=self.table.device))
