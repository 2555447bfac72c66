"""bench.memory_side: shards and a lookup agent as plain processes, pinned where asked, serving
the rows an in-process client reads, and gone when the block ends or the benchmark is killed."""

import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from engram_ray.bench.isolation import descendants, process_cpus
from engram_ray.bench.memory_side import cpu_seconds_between, cpu_snapshot, plain_memory_side

from .orphans import alive, kill_and_expect_none_left

two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to split")


@pytest.fixture(scope="module")
def layout_100b():
    from engram_ray.config import table_100b
    from engram_ray.core.layout import TableLayout
    from engram_ray.data import default_vocab
    return TableLayout.build(table_100b(), default_vocab())


@two_cores
def test_the_memory_side_serves_on_its_cores_and_leaves_nothing(layout_100b):
    from engram_ray.agent import AgentClient
    from engram_ray.client import EngramClient
    memory = [sorted(os.sched_getaffinity(0))[-1]]
    with plain_memory_side("table_100b", 2, memory, 0.002, layout=layout_100b) as side:
        pids = side.pids["shards"] + side.pids["agent"]
        assert len(side.pids["shards"]) == 2 and len(side.addresses) == 2
        ids = np.array([5, 9, 5, layout_100b.total_rows - 1])  # both shards
        with EngramClient(side.addresses, layout_100b) as client, \
                AgentClient(side.socket, layout_100b, start=lambda: None, connect_timeout=60) as agent:
            want = client.lookup(ids)
            f = agent.prefetch_unique(ids)
            got = f.result(30)
            assert np.array_equal(got.expand().view(np.uint8), want.view(np.uint8))
            f.release()
        for pid in pids:  # every thread of every process, read back from the kernel
            assert process_cpus(pid) == memory
        t0 = cpu_snapshot(side.pids["agent"])
        assert len(t0) > 3 and cpu_seconds_between({}, t0) > 0  # every thread of it
        assert cpu_seconds_between(t0, {**t0, (1, 1): 5}) == pytest.approx(5e-9)  # one born since
        assert cpu_seconds_between(t0, {}) == 0  # threads that ended are left out, never subtracted
        side.check()  # all up
    with pytest.raises(RuntimeError, match="is gone"):  # a figure without it would be wrong
        cpu_snapshot(pids)
    time.sleep(0.2)
    assert not [p for p in pids if alive(p)]
    with pytest.raises(ValueError, match="needs the table's layout"):
        with plain_memory_side("table_100b", 1, memory, 0.002):
            pass


def test_a_killed_benchmark_leaves_no_shard_or_agent(tmp_path):
    short = tempfile.mkdtemp(prefix="ms-", dir="/tmp")  # its temp folder (a socket path has <= 107 bytes)
    try:
        _killed_benchmark(tmp_path, short)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _killed_benchmark(tmp_path, tmpdir: str) -> None:
    code = ("import os, time\nfrom engram_ray.bench.memory_side import plain_memory_side\n"
            "from engram_ray.config import table_100b\nfrom engram_ray.core.layout import TableLayout\n"
            "from engram_ray.data import default_vocab\n"
            "layout = TableLayout.build(table_100b(), default_vocab())\n"
            "with plain_memory_side('table_100b', 2, os.sched_getaffinity(0), 0.002, layout=layout) as side:\n"
            f"    open({str(tmp_path / 'up')!r}, 'w').close()\n"
            "    time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, TMPDIR=tmpdir))
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "up").exists():
            assert p.poll() is None and time.monotonic() < deadline, "the memory side did not come up"
            time.sleep(0.2)
        kids = descendants(p.pid)
        assert len(kids) >= 3  # two shards and the agent
        kill_and_expect_none_left(p, kids, "a shard or the agent")
    finally:
        p.kill()
