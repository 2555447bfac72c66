"""Run on a cluster (``ray job submit ... -- python roundtrip_job.py NAME``): attach to the
memory service NAME, look rows up through it, and report where its shards run. Prints one
line ``RESULT {json}`` for the test that submitted it."""

import json
import sys

import numpy as np
import ray

from engram_ray.core.plan import MEMORY_RESOURCE
from engram_ray.runtime import attach
from engram_ray.store import TableShard


def main(name: str) -> None:
    svc = attach(name, address="auto")
    ids = np.arange(0, svc.layout.total_rows, 97)
    with svc.client() as client:
        rows = client.lookup(ids)
    # rows start from a seeded init, so a table built here must hold the same values
    want = TableShard.create(svc.layout, 1, 0, svc.store).gather(ids)
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    placed = []
    for shard in range(svc.num_shards):
        info = svc.shard_info(shard)
        node = nodes[info["node_id"]]
        placed.append({"shard": shard, "address": info["address"], "node_ip": node["NodeManagerAddress"],
                       "engram_memory": node["Resources"].get(MEMORY_RESOURCE, 0)})
    print("RESULT " + json.dumps({"rows_equal": bool(np.array_equal(rows, want)), "rows": int(ids.size),
                                  "shards": placed, "nodes": len(nodes)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
