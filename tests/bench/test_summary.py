"""The offload bench's statistics: paired per-repetition losses."""

import pytest

from engram_ray.bench.summary import MODES, paired_overhead


def test_paired_overhead_pairs_modes_within_each_repetition():
    # a machine that slows down over the run: medians of each mode taken apart blur it, the
    # ratio within each repetition does not (remote is 2 % slower in every repetition)
    local = [1.0, 1.5, 2.0, 2.5, 3.0]
    times = {m: {"decode": list(local)} for m in MODES}
    times["remote"]["decode"] = [t * 1.02 for t in local]
    times["remote_lazy"]["decode"] = [t * 1.10 for t in local]
    out = paired_overhead(times, ["decode"])
    p = out["decode:remote_vs_local"]
    assert p["median"] == pytest.approx(1 - 1 / 1.02)
    assert p["min"] == pytest.approx(p["max"])  # the same loss each time: no spread
    assert out["decode:remote_lazy_vs_local"]["median"] == pytest.approx(1 - 1 / 1.10)
    assert out["decode:local_vs_no_engram"]["median"] == pytest.approx(0.0)
