"""A shard actor that dies comes back by itself, reloads its newest recovery checkpoint and is
found again by the clients: the recovery-point contract, tested exactly (one copy per shard)."""

import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from engram_ray import config as C  # noqa: E402
from engram_ray.config import OptimizerConfig, ServiceConfig, StoreConfig  # noqa: E402
from engram_ray.core.tokens import CompressedVocab  # noqa: E402
from engram_ray.runtime import deploy, init_ray  # noqa: E402
from engram_ray.store import TableShard  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
VOCAB = CompressedVocab(np.arange(50))
STORE = StoreConfig(optimizer=OptimizerConfig(kind="adam", lr=0.05))


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    init_ray(num_cpus=2, resources={"engram_memory": 4, "engram_memory_gib": 4})
    yield
    ray.shutdown()


def _push(client, layout, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, layout.total_rows, size=(6, 40))
    g = rng.normal(size=ids.shape + (layout.row_dim,)).astype(np.float32)
    client.push_gradients(ids, g)
    return ids, g


def test_a_killed_shard_returns_with_every_update_acknowledged_before_its_checkpoint(tiny_layout, tmp_path):
    service = ServiceConfig(checkpoint_dir=str(tmp_path))
    svc = deploy(C.tiny(), vocab=VOCAB, num_shards=2, store=STORE, name="rec", service=service)
    try:
        client = svc.client(timeout=5, retries=2, backoff=0.05)
        replay = TableShard.create(tiny_layout, 1, 0, STORE)  # the same steps, applied here
        for seed in (1, 2):  # acknowledged before the checkpoint
            replay.apply_gradients(*(a.reshape(-1, *a.shape[2:]) for a in _push(client, tiny_layout, seed)))
        at_checkpoint = replay.values.copy()
        dirs = svc.checkpoint()
        assert len(dirs) == 2 and all("ckpt-00000001" in d for d in dirs)
        ids3, g3 = _push(client, tiny_layout, 3)  # acknowledged after it: lost with the shard
        replay.apply_gradients(ids3.reshape(-1), g3.reshape(-1, 16))
        everything = replay.values.copy()
        all_ids = np.arange(tiny_layout.total_rows)
        assert np.array_equal(client.lookup(all_ids), everything)

        t0 = time.perf_counter()
        old_pid = svc.kill_shard(0)  # returns once the process is gone; Ray restarts the actor
        rows = client.lookup(all_ids)  # the same client: it waits, re-resolves, and reads
        recovered_s = time.perf_counter() - t0
        new = svc.shard_info(0)  # answers once the restarted copy serves
        assert new["restarted"] and new["pid"] != old_pid and "ckpt-00000001" in new["source"]
        lo, hi = new["row_start"], new["row_stop"]
        # shard 0: exactly its checkpoint (updates 1-2 in, update 3 lost); shard 1: all three
        assert np.array_equal(rows[lo:hi], at_checkpoint[lo:hi])
        assert np.array_equal(rows[hi:], everything[hi:])
        # Adam's state came back too: a next step equals the same step on the checkpoint
        local0 = TableShard.load(new["source"], tiny_layout, 2, 0, STORE)
        ids4 = np.arange(lo, hi, 5)
        g4 = np.random.default_rng(4).normal(size=(ids4.size, 16)).astype(np.float32)
        client.push_gradients(ids4, g4)
        local0.apply_gradients(ids4, g4)
        assert np.array_equal(client.lookup(np.arange(lo, hi)), local0.values)
        print(f"shard restart to first good lookup: {recovered_s:.2f} s (reload {new['load_seconds']:.3f} s)")
        assert recovered_s < 60
        client.close()
    finally:
        svc.shutdown()


def test_periodic_checkpoints_and_a_shard_without_a_checkpoint_dir(tiny_layout, tmp_path):
    service = ServiceConfig(checkpoint_dir=str(tmp_path), checkpoint_every_s=0.5)
    svc = deploy(C.tiny(), vocab=VOCAB, num_shards=1, store=STORE, name="per", service=service)
    try:
        deadline = time.time() + 20
        while time.time() < deadline and not list(tmp_path.glob("per/shard-0000-of-0001/ckpt-*")):
            time.sleep(0.2)
        assert list(tmp_path.glob("per/shard-0000-of-0001/ckpt-*"))
    finally:
        svc.shutdown()
    plain = deploy(C.tiny(), vocab=VOCAB, num_shards=1, store=STORE, name="plain")
    try:
        from engram_ray.errors import InvalidRequest
        with pytest.raises(InvalidRequest, match="no checkpoint_dir"):
            plain.checkpoint()
    finally:
        plain.shutdown()


def _damage_rows(ckpt):
    """Flip a byte in a checkpoint's rows: it no longer verifies."""
    rows = next(p for p in ckpt.glob("rows-*.npy") if p.name.count(".") == 1)
    data = bytearray(rows.read_bytes())
    data[-3] ^= 0xFF
    rows.write_bytes(bytes(data))


def test_damaged_checkpoints_fall_back_then_refuse_until_an_operator_decides(tiny_layout, tmp_path, capsys):
    """Issue 11 #2 and #3 on a real restarted actor: a damaged newest checkpoint falls back to
    the one before (and says why); all damaged, the shard refuses to serve, keeps them, and
    status shows it, until `recover` says what to serve."""
    from pathlib import Path

    from engram_ray.cli import main as cli
    from engram_ray.errors import ShardUnavailable

    service = ServiceConfig(checkpoint_dir=str(tmp_path))
    svc = deploy(C.tiny(), vocab=VOCAB, num_shards=1, store=STORE, name="bad", service=service)
    try:
        client = svc.client(timeout=5, retries=1, backoff=0.05, recover_timeout=5)
        all_ids = np.arange(tiny_layout.total_rows)
        _push(client, tiny_layout, 1)
        first = Path(svc.checkpoint()[0])
        at_first = client.lookup(all_ids)
        _push(client, tiny_layout, 2)
        second = Path(svc.checkpoint()[0])
        _damage_rows(second)
        svc.kill_shard(0)
        info = svc.shard_info(0)
        assert info["state"] == "serving" and info["source"] == str(first)
        assert any(second.name in n and "checksum" in n for n in info["notes"])
        assert np.array_equal(client.lookup(all_ids), at_first)
        assert (second.parent / (second.name + ".unusable") / "WHY.txt").exists()  # evidence, set aside

        _damage_rows(first)  # now every checkpoint is damaged
        svc.kill_shard(0)
        info = svc.shard_info(0)
        assert info["state"] == "refusing" and "none of its 1 recovery checkpoints" in info["refusal"]
        assert first.is_dir() and (first.parent / (second.name + ".unusable")).is_dir()  # nothing deleted
        with pytest.raises(ShardUnavailable, match="refuses to serve"):
            client.lookup(all_ids[:5])
        with pytest.raises(ShardUnavailable, match="refuses to serve"):
            svc.checkpoint()  # no recovery checkpoint of placeholder rows, no pruning of evidence
        assert [p.name for p in first.parent.iterdir() if not p.name.endswith(".unusable")] == [first.name]
        assert cli(["status", "--name", "bad", "--address", "auto", "--interval", "0.1"]) == 1
        out = capsys.readouterr().out
        assert "REFUSES" in out and "engram-ray recover" in out and "0 of 1 serving" in out

        assert cli(["recover", "--name", "bad", "--address", "auto", "--shard", "0", "--reset"]) == 0
        info = svc.shard_info(0)
        assert info["state"] == "serving" and "operator override" in info["source"]
        fresh = TableShard.create(tiny_layout, 1, 0, STORE)
        assert np.array_equal(client.lookup(all_ids), fresh.values)
        assert (first.parent / (first.name + ".unusable")).is_dir()
        svc.kill_shard(0)  # the accepted rows are its recovery point now: no refusal after a restart
        assert svc.shard_info(0)["state"] == "serving"
        client.close()
    finally:
        svc.shutdown()
