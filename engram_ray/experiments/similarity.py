"""Linear CKA between the layers of two models, and the paper's soft alignment index.

Linear CKA (Kornblith et al., 2019) of representations ``X [N, p]`` and ``Y [N, q]`` of the
same ``N`` tokens, each column centred::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)        in [0, 1]

It is 1 for ``Y = X``, and unchanged by an orthogonal transform or an isotropic scaling of
either side, so two models' layers compare even though their bases differ.

The paper reads a CKA matrix ``S[i, j]`` (row ``i``: a layer of the MoE model; column ``j``: a
layer of the Engram model) through a soft alignment index per Engram layer::

    a_j = sum_{i in I_j} S[i, j] * i / sum_{i in I_j} S[i, j]      I_j: the top-k rows of column j

``a_j > j`` says Engram's layer ``j`` looks like a *deeper* MoE layer: it reached that
representation earlier (the paper's "Engram deepens the network" finding). Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["linear_cka", "cka_matrix", "soft_alignment"]


def linear_cka(x_np: np.ndarray, y_nq: np.ndarray) -> float:
    """Linear CKA of two representations of the same ``N`` tokens (float64 inside)."""
    if x_np.ndim != 2 or y_nq.ndim != 2 or x_np.shape[0] != y_nq.shape[0]:
        raise ValueError(f"linear_cka: expected [N, p] and [N, q] of the same N; got {x_np.shape} and {y_nq.shape}")
    if x_np.shape[0] < 2:
        raise ValueError(f"linear_cka: needs at least 2 tokens; got N={x_np.shape[0]}")
    x = x_np.astype(np.float64) - x_np.mean(axis=0, dtype=np.float64)
    y = y_nq.astype(np.float64) - y_nq.mean(axis=0, dtype=np.float64)
    # the feature-space form: p x q products instead of N x N Gram matrices (N >> p here)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if norm == 0.0:
        raise ValueError("linear_cka: a representation is constant over the tokens")
    return float(cross / norm)


def cka_matrix(states_a: Sequence[np.ndarray], states_b: Sequence[np.ndarray]) -> np.ndarray:
    """``S [len(a), len(b)]``: linear CKA of every layer of model a against every layer of b
    (each a list of ``[N, D]`` states of the same tokens)."""
    return np.array([[linear_cka(a, b) for b in states_b] for a in states_a])


def soft_alignment(s_ij: np.ndarray, k: int) -> np.ndarray:
    """Per column ``j`` of ``S [I, J]``, the CKA-weighted mean row index of its top-``k`` rows
    (``k`` is clipped to the rows there are)."""
    if s_ij.ndim != 2 or k < 1:
        raise ValueError(f"soft_alignment: expected a 2-D matrix and k >= 1; got shape {s_ij.shape}, k={k}")
    k = min(k, s_ij.shape[0])
    top = np.argsort(-s_ij, axis=0, kind="stable")[:k]            # [k, J] row indices
    w = np.take_along_axis(s_ij, top, axis=0)
    return (w * top).sum(axis=0) / w.sum(axis=0)
