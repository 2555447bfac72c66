"""`ray up` for real on cluster/onprem.yaml: a head and two workers on loopback aliases.

The test starts its own sshd bound only to 127.0.0.2-4 with keys it generates, brings the
cluster up with Ray's launcher, deploys the memory service with `ray job submit` (its shards
must land on the memory node), looks rows up through it, and tears everything down: the
service, the cluster (`ray down`), its sshd, keys and the launcher's files.

What the test changes in the shipped file, and why: the IPs, user and key (this machine);
no file mounts or setup (the three "nodes" are this machine, where engram-ray is installed);
the venv path; no `ray stop` before a worker starts (on one host it would stop the head).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
HEAD, MEMORY, GPU = "127.0.0.2", "127.0.0.3", "127.0.0.4"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
VENV_BIN = Path(sys.executable).parent


def _missing() -> str | None:
    if sys.platform != "linux":
        return "needs Linux loopback aliases"
    if os.geteuid() != 0:
        return "sshd on port 22 needs root"
    for tool in (SSHD, "rsync", "flock", "ssh", "ssh-keygen"):
        if not (os.path.exists(tool) or shutil.which(tool)):
            return f"{tool} is not installed (.ci/run installs openssh-server and rsync)"
    for ip in (HEAD, MEMORY, GPU):
        with socket.socket() as s:
            try:
                s.bind((ip, 22))
            except OSError as e:
                return f"cannot bind {ip}:22 ({e})"
    return None


def _run(cmd: list[str], env: dict, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _cluster_file(tmp: Path, key: Path, name: str) -> Path:
    import yaml

    cfg = yaml.safe_load((ROOT / "cluster" / "onprem.yaml").read_text())
    cfg["cluster_name"] = name
    cfg["provider"].update(head_ip=HEAD, worker_ips=[MEMORY, GPU])
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    cfg["min_workers"] = cfg["max_workers"] = 2
    cfg["file_mounts"], cfg["setup_commands"] = {}, []

    def here(cmd: str) -> str:
        return (cmd.replace("$HOME/engram_ray/.venv/bin", str(VENV_BIN))
                   .replace("10.0.0.11 10.0.0.12", MEMORY)
                   .replace('"engram_memory_gib": 409', '"engram_memory_gib": 4'))

    cfg["head_start_ray_commands"] = [here(c) for c in cfg["head_start_ray_commands"]]
    cfg["worker_start_ray_commands"] = [here(c) for c in cfg["worker_start_ray_commands"]
                                        if not c.rstrip().endswith("ray stop")]
    assert any("engram_memory_gib\": 4" in c for c in cfg["worker_start_ray_commands"])
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _start_sshd(tmp: Path) -> tuple[subprocess.Popen, Path]:
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
    (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation dir
    (tmp / "sshd_config").write_text("\n".join([
        "Port 22", *[f"ListenAddress {ip}" for ip in (HEAD, MEMORY, GPU)],
        f"HostKey {tmp / 'host_key'}", f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        f"PidFile {tmp / 'sshd.pid'}", ""]))
    sshd = subprocess.Popen([SSHD, "-D", "-f", str(tmp / "sshd_config"), "-E", str(tmp / "sshd.log")])
    deadline = time.time() + 10
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex((HEAD, 22)) == 0:
                return sshd, tmp / "client_key"
        time.sleep(0.1)
    sshd.kill()
    raise AssertionError(f"sshd did not listen: {(tmp / 'sshd.log').read_text()}")


def _wait_for_nodes(env: dict, n: int, timeout: float) -> str:
    deadline, out = time.time() + timeout, ""
    while time.time() < deadline:
        r = _run([str(VENV_BIN / "ray"), "status", "--address", f"{HEAD}:6379"], env, 60, check=False)
        out = r.stdout + r.stderr
        if f" {n} local.cluster.node" in out and "engram_memory_gib" in out:
            return out
        time.sleep(2)
    raise AssertionError(f"{n} nodes did not come up in {timeout} s:\n{out[-3000:]}")


def test_ray_up_deploys_the_service_on_the_memory_node(tmp_path):
    why = _missing()
    if why:
        pytest.skip(why)
    name = f"engram-ray-test-{os.getpid()}"
    home = Path.home()
    # the launcher writes these on the head (this machine): keep a user's own, restore them
    launcher_files = [home / "ray_bootstrap_key.pem", home / "ray_bootstrap_config.yaml"]
    saved = {p: p.read_bytes() for p in launcher_files if p.exists()}
    config_caches = set(Path("/tmp").glob("ray-config-*"))
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_UP_enable_autoscaler_v2="0")
    if (home / ".ray" / "auth_token").exists():  # the head turns token auth on: so do clients
        env["RAY_AUTH_MODE"] = "token"
    ray_cli = str(VENV_BIN / "ray")
    sshd, key = _start_sshd(tmp_path)
    cluster = _cluster_file(tmp_path, key, name)
    timings = {}
    try:
        t0 = time.time()
        _run([ray_cli, "up", "-y", str(cluster), "--no-config-cache"], env, 240)
        status = _wait_for_nodes(env, 3, 180)
        timings["up_s"] = time.time() - t0
        assert "4.0 engram_memory" in status.replace("0.0/", "")  # one memory node, 4 slots

        job = [ray_cli, "job", "submit", "--address", "http://127.0.0.1:8265", "--"]
        t0 = time.time()
        served = _run(job + ["engram-ray", "serve", "--address", "auto", "--detach", "--preset", "tiny",
                             "--shards", "2", "--name", "onprem"], env, 180)
        assert "detached: stop it with" in served.stdout, served.stdout[-3000:]
        checked = _run(job + [sys.executable, str(ROOT / "tests" / "cluster" / "roundtrip_job.py"), "onprem"],
                       env, 180)
        line = next(x for x in checked.stdout.splitlines() if x.startswith("RESULT "))
        result = json.loads(line[len("RESULT "):])
        timings["serve_and_lookup_s"] = time.time() - t0
        assert result["rows_equal"] and result["nodes"] == 3
        assert [s["node_ip"] for s in result["shards"]] == [MEMORY, MEMORY]  # on the memory node
        assert all(s["address"].startswith(f"{MEMORY}:") for s in result["shards"])  # bound to its IP
        stopped = _run(job + ["engram-ray", "stop", "--name", "onprem"], env, 120)
        assert "stopped memory service 'onprem' (2 shards)" in stopped.stdout
    finally:
        t0 = time.time()
        # `ray down` runs a bare `ray stop` in a login shell, where this venv is not on PATH:
        # stop Ray on the nodes (all this machine) explicitly first.
        _run([ray_cli, "stop", "--force"], env, 120, check=False)
        down = _run([ray_cli, "down", "-y", str(cluster)], env, 120, check=False)
        timings["down_s"] = time.time() - t0
        sshd.terminate()
        sshd.wait(10)
        for p in launcher_files:
            if p in saved:
                p.write_bytes(saved[p])
            else:
                p.unlink(missing_ok=True)
        for p in (Path(f"/tmp/ray/cluster-{name}.state"), Path(f"/tmp/ray/cluster-{name}.lock")):
            p.unlink(missing_ok=True)
        for p in set(Path("/tmp").glob("ray-config-*")) - config_caches:
            p.unlink(missing_ok=True)
        for p in tmp_path.glob("*key*"):
            p.unlink()
        print(f"ray up cluster test timings: {json.dumps(timings)}")
    assert down.returncode == 0, down.stderr[-2000:]
