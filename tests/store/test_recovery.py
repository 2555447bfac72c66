"""Recovery checkpoints: numbered, whole or absent, newest that verifies wins."""

import numpy as np

from engram_ray.config import OptimizerConfig, StoreConfig
from engram_ray.store import TableShard
from engram_ray.store.recovery import RecoveryCheckpoints

STORE = StoreConfig(optimizer=OptimizerConfig(kind="adam", lr=0.1))


def test_newest_complete_checkpoint_is_reloaded(tiny_layout, tmp_path):
    shard = TableShard.create(tiny_layout, 2, 1, STORE)
    rec = RecoveryCheckpoints(tmp_path / "r", keep=2)
    assert rec.load_newest(tiny_layout, 2, 1, STORE) is None
    ids = np.array([shard.row_start, shard.row_start + 3])
    shard.apply_gradients(ids, np.ones((2, 16), np.float32))
    first = rec.save(shard)
    after_first = shard.checksum()
    shard.apply_gradients(ids, np.ones((2, 16), np.float32))
    second = rec.save(shard)
    back, path = rec.load_newest(tiny_layout, 2, 1, STORE)
    assert path == second and back.checksum() == shard.checksum()
    assert np.array_equal(back.optimizer.steps, shard.optimizer.steps)
    # a checkpoint torn after the rename (a corrupt rows file): the one before is used
    rows = next(second.glob("rows-*.npy"))
    rows.write_bytes(rows.read_bytes()[:-8] + b"\0" * 8)
    back, path = rec.load_newest(tiny_layout, 2, 1, STORE)
    assert path == first and back.checksum() == after_first
    # an unfinished save is invisible, and only `keep` checkpoints stay
    (tmp_path / "r" / "ckpt-00000009.partial").mkdir()
    third = rec.save(shard)
    assert [p.name for p in rec.complete()] == [third.name, second.name]
    assert not first.exists()
