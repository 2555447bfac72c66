"""`engram-ray serve / status / stop` as a user runs them, each in its own process."""

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "engram_ray.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_serve_status_checkpoint_stop(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    serve = subprocess.Popen([sys.executable, "-m", "engram_ray.cli", "serve", "--preset", "tiny",
                              "--shards", "2", "--name", "clitest", "--dtype", "bfloat16",
                              "--checkpoint-dir", str(tmp_path / "recovery"), "--save-root", str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = serve.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "serving; Ctrl-C to stop" in line:
                break
        out = "".join(lines)
        assert "serving; Ctrl-C to stop" in out, out
        assert "layout      engram-" in out and "127.0.0.1:" in out and "bfloat16" in out

        st = _cli("status", "--name", "clitest", "--address", "auto")
        assert st.returncode == 0, st.stderr[-2000:]
        assert "memory service 'clitest': 2 shards x 1 copies (2 of 2 serving)" in st.stdout and "auth on" in st.stdout
        assert st.stdout.count("127.0.0.1:") == 2 and st.stdout.count(" up ") == 2
        for column in ("RSS", "QPS", "p50 ms", "p99 ms"):
            assert column in st.stdout
        assert "table use since start" in st.stdout and "2-grams:" in st.stdout and "3-grams:" in st.stdout

        ck = _cli("checkpoint", "--name", "clitest", "--address", "auto")
        assert ck.returncode == 0 and "recovery checkpoint of 2 shards" in ck.stdout, ck.stderr[-2000:]
        assert len(list((tmp_path / "recovery" / "clitest").glob("shard-*/ckpt-00000001"))) == 2
        full = _cli("checkpoint", "--name", "clitest", "--address", "auto", "--dir", "full")
        assert full.returncode == 0 and "2 shards saved into" in full.stdout
        assert len(list((tmp_path / "full").glob("rows-*.json"))) == 2
        out = _cli("checkpoint", "--name", "clitest", "--address", "auto", "--dir", "/etc/engram")
        assert out.returncode == 2 and "not inside the service's save root" in out.stderr, out.stderr[-2000:]

        missing = _cli("status", "--name", "nope", "--address", "auto")
        assert missing.returncode == 2 and "no memory service named 'nope'" in missing.stderr

        stop = _cli("stop", "--name", "clitest", "--address", "auto")
        assert stop.returncode == 0 and "stopped memory service 'clitest' (2 shards)" in stop.stdout
        gone = _cli("status", "--name", "clitest", "--address", "auto")
        assert gone.returncode == 2
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            rest, _ = serve.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            raise
    assert serve.returncode == 0, rest[-2000:]
    assert "stopping" in rest


def test_detach_needs_a_cluster():
    r = _cli("serve", "--preset", "tiny", "--detach")
    assert r.returncode == 2 and "--detach needs --address" in r.stderr
