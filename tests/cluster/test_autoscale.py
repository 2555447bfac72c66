"""Memory scales with demand: Ray's fake multi-node autoscaler adds memory nodes when a
service needs more shards than the memory nodes hold, and every shard lands on one.

Ray's own `fake_multinode` provider type is broken in this wheel (its example.yaml is not
shipped), so the cluster uses the `external` provider type with the same class, as Ray's
docs describe. Autoscaler v2 is needed: v1 would try to SSH into the fake nodes. The head's
instance id must be the provider's fake head id, or v2 waits for the head forever.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(400)]

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
FAKE_HEAD = "f" * 51 + "00000"

# Memory nodes with 2 shard slots and 2 GiB each: a tiny shard reserves 1 GiB, so 4 shards
# need 2 nodes, and the cluster starts with 1.
CLUSTER = {
    "cluster_name": "engram-fake",
    "max_workers": 3,
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 5,
    "provider": {"type": "external",
                 "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "memory": {"resources": {"CPU": 1, "engram_memory": 2, "engram_memory_gib": 2},
                   "node_config": {}, "min_workers": 1, "max_workers": 3},
    },
    "head_node_type": "ray.head.default",
    # the autoscaler reads these even though fake nodes run no commands
    "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_more_shards_than_memory_nodes_scale_the_memory_nodes(tmp_path):
    if not _port_free(6379):
        pytest.skip("port 6379 is taken: the fake provider's nodes join a head on 6379")
    (tmp_path / "fake.yaml").write_text(yaml.safe_dump(CLUSTER))
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_FAKE_CLUSTER="1",
               RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=FAKE_HEAD,
               RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD, RAY_NODE_TYPE_NAME="ray.head.default")
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"
    ray_cli = str(VENV_BIN / "ray")
    t0 = time.time()
    start = subprocess.run([ray_cli, "start", "--head", "--port=6379", "--num-cpus=1", "--include-dashboard=false",
                            f"--autoscaling-config={tmp_path / 'fake.yaml'}"],
                           env=env, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        # the driver is a plain client of the cluster: no fake-node variables
        driver_env = {k: v for k, v in env.items() if k not in (
            "RAY_FAKE_CLUSTER", "RAY_CLOUD_INSTANCE_ID", "RAY_OVERRIDE_NODE_ID_FOR_TESTING", "RAY_NODE_TYPE_NAME")}
        # wait for min_workers: the first memory node
        deadline = time.time() + 120
        status = ""
        while time.time() < deadline:
            status = subprocess.run([ray_cli, "status"], env=driver_env, capture_output=True, text=True,
                                    timeout=60).stdout
            if " 1 memory" in status:
                break
            time.sleep(1)
        assert " 1 memory" in status, status
        run = subprocess.run([sys.executable, str(HERE / "autoscale_driver.py"), "4"], env=driver_env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))[7:])
        print(f"autoscale test: {time.time() - t0:.1f} s in all; {result}")
        assert result["memory_nodes_before"] == 1 and result["memory_nodes_after"] >= 2
        assert result["shards_on_memory_nodes"] == [True] * 4 and result["nodes_used"] == 2
        assert result["lookup_ok"]
        # kill_shard from the head of a copy on a memory node: returns once that process is gone
        assert result["kill_shard"] == {"remote": True, "pid": True, "gone": True, "restarted": True}
        assert result["copies_on_distinct_nodes"] == [True, True]  # STRICT_SPREAD per shard
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
