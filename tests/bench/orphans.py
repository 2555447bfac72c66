"""For tests of benchmarks that start processes: kill a benchmark outright and check that
nothing it started outlives it."""

import signal
import subprocess
import time

from engram_ray.bench.isolation import proc_stat


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has stopped)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def kill_and_expect_none_left(p: subprocess.Popen, kids: list[int], what: str, within_s: float = 15.0) -> None:
    """SIGKILL the benchmark ``p`` (no clean-up of its own runs) and assert that every one of
    ``kids`` (what it started) is gone within ``within_s``."""
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(alive(k) for k in kids):
        time.sleep(0.2)
    assert not [k for k in kids if alive(k)], f"{what} outlived its benchmark"
