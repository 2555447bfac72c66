"""Recovery checkpoints: numbered, whole or absent, newest that loads wins; any damage falls
back to an older one and says why; all damaged means refuse, never a silent reset."""

import numpy as np
import pytest

from engram_ray.config import OptimizerConfig, StoreConfig
from engram_ray.store import TableShard
from engram_ray.store.recovery import RecoveryCheckpoints

from .test_checkpoint import DAMAGE

STORE = StoreConfig(optimizer=OptimizerConfig(kind="adam", lr=0.1))


def _two_checkpoints(layout, tmp_path):
    shard = TableShard.create(layout, 1, 0, STORE)
    rec = RecoveryCheckpoints(tmp_path / "r", keep=2)
    ids = np.array([3, 7])
    shard.apply_gradients(ids, np.ones((2, 16), np.float32))
    first, at_first = rec.save(shard), shard.checksum()
    shard.apply_gradients(ids, np.ones((2, 16), np.float32))
    second = rec.save(shard)
    return shard, rec, first, at_first, second


def test_newest_complete_checkpoint_is_reloaded(tiny_layout, tmp_path):
    rec = RecoveryCheckpoints(tmp_path / "none")
    found = rec.load_newest(tiny_layout, 1, 0, STORE)
    assert found.shard is None and not found.unusable and not found.refused  # nothing yet: initial rows
    shard, rec, first, _, second = _two_checkpoints(tiny_layout, tmp_path)
    found = rec.load_newest(tiny_layout, 1, 0, STORE)
    assert found.path == second and found.shard.checksum() == shard.checksum() and not found.unusable
    assert np.array_equal(found.shard.optimizer.steps, shard.optimizer.steps)
    # an unfinished save is invisible, and only `keep` checkpoints stay
    (tmp_path / "r" / "ckpt-00000009.partial").mkdir()
    third = rec.save(shard)
    assert third.name == "ckpt-00000010"
    assert [p.name for p in rec.complete()] == [third.name, second.name]
    assert not first.exists()


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_any_damage_to_the_newest_falls_back_and_says_why(tiny_layout, tmp_path, kind):
    shard, rec, first, at_first, second = _two_checkpoints(tiny_layout, tmp_path)
    damage, match = DAMAGE[kind]
    damage(second)
    found = rec.load_newest(tiny_layout, 1, 0, STORE)
    assert found.path == first and found.shard.checksum() == at_first
    [(path, why)] = found.unusable
    assert path == second
    import re
    assert re.search(match, why), why
    # the damaged one is set aside as evidence (never loaded or pruned again), with the reason
    aside = second.with_name(second.name + ".unusable")
    assert not second.exists() and aside.is_dir() and match.split()[0] in (aside / "WHY.txt").read_text()
    third = rec.save(found.shard)
    assert third.name == "ckpt-00000003" and aside.is_dir()
    for _ in range(3):
        rec.save(found.shard)
    assert aside.is_dir() and len(rec.complete()) == 2


def test_every_checkpoint_damaged_is_a_refusal_that_keeps_the_evidence(tiny_layout, tmp_path):
    shard, rec, first, _, second = _two_checkpoints(tiny_layout, tmp_path)
    DAMAGE["rows flipped"][0](second)
    DAMAGE["header garbage"][0](first)
    found = rec.load_newest(tiny_layout, 1, 0, STORE)
    assert found.shard is None and found.refused
    assert [p for p, _ in found.unusable] == [second, first]
    assert "checksum" in found.unusable[0][1] and "unreadable" in found.unusable[1][1]
    assert second.is_dir() and first.is_dir()  # left exactly where they were
    assert rec.load_newest(tiny_layout, 1, 0, STORE).refused  # and the next restart refuses again
