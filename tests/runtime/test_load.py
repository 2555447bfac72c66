"""A bounded load test: 15,625 lookups (1M row ids) at concurrency 32 against a deployed
service: no errors, and neither the client's nor the shards' memory grows."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_million_ids_at_concurrency_32(tmp_path):
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "bench", "load", "--preset", "tiny",
                        "--ids", "1000000", "--batch", "64", "--concurrency", "32", "--out", str(out)],
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["lookups"] == 15_625 and rep["ids"] == 1_000_000 and rep["concurrency"] == 32
    assert rep["errors"] == 0 and rep["client_errors"] == 0
    # flat: under 5 % growth from the end of warm-up to the end (RSS is a few hundred MiB
    # here, so a leak of ~1 KB per lookup would fail this)
    assert rep["memory"]["client_rss_growth"] < 0.05 and rep["memory"]["shard_rss_growth"] < 0.05
    assert len(rep["samples"]) >= 10 and out.with_suffix(".png").exists()
    print(f"load: {rep['lookups_per_s']:,.0f} lookups/s, p99 {rep['latency_p99_ms']:.1f} ms, "
          f"memory growth {rep['memory']}")


def test_bench_recovery_reports_both_replica_counts(tmp_path):
    out = tmp_path / "recovery.json"
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "bench", "recovery", "--preset", "tiny",
                        "--out", str(out)], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert [x["replicas"] for x in rep["results"]] == [1, 2]
    one, two = rep["results"]
    assert "ckpt-00000001" in one["rows_from"] and two["rows_from"].startswith("replica 1 at ")
    assert two["stream_failures"] == 0  # the other copy served every lookup
    assert all(x["copy_serving_again_s"] > 0 for x in rep["results"])
