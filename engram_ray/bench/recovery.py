"""``engram-ray bench recovery``: how long a killed shard copy takes to come back, and what
the clients see meanwhile, with one copy per shard (it reloads its recovery checkpoint) and
with two (the other copy serves; the killed one rejoins by copying it).

For each replica count: deploy, train a little (pushes), checkpoint, run a stream of lookups
on another thread, kill shard 0's first copy, and measure the time from the kill until (a)
the killed copy serves again (its actor answers: it reloads or copies before that) and (b)
a lookup through a client that was connected before the kill succeeds; count the stream's
failed lookups.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import EngramConfig, OptimizerConfig, ServiceConfig, StoreConfig


def run(config: EngramConfig, vocab: Any, *, replica_counts: Sequence[int] = (1, 2), shards: int = 2,
        pushes: int = 5, progress: bool = False) -> dict[str, Any]:
    from ..runtime import deploy, ray_session

    store = StoreConfig(optimizer=OptimizerConfig(kind="adam", lr=1e-3))
    results = []
    with ray_session(), tempfile.TemporaryDirectory() as tmp:
        for R in replica_counts:
            name = f"bench-recovery-{R}"
            svc = deploy(config, vocab=vocab, num_shards=shards, store=store, name=name,
                         service=ServiceConfig(replicas=R, checkpoint_dir=os.path.join(tmp, str(R))))
            try:
                layout = svc.layout
                rng = np.random.default_rng(0)
                with svc.client() as client:
                    for _ in range(pushes):
                        ids = rng.integers(0, layout.total_rows, 4096)
                        client.push_gradients(ids, rng.normal(size=(4096, layout.row_dim)).astype(np.float32))
                    t0 = time.perf_counter()
                    svc.checkpoint()
                    checkpoint_s = time.perf_counter() - t0
                    failures, done, stop = [0], [0], threading.Event()

                    def stream(svc, layout, stop, done, failures):
                        with svc.client() as reader:
                            r = np.random.default_rng(1)
                            while not stop.is_set():
                                try:
                                    reader.lookup(r.integers(0, layout.total_rows, 1024))
                                    done[0] += 1
                                except Exception:  # noqa: BLE001 - counted
                                    failures[0] += 1
                    t = threading.Thread(target=stream, args=(svc, layout, stop, done, failures), daemon=True)
                    t.start()
                    time.sleep(0.5)
                    before = done[0]
                    t_kill = time.perf_counter()
                    svc.kill_shard(0)  # returns once the process is gone
                    probe = np.arange(0, layout.total_rows, max(1, layout.total_rows // 1000))
                    client.lookup(probe)  # the pre-kill client: waits, fails over or re-resolves
                    lookup_s = time.perf_counter() - t_kill
                    info = svc.shard_info(0)  # waits: it answers once it serves again
                    serving_s = time.perf_counter() - t_kill
                    time.sleep(0.5)
                    stop.set()
                    t.join(30)
                    results.append({"replicas": R, "rows_per_shard": layout.total_rows // shards,
                                    "shard_mib": layout.total_rows // shards * layout.row_bytes("float32") * 3 / 2**20,
                                    "checkpoint_s": checkpoint_s, "first_lookup_after_kill_s": lookup_s,
                                    "copy_serving_again_s": serving_s, "reload_s": info["load_seconds"],
                                    "rows_from": info["source"], "stream_lookups_during": done[0] - before,
                                    "stream_failures": failures[0]})
                    if progress:
                        print(f"  replicas {R}: back in {serving_s:.2f} s, {failures[0]} failed lookups")
            finally:
                svc.shutdown()
    return {"benchmark": "recovery", "config": config.to_dict(), "shards": shards,
            "note": "shard_mib counts rows + Adam m and v", "results": results}
