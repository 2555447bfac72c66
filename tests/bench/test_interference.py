"""bench interference: every thread of every load runs on the memory cores (read back from
/proc) and does work, the forward runs on the compute cores, each load's slowdown is paired
with its round's idle run; loads die with a killed benchmark; bad settings are refused."""

import dataclasses
import os
import subprocess
import sys
import time

import pytest

from engram_ray import config as C
from engram_ray.bench import interference
from engram_ray.bench.isolation import descendants

from .orphans import alive, kill_and_expect_none_left

two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to split")


@two_cores
def test_every_load_runs_on_the_memory_cores_does_work_and_is_reported():
    cfg = dataclasses.replace(C.model_tiny(), n_layers=1)
    rep = interference.run(cfg, rounds=2, positions=8, table_gib=0.005, rows=16)  # windows of a few copies
    iso = rep["isolation"]
    assert iso["compute_cores"] and iso["memory_cores"] and not set(iso["compute_cores"]) & set(iso["memory_cores"])
    assert iso["model_thread_cpus"] == iso["compute_cores"]        # read from /proc on the model thread
    assert list(rep["results"]) == list(interference.LOADS) and rep["workload"]["warmup_rounds"] == 1
    idle = rep["results"]["idle"]
    assert idle["slowdown_per_round"] == [0.0, 0.0] and idle["cpus"] == []
    for kind in ("spin", "gather", "stream", "lookup", "decode"):  # lookup: a real shard and client over gRPC
        r = rep["results"][kind]
        assert r["cpus"] == iso["memory_cores"]                    # every thread of every load process
        assert r["rate_per_s"] > 0                                 # it ran while the forward was timed
        assert len(r["runs_s"]) == len(r["slowdown_per_round"]) == 2
        assert r["slowdown_per_round"] == pytest.approx([t / i - 1 for t, i in zip(r["runs_s"], idle["runs_s"])])
    assert rep["results"]["gather"]["gib_per_s"] == pytest.approx(
        rep["results"]["gather"]["rate_per_s"] * 16 * 320 / 2**30)
    # decode: the shards and the agent at the forward's pace, each role's CPU per step counted
    d = rep["results"]["decode"]
    # paced: a step every cadence at most (a timed window of a few steps rounds to whole steps)
    assert d["cadence_ms"] > 0 and d["rate_per_s"] <= 2e3 / d["cadence_ms"]
    assert set(d["cpu_us_per_step"]) == {"shards", "agent", "driver"} and min(d["cpu_us_per_step"].values()) > 0
    assert 0 < d["memory_side_busy"] <= 1 and 0 < d["pace_kept"] <= 2
    assert iso["decode_processes"] == {"driver": 1, "shards": 2, "agent": 1}


@two_cores
def test_a_memory_side_that_dies_while_the_forward_is_timed_fails_the_run_by_name(monkeypatch):
    """Its CPU and slowdown would be wrong, not merely slow: the run says what died. The
    agent is killed right before the last decode measurement's timed forwards (round 1 runs
    decode first, then idle: no later measurement checks), so the check after them must."""
    real, seen, killed = interference.cpu_snapshot, [], []

    def snapshot_then_kill_the_agent(pids):
        snap = real(pids)
        for pid in pids:
            if "engram_ray.agent" in open(f"/proc/{pid}/cmdline").read():
                seen.append(pid)
                if len(seen) == 2:  # round 0's snapshot before its window, then round 1's
                    os.kill(pid, 9)
                    killed.append(pid)
                    deadline = time.monotonic() + 10  # dead before the (short) window ends
                    while alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.01)
        return snap
    monkeypatch.setattr(interference, "cpu_snapshot", snapshot_then_kill_the_agent)
    cfg = dataclasses.replace(C.model_tiny(), n_layers=1)
    with pytest.raises(RuntimeError, match=r"memory side \(agent, pid \d+\) exited with code -9"):
        interference.run(cfg, rounds=1, positions=2, table_gib=0.005, loads=("idle", "decode"))
    assert killed


@two_cores
def test_a_killed_benchmark_leaves_no_load_running():
    code = ("import dataclasses\nfrom engram_ray import config as C\nfrom engram_ray.bench import interference\n"
            "if __name__ == '__main__':\n"
            "    interference.run(dataclasses.replace(C.model_tiny(), n_layers=1), rounds=1000, positions=2,\n"
            "                     loads=('idle', 'spin'))\n")
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        kids: list[int] = []
        deadline = time.monotonic() + 60
        while not kids and time.monotonic() < deadline:
            time.sleep(0.2)
            kids = descendants(p.pid)
        assert kids, "no load process started"
        kill_and_expect_none_left(p, kids, "a load", within_s=10)
    finally:
        p.kill()


@pytest.mark.parametrize("kwargs, message", [
    ({"loads": ("spin",)}, "with 'idle'"),
    ({"loads": ("idle", "disk")}, "expected distinct kinds"),
    ({"loads": ("idle", "idle")}, "expected distinct kinds"),
    ({"positions": 10_000}, "max_seq_len"),
    ({"rounds": 0}, "rounds=0"),
    ({"row_bytes": 322}, "row_bytes=322"),
    ({"rows": 0}, "rows=0"),
    ({"table_gib": 1e6}, "table_gib=1000000.0"),
    ({"cadence_ms": 0}, "cadence_ms=0"),
    ({"cadence_ms": float("inf")}, "cadence_ms=inf"),
    ({"cadence_ms": 1e6}, "at most 10,000 ms"),
])
@two_cores
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        interference.run(C.model_tiny(), **kwargs)


def test_one_core_is_refused(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    with pytest.raises(ValueError, match="needs at least 2 cores"):
        interference.run(C.model_tiny())
