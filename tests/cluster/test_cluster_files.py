"""The shipped cluster files are valid for Ray's launcher and KubeRay, and say what they must:
three node types that scale apart, memory nodes with the resources deploy() packs by."""

import json
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from engram_ray.core.plan import MEMORY_GIB_RESOURCE as GIB_RES  # noqa: E402
from engram_ray.core.plan import MEMORY_RESOURCE as SLOT_RES  # noqa: E402

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_cloud_files_validate_and_have_three_node_types(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())
    cfg = prepare_config(raw)
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert set(types) == {"head", "memory", "gpu"} and cfg["head_node_type"] == "head"
    mem = types["memory"]["resources"]
    assert mem[SLOT_RES] >= 1 and mem[GIB_RES] >= 1  # the names deploy() reserves
    assert types["memory"]["max_workers"] > types["memory"]["min_workers"] >= 1  # scale apart
    assert types["gpu"]["max_workers"] >= 1 and SLOT_RES not in types["gpu"]["resources"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert any("setup_env.sh" in c for c in cfg["setup_commands"])  # installs engram-ray
    assert raw["file_mounts"] == {"~/engram_ray": "."}
    assert "CHANGE" in (CLUSTER / f"{name}.yaml").read_text()


def test_onprem_file_gives_roles_by_ip_and_handles_the_pitfalls():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "onprem.yaml").read_text())
    validate_config(prepare_config(raw))
    assert raw["provider"]["type"] == "local" and raw["min_workers"] == len(raw["provider"]["worker_ips"])
    start = raw["worker_start_ray_commands"][-1]
    assert "SSH_CONNECTION" in start and "--node-ip-address=$ME" in start  # its own IP
    assert "flock" in start  # workers on one host must not start at once
    assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_MODE=token" in raw["head_start_ray_commands"][-1]
    assert f'"{SLOT_RES}": 4, "{GIB_RES}": 409' in start
    assert "RAY_UP_enable_autoscaler_v2=0" in (CLUSTER / "onprem.yaml").read_text()


def test_kuberay_manifest_has_a_memory_and_a_gpu_group():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()))
    assert len(docs) == 1
    rc = docs[0]
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"memory", "gpu"}
    res = json.loads(json.loads(groups["memory"]["rayStartParams"]["resources"]))  # KubeRay's quoting
    assert res[SLOT_RES] >= 1 and res[GIB_RES] >= 1
    ram = groups["memory"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert ram.endswith("Gi") and res[GIB_RES] < int(ram[:-2])  # headroom left
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == 1 and groups["gpu"]["rayStartParams"]["num-gpus"] == "1"
    for g in groups.values():
        assert g["maxReplicas"] > g["minReplicas"] >= 0
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    docker = (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{rc['spec']['rayVersion']}" in docker
