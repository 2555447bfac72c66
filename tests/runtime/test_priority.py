"""Serving actors leave Ray's worker niceness: every thread of the process, and the threads it
starts later, run at nice 0 where the process may raise its priority; where it may not, it says
so and keeps serving."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from engram_ray.runtime import priority


def may_raise_priority() -> bool:
    """Whether a process here may lower its niceness again (CAP_SYS_NICE or RLIMIT_NICE; root in
    a container may have neither)."""
    probe = "import os; os.nice(5); os.setpriority(os.PRIO_PROCESS, 0, 0)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


root = pytest.mark.skipif(not may_raise_priority(), reason="lowering niceness needs CAP_SYS_NICE or RLIMIT_NICE")


@root
def test_every_thread_and_later_ones_serve_at_nice_0():
    code = textwrap.dedent("""
        import os, threading
        from engram_ray.runtime.priority import serve_at_normal_priority
        os.nice(15)                                   # as Ray starts its workers
        ready, stop = threading.Event(), threading.Event()
        def early():
            ready.set(); stop.wait()
        t = threading.Thread(target=early); t.start(); ready.wait()
        assert os.getpriority(os.PRIO_PROCESS, t.native_id) == 15
        assert serve_at_normal_priority() == 0
        assert os.getpriority(os.PRIO_PROCESS, t.native_id) == 0     # a thread started before
        seen = []
        later = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
        later.start(); later.join(); stop.set(); t.join()
        assert seen == [0]                                            # and one started after
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_process_already_at_normal_priority_is_left_alone(monkeypatch):
    monkeypatch.setattr(priority, "niceness", lambda: 0)
    monkeypatch.setattr(os, "setpriority", lambda *a: pytest.fail("nothing to change"))
    assert priority.serve_at_normal_priority() == 0


def test_without_the_right_it_keeps_serving_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(priority, "niceness", lambda: 15)

    def refuse(*a):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "setpriority", refuse)
    with caplog.at_level(logging.WARNING, logger=priority.__name__):
        assert priority.serve_at_normal_priority() == 15
    assert "RAY_worker_niceness=0" in caplog.text and "CAP_SYS_NICE" in caplog.text


def test_a_thread_that_ends_meanwhile_is_skipped(monkeypatch):
    monkeypatch.setattr(priority, "niceness", lambda: 15)
    monkeypatch.setattr(priority, "_threads", lambda: [1, 2])

    def gone(which, tid, nice):
        raise ProcessLookupError(3, "No such process")
    monkeypatch.setattr(os, "setpriority", gone)
    assert priority.serve_at_normal_priority() == 15      # no error, nothing to report
