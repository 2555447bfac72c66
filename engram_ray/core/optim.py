"""Sparse optimisers applied to the rows a batch touched, with state held beside the rows.

Pure numpy, shared by the shards (``store``) and the in-process table (``model.LocalMemory``),
so a step is the same computation wherever the table lives.

Adam keeps ``m``, ``v`` (float32, like the rows) and a step count *per row*: bias correction
uses the row's own count, so a batch split over shards or messages updates exactly as the
whole batch would. The update is ``torch.optim.Adam``'s without weight decay::

    t += 1;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""

from __future__ import annotations

import numpy as np

from ..config import MAX_LR, MIN_LR, OptimizerConfig, lr_error

__all__ = ["SparseOptimizer", "sum_duplicates", "finite_rows", "MAX_LR", "MIN_LR", "lr_error"]



def sum_duplicates(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids ``[U]`` and their summed gradients ``[U, dim]``, for ids ``[n]`` and
    grads ``[n, dim]``: as autograd sums the gradient of a row used twice. Duplicates are
    added in their order of appearance (stable sort), so every side that uses this function
    -- client, shard, LocalMemory -- produces bit-identical sums."""
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    if s.size == 0:
        return s, grads[:0]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    if starts.size == s.size:
        return s, grads[order]
    return s[starts], np.add.reduceat(grads[order], starts, axis=0)


class SparseOptimizer:
    """Optimiser state for ``num_rows`` rows of width ``dim`` and the step that uses it."""

    def __init__(self, config: OptimizerConfig, num_rows: int, dim: int):
        self.config = config
        # Adam's moments [num_rows, dim] and step counts [num_rows]; SGD keeps none (0 rows).
        # np.zeros maps untouched pages lazily: state costs RAM only for rows trained.
        n = num_rows if config.kind == "adam" else 0
        self.m = np.zeros((n, dim), dtype=np.float32)
        self.v = np.zeros((n, dim), dtype=np.float32)
        self.steps = np.zeros(n, dtype=np.int64)

    def state(self) -> dict[str, np.ndarray]:
        if self.config.kind != "adam":
            return {}
        return {"adam_m": self.m, "adam_v": self.v, "adam_steps": self.steps}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if self.config.kind == "adam":
            self.m[...], self.v[...], self.steps[...] = state["adam_m"], state["adam_v"], state["adam_steps"]

    def step(self, w: np.ndarray, local: np.ndarray, g: np.ndarray, lr: float | None = None) -> np.ndarray:
        """New float32 values of rows ``local`` (unique) with current values ``w`` [n, dim]
        and gradients ``g`` [n, dim]; updates the state of those rows."""
        new, state = self.propose(w, local, g, lr)
        self.commit(local, state)
        return new

    def propose(self, w: np.ndarray, local: np.ndarray, g: np.ndarray, lr: float | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The step without touching any state: new float32 values ``[n, dim]`` and the new
        state of rows ``local`` (empty for SGD), for :meth:`commit` once the caller has
        checked them (a shard refuses a step whose values or state would not be finite).
        ``lr``: this step's learning rate (a trainer's schedule); None: the configured one."""
        c = self.config
        rate = np.float32(c.lr if lr is None else lr)
        if c.kind == "none":
            raise ValueError("this table was deployed without an optimiser (optimizer.kind='none'); "
                             "it cannot apply gradients")
        if c.kind == "sgd":
            with np.errstate(over="ignore", invalid="ignore"):
                return w - rate * g, {}
        t = self.steps[local] + 1
        m = np.float32(c.beta1) * self.m[local] + np.float32(1 - c.beta1) * g
        # g*g overflows float32 above |g| ~ 1.8e19: v becomes inf and the row never moves again
        # (its update is m / sqrt(inf) = 0). Callers check the state with :func:`finite_rows`.
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.float32(c.beta2) * self.v[local] + np.float32(1 - c.beta2) * (g * g)
            bc1 = (1.0 - c.beta1 ** t).astype(np.float32)[:, None]
            bc2 = (1.0 - c.beta2 ** t).astype(np.float32)[:, None]
            new = w - rate * (m / bc1) / (np.sqrt(v / bc2) + np.float32(c.eps))
        return new, {"adam_m": m, "adam_v": v, "adam_steps": t}

    def commit(self, local: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Store the state :meth:`propose` computed for rows ``local``."""
        if state:
            self.m[local], self.v[local], self.steps[local] = state["adam_m"], state["adam_v"], state["adam_steps"]


def finite_rows(*arrays: np.ndarray) -> np.ndarray:
    """``[n]`` bool: True where row i of every ``[n, ...]`` array is finite (integer arrays,
    such as Adam's step counts, always are)."""
    ok = np.ones(arrays[0].shape[0], dtype=bool)
    for a in arrays:
        if a.dtype.kind not in "iu":
            ok &= np.isfinite(a.astype(np.float32, copy=False)).reshape(a.shape[0], -1).all(axis=1)
    return ok
