"""Experiment runs as Ray tasks: each takes a GPU where the cluster has GPUs (none asked for
where it has none, or with gpus_per_run=0), results in (arm, seed) order."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = """
import json, sys
from types import SimpleNamespace
import ray
from engram_ray.config import TrainConfig
from engram_ray.runtime.experiments import run_arms

def probe(arm, train, **kw):
    return {"arm": arm.name, "seed": train.seed, "gpus": [str(g) for g in ray.get_gpu_ids()], **kw}

ray.init(num_cpus=2, num_gpus=int(sys.argv[1]), include_dashboard=False, log_to_driver=False)
arms = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
auto = run_arms(arms, [0, 1], train=TrainConfig(), fn=probe, extra=7)
off = run_arms(arms[:1], [3], train=TrainConfig(), fn=probe, gpus_per_run=0)
print(json.dumps({"auto": auto, "off": off}))
"""


@pytest.mark.parametrize("gpus", [1, 0])
def test_runs_take_a_gpu_where_the_cluster_has_one(gpus):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(gpus)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(x["arm"], x["seed"], x["extra"]) for x in out["auto"]] == [("a", 0, 7), ("a", 1, 7), ("b", 0, 7),
                                                                        ("b", 1, 7)]
    assert all(len(x["gpus"]) == gpus for x in out["auto"])    # one each on a GPU cluster, none without
    assert out["off"][0]["gpus"] == [] and out["off"][0]["seed"] == 3
