"""Driver for the autoscaling test: on a cluster with fewer memory nodes than a service
needs, deploy it (the placement group's demand makes the autoscaler add memory nodes), then
report where each shard landed. Prints one line ``RESULT {json}``."""

import json
import os
import sys
import time

import numpy as np
import ray

from engram_ray import config as C
from engram_ray.core.plan import MEMORY_RESOURCE
from engram_ray.core.tokens import CompressedVocab
from engram_ray.runtime import deploy, init_ray


def memory_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(MEMORY_RESOURCE, 0) > 0]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _kill_from_another_node(svc) -> dict:
    """kill_shard of a copy on a memory node, from this driver on the head: it must wait for
    the process on the copy's node (every fake node runs on this machine, so the truth can be
    read here too)."""
    info = svc.shard_info(0)
    old = svc.kill_shard(0)
    gone = not _pid_alive(old)
    back = svc.shard_info(0)
    return {"remote": info["node_id"] != ray.get_runtime_context().get_node_id(), "pid": old == info["pid"],
            "gone": gone, "restarted": back["pid"] != old and back["restarted"]}


def main(num_shards: int) -> None:
    init_ray("auto")
    before = len(memory_nodes())
    t0 = time.time()
    svc = deploy(C.tiny(), vocab=CompressedVocab(np.arange(50)), num_shards=num_shards, name="scaled",
                 timeout=240)
    seconds = time.time() - t0
    try:
        by_id = {n["NodeID"]: n for n in memory_nodes()}
        shard_nodes = [svc.shard_info(i)["node_id"] for i in range(num_shards)]
        placed = [node in by_id for node in shard_nodes]
        with svc.client() as c:
            ok = c.lookup(np.arange(svc.layout.total_rows)).shape[0] == svc.layout.total_rows
        nodes_used = len(set(shard_nodes))
        killed = _kill_from_another_node(svc)
    finally:
        svc.shutdown()
    # copies of a shard go to different memory nodes when there are enough of them
    rep = deploy(C.tiny(), vocab=CompressedVocab(np.arange(50)), num_shards=2, name="copies", replicas=2,
                 timeout=240)
    try:
        copy_nodes = [[rep.shard_info(i, r)["node_id"] for r in range(2)] for i in range(2)]
    finally:
        rep.shutdown()
    print("RESULT " + json.dumps({"memory_nodes_before": before, "memory_nodes_after": len(memory_nodes()),
                                  "shards_on_memory_nodes": placed, "nodes_used": nodes_used,
                                  "lookup_ok": ok, "deploy_s": seconds, "kill_shard": killed,
                                  "copies_on_distinct_nodes": [len(set(n)) == 2 for n in copy_nodes]}),
          flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
