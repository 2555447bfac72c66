"""runtime.processes on this node, without a Ray cluster."""

import subprocess
import sys

from engram_ray.runtime.processes import _gone_within


def test_a_process_of_another_user_is_not_gone():
    # pid 1 always exists; unless we are root it belongs to another user (EPERM), which is
    # what a shard started under its own uid looks like: still alive, never "gone".
    assert _gone_within(1, 0.05) is False


def test_an_exited_process_is_gone_and_a_live_one_is_not():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _gone_within(proc.pid, 0.05) is False
    finally:
        proc.kill()
        proc.wait()
    assert _gone_within(proc.pid, 1.0) is True
