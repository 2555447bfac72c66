"""The client imports the wire, never the server side: no servicer, store or grpc_health in a
process that only reads rows (shared/DESIGN.md, "Layers"; issue 12 #2)."""

import json
import subprocess
import sys

SERVER_SIDE = ("engram_ray.store", "engram_ray.rpc.server", "engram_ray.rpc.servicer", "engram_ray.rpc.peer",
               "engram_ray.rpc.auth", "engram_ray.rpc.replication", "engram_ray.rpc.pushlog",
               "engram_ray.rpc.metrics", "grpc_health.v1", "torch", "ray")


def test_importing_the_client_loads_no_server_code():
    code = ("import json, sys\n"
            "from engram_ray.client import EngramClient, Prefetch, ShardInfo\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    bad = sorted(m for m in loaded for s in SERVER_SIDE if m == s or m.startswith(s + "."))
    assert not bad, f"the client pulled in {bad}"


def test_the_public_names_stay_where_they_were():
    import engram_ray.client as c
    assert set(c.__all__) == {"EngramClient", "Prefetch", "ShardInfo", "UniqueRows"}  # UniqueRows: issue 13
    assert all(getattr(c, n).__module__.startswith("engram_ray.client.") for n in c.__all__)
    from engram_ray.rpc import SERVICE_NAME, create_server  # loaded on first use, as before
    assert callable(create_server) and SERVICE_NAME == "engram.v1.EngramMemory"
