"""Replicated shards on a real local Ray: kill a copy during a stream of lookups and none
fails; pushes made meanwhile are on every copy once the killed one has rejoined."""

import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from engram_ray import config as C  # noqa: E402
from engram_ray.client import EngramClient  # noqa: E402
from engram_ray.config import OptimizerConfig, StoreConfig  # noqa: E402
from engram_ray.core.tokens import CompressedVocab  # noqa: E402
from engram_ray.runtime import deploy, init_ray  # noqa: E402
from engram_ray.store import TableShard  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
VOCAB = CompressedVocab(np.arange(50))
STORE = StoreConfig(optimizer=OptimizerConfig(kind="adam", lr=0.05))


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    init_ray(num_cpus=2, resources={"engram_memory": 8, "engram_memory_gib": 8})
    yield
    ray.shutdown()


def _copy_rows(svc, r, ids):
    """Rows as replica ``r`` of every shard holds them."""
    with EngramClient([row[r] for row in svc.replicas], svc.layout, token=svc.token) as c:
        return c.lookup(ids)


def test_killing_a_copy_during_lookups_fails_none_and_loses_no_push(tiny_layout):
    svc = deploy(C.tiny(), vocab=VOCAB, num_shards=2, store=STORE, name="rep", replicas=2)
    try:
        assert [len(r) for r in svc.replicas] == [2, 2] and len(svc.shard_names) == 4
        ids = np.arange(tiny_layout.total_rows)
        client = svc.client(timeout=2, retries=3, backoff=0.05)
        replay = TableShard.create(tiny_layout, 1, 0, STORE)
        failures, done, stop = [], [0], threading.Event()

        def stream():
            reader = svc.client(timeout=2, retries=3, backoff=0.05)
            while not stop.is_set():
                try:
                    reader.lookup(np.random.default_rng(done[0]).integers(0, tiny_layout.total_rows, 512))
                    done[0] += 1
                except Exception as e:  # noqa: BLE001 - counted: must stay empty
                    failures.append(repr(e))
            reader.close()

        t = threading.Thread(target=stream)
        t.start()
        rng = np.random.default_rng(0)

        def push():
            pid = rng.integers(0, tiny_layout.total_rows, size=200)
            g = rng.normal(size=(200, 16)).astype(np.float32)
            client.push_gradients(pid, g)
            replay.apply_gradients(pid, g)

        push()
        time.sleep(0.5)
        before = done[0]
        old_pid = svc.kill_shard(0)  # replica 0: the primary
        push()  # while it is down: replica 1 takes over
        new = svc.shard_info(0)  # answers once it has copied the primary and serves
        push()  # after it rejoined as a backup
        time.sleep(0.5)
        stop.set()
        t.join(30)
        assert failures == [] and done[0] > before + 5, (failures[:3], done[0], before)
        assert new["pid"] != old_pid and new["source"].startswith("replica 1 at ")
        # every acknowledged push is on both copies of every shard
        assert np.array_equal(_copy_rows(svc, 0, ids), replay.values)
        assert np.array_equal(_copy_rows(svc, 1, ids), replay.values)
        copies = client.describe(every_replica=True)
        assert sorted((d["shard_index"], d["role"]) for d in copies) == [
            (0, "backup"), (0, "primary"), (1, "backup"), (1, "primary")]
        st = client.stats()
        print(f"lookups during the kill: {done[0] - before}, failovers {st['failovers']}, "
              f"redirects {st['redirects']}, retries {st['retries']}")
        client.close()
    finally:
        svc.shutdown()
