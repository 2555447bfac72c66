"""A shard served by a plain process (no Ray) on 127.0.0.1, for attacks from outside it:

    python tests/rpc/shard_process.py TOKEN [MAX_WORKERS] [MAX_CONCURRENT] [MAX_LOOKUP_STREAMS]

prints ``PORT <n>`` once it serves, and stops when its stdin closes (so it never outlives the
test that started it)."""

import sys

import numpy as np

from engram_ray import config as C
from engram_ray.core.layout import TableLayout
from engram_ray.core.tokens import CompressedVocab
from engram_ray.rpc import create_server
from engram_ray.store import TableShard


def main() -> None:
    token = sys.argv[1]
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    streams = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    layout = TableLayout.build(C.tiny(), CompressedVocab(np.arange(50)))
    shard = TableShard.create(layout, 1, 0)
    server, port = create_server(shard, "127.0.0.1", 0, token=token, max_workers=workers,
                                 max_concurrent_rpcs=limit, max_lookup_streams=streams)
    print(f"PORT {port}", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or dies)
    server.stop(0)


if __name__ == "__main__":
    main()
