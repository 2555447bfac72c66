"""Core isolation of bench offload, checked from /proc/<pid>/status and /proc/<pid>/task/*/status.

The pinning runs in a child interpreter: it changes the affinity of a whole process, which
must not leak into the test session."""

import json
import os
import subprocess
import sys

import pytest

from engram_ray.bench import isolation
from engram_ray.bench.isolation import (
    Isolation,
    cores_busy_s,
    cpus_allowed,
    descendants,
    parse_cpulist,
    smt_siblings,
)

SCRIPT = r"""
import json, subprocess, sys, threading, time
import torch
from engram_ray.bench.isolation import Isolation
iso = Isolation.split()
iso.memory_side()                       # before anything starts: Ray, the client's thread, shards
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
io = threading.Thread(target=time.sleep, args=(60,), name="engram-client-io", daemon=True)
io.start()
def work():
    x = torch.randn(256, 256)
    for _ in range(20):
        x = (x @ x).tanh()               # torch's pool threads start here, on the model thread
    return iso.record()
rec = iso.run_model(work)
print(json.dumps({"child": child.pid, "io": io.native_id, "record": rec}), flush=True)
sys.stdin.read()                        # stay alive while the test reads /proc
child.kill()
"""


def test_cpulist_parsing():
    assert parse_cpulist("0-2,5,7-8\n") == [0, 1, 2, 5, 7, 8] and parse_cpulist("3") == [3]


def test_this_process_reads_back_its_own_cores():
    assert cpus_allowed(os.getpid()) == sorted(os.sched_getaffinity(0))
    assert descendants(os.getpid()) == [] or all(p > 0 for p in descendants(os.getpid()))


@pytest.mark.parametrize("siblings, memory", [
    # 16 threads on 8 cores, pairs (i, i + 8): the memory side takes whole pairs, never half of one
    ({c: sorted({c % 8, c % 8 + 8}) for c in range(16)}, [6, 7, 14, 15]),
    # adjacent pairs (0, 1), (2, 3), ...
    ({c: [c - c % 2, c - c % 2 + 1] for c in range(16)}, [12, 13, 14, 15]),
    # no SMT: the last quarter
    ({c: [c] for c in range(16)}, [12, 13, 14, 15]),
])
def test_split_keeps_hardware_threads_of_a_core_on_one_side(monkeypatch, siblings, memory):
    monkeypatch.setattr(isolation.os, "sched_getaffinity", lambda pid: set(range(16)))
    iso = Isolation.split(siblings=siblings)
    assert iso.memory == memory and iso.compute == sorted(set(range(16)) - set(memory))
    assert not any(m in siblings[c] for c in iso.compute for m in iso.memory)


def test_split_by_thread_when_every_core_is_one_physical_core(monkeypatch):
    monkeypatch.setattr(isolation.os, "sched_getaffinity", lambda pid: {0, 1})
    iso = Isolation.split(siblings={0: [0, 1], 1: [0, 1]})
    assert iso.compute == [0] and iso.memory == [1]
    # a pair larger than a quarter asked: the memory side rounds up to the pair, compute keeps the rest
    monkeypatch.setattr(isolation.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert Isolation.split(siblings={0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}).memory == [2, 3]


@pytest.mark.parametrize("avail, siblings, k, memory", [
    # asymmetric lists (core 0 names 1, 1 names only itself): one core all the same, no duplicates
    ({0, 1, 2, 3}, {0: [0, 1], 1: [1], 2: [2, 3], 3: [3]}, 2, [2, 3]),
    # SMT4, 2 cores: half the machine at most, never more than compute
    (set(range(8)), {c: list(range(c - c % 4, c - c % 4 + 4)) for c in range(8)}, None, [4, 5, 6, 7]),
    # a wide core that would outgrow compute is skipped for narrower ones
    (set(range(6)), {0: [0], 1: [1], 2: [2, 3, 4, 5], 3: [2, 3, 4, 5], 4: [2, 3, 4, 5], 5: [2, 3, 4, 5]}, 1, [1]),
    # siblings outside the affinity mask are ignored
    ({0, 1, 2, 3}, {0: [0, 8], 1: [1, 9], 2: [2, 10], 3: [3, 11]}, 1, [3]),
])
def test_split_edge_cases(monkeypatch, avail, siblings, k, memory):
    monkeypatch.setattr(isolation.os, "sched_getaffinity", lambda pid: avail)
    iso = Isolation.split(memory_cores=k, siblings=siblings)
    assert iso.memory == memory and sorted(iso.compute + iso.memory) == sorted(avail)


def test_smt_siblings_of_this_machine_include_each_core():
    sib = smt_siblings(sorted(os.sched_getaffinity(0)))
    assert all(c in s for c, s in sib.items())


def test_disabled_or_single_core_pins_nothing():
    iso = Isolation.split(enabled=False)
    assert not iso.enabled and iso.compute == iso.memory == sorted(os.sched_getaffinity(0))
    assert iso.run_model(lambda: 7) == 7 and iso.record()["ok"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to split")
def test_model_thread_on_compute_cores_everything_else_on_memory_cores():
    p = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        line = json.loads(p.stdout.readline())
        rec = line["record"]
        compute, memory = rec["compute_cores"], rec["memory_cores"]
        assert rec["enabled"] and compute and memory and not set(compute) & set(memory)
        # what the kernel enforces, read from /proc: the child process, the I/O thread, the main thread
        assert cpus_allowed(line["child"]) == memory
        assert cpus_allowed(p.pid, line["io"]) == memory and cpus_allowed(p.pid, p.pid) == memory
        # and as the bench records it: the model thread and its torch pool on the compute cores
        assert rec["model_thread"]["cpus"] == compute and rec["ok"]
        assert rec["sides"]["compute"] >= len(compute)  # the model thread + its OpenMP team
        assert [x["cpus"] for x in rec["processes"] if x["pid"] == line["child"]] == [memory]
        io = [t for t in rec["threads"] if t["tid"] == line["io"]]
        assert io and io[0]["name"] == "engram-client-io" and io[0]["side"] == "memory"
    finally:
        p.stdin.close()
        p.wait(timeout=60)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to split")
def test_restore_gives_every_thread_its_cores_back():
    code = ("import os, threading, time\n"
            "from engram_ray.bench.isolation import Isolation, cpus_allowed\n"
            "iso = Isolation.split(); before = sorted(os.sched_getaffinity(0))\n"
            "iso.memory_side(); t = threading.Thread(target=time.sleep, args=(5,), daemon=True); t.start()\n"
            "assert cpus_allowed(os.getpid(), t.native_id) == iso.memory\n"
            "iso.restore()\n"
            "assert cpus_allowed(os.getpid(), t.native_id) == before == sorted(os.sched_getaffinity(0))\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]


def test_cores_busy_seconds_sum_the_busy_fields_of_the_cores_asked(tmp_path):
    stat = tmp_path / "stat"
    #            user nice system idle iowait irq softirq steal
    stat.write_text("cpu  900 0 900 9000 0 0 0 0 0 0\n"
                    "cpu0 100 10 200 5000 70 3 4 500 0 0\n"
                    "cpu1 7 0 1 4000 0 0 0 0 0 0\n"
                    "intr 1 2 3\n")
    tick = os.sysconf("SC_CLK_TCK")
    assert cores_busy_s([0], str(stat)) == pytest.approx((100 + 10 + 200 + 3 + 4) / tick)  # not idle, iowait, steal
    assert cores_busy_s([0, 1], str(stat)) == pytest.approx((317 + 8) / tick)
    assert cores_busy_s([5], str(stat)) is None  # no such core: no figure, not 0
    assert cores_busy_s([0, 5], str(stat)) is None
    assert cores_busy_s([0], str(tmp_path / "missing")) is None


def test_cores_busy_seconds_grow_with_work_on_those_cores():
    import time
    cores = sorted(os.sched_getaffinity(0))
    before, t = cores_busy_s(cores), time.perf_counter()
    while time.perf_counter() - t < 0.3:
        pass
    assert cores_busy_s(cores) - before >= 0.2
