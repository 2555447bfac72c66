"""The small statistics every experiment report shares: a mean with its standard error, and
whether a difference between two means lies outside its 95 % interval (Student's t).

At CPU scale the seeds are few (2 by default: 1 degree of freedom, t = 12.7), so intervals are
wide; a difference inside its interval is reported as such, not tuned away.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["t95", "mean_se", "compare", "interval_text"]

#: Student's t, two-sided 95 %, by degrees of freedom (the next lower row is used: conservative).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t95(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` degrees of freedom (the table's row at or
    below ``df``, so at least the true value; 1.98 from 120 on)."""
    if df < 1:
        return float("inf")
    return _T95[max(k for k in _T95 if k <= df)]


def mean_se(values: Any) -> tuple[float, float, int]:
    """Mean, standard error and degrees of freedom of independent samples (se 0, df 0 for one)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_se: no values")
    if v.size == 1:
        return float(v[0]), 0.0, 0
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)), int(v.size - 1)


def compare(a: float, a_se: float, a_df: int, b: float, b_se: float, b_df: int) -> dict[str, Any]:
    """``a - b`` with the combined standard error, its 95 % half-interval (t at the fewer
    degrees of freedom; None with none) and whether the difference lies outside it. To test
    one mean against 0, pass ``b = b_se = 0`` and ``b_df = a_df``."""
    diff = a - b
    se = float(np.hypot(a_se, b_se))
    t = t95(min(a_df, b_df))
    if not np.isfinite(t):  # no degrees of freedom: no interval, no verdict (None: JSON has no inf)
        return {"diff": float(diff), "se": se, "ci95": None, "exceeds_noise": False}
    half = t * se
    return {"diff": float(diff), "se": se, "ci95": half, "exceeds_noise": bool(se > 0 and abs(diff) > half)}


def interval_text(c: dict[str, Any], digits: int = 4) -> str:
    """``"+0.1234 +- 0.5000 (within the noise)"`` for a :func:`compare` result."""
    if c["ci95"] is None:
        return f"{c['diff']:+.{digits}f} (no interval: one sample)"
    return (f"{c['diff']:+.{digits}f} +- {c['ci95']:.{digits}f} "
            f"({'beyond' if c['exceeds_noise'] else 'within'} the noise)")
