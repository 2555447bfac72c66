"""Disk-backed shards (StoreConfig(storage="mmap")): rows in a memory-mapped file, filled once,
reopened without a copy, refilled when the source changes or the fill never finished."""

import gc
import logging

import numpy as np
import pytest

from engram_ray import config as C
from engram_ray.config import OptimizerConfig, StoreConfig
from engram_ray.core.layout import TableLayout
from engram_ray.core.tokens import CompressedVocab
from engram_ray.store import TableShard
from engram_ray.store import shard as shard_module

SGD = OptimizerConfig(kind="sgd", lr=0.5)


@pytest.fixture(scope="module")
def layout():
    return TableLayout.build(C.tiny(), CompressedVocab(np.arange(50)))


def _mmap(tmp_path, **kw):
    return StoreConfig(storage="mmap", data_dir=str(tmp_path / "data"), optimizer=SGD, **kw)


def _no(name):
    def refuse(*a, **k):
        raise AssertionError(f"{name} was called: the mapped file should have been reopened")
    return refuse


def test_a_mapped_shard_serves_the_rows_a_ram_shard_does_and_reopens_without_a_copy(tmp_path, layout, monkeypatch):
    ram = TableShard.create(layout, 2, 1, StoreConfig(optimizer=SGD))
    mm = TableShard.create(layout, 2, 1, _mmap(tmp_path))
    ids = np.arange(ram.row_start, ram.row_stop, 7)
    np.testing.assert_array_equal(mm.gather(ids), ram.gather(ids))
    d = mm.describe()
    assert d["storage"] == "mmap" and d["mapped_bytes"] == ram.values.nbytes
    assert 0 < d["mapped_resident_bytes"] <= d["mapped_bytes"]  # just filled: its pages are in RAM
    assert ram.describe()["storage"] == "ram" and ram.describe()["mapped_bytes"] == 0
    assert len(list((tmp_path / "data").glob("rows-*.bin"))) == 1
    mm.apply_gradients(ids[:3], np.ones((3, layout.row_dim), np.float32))  # an update lands in the file
    want = mm.gather(ids)
    with pytest.raises(ValueError, match="in use by another shard"):  # one shard per rows file
        TableShard.create(layout, 2, 1, _mmap(tmp_path))
    del mm
    gc.collect()  # the mapping and its lock go with the shard
    monkeypatch.setattr(shard_module, "init_rows", _no("init_rows"))
    again = TableShard.create(layout, 2, 1, _mmap(tmp_path))
    np.testing.assert_array_equal(again.gather(ids), want)


def test_an_unfinished_fill_or_another_source_fills_again(tmp_path, layout, caplog):
    mm = TableShard.create(layout, 1, 0, _mmap(tmp_path))
    want = mm.gather(np.arange(100))
    (meta,) = (tmp_path / "data").glob("rows-*.json")
    meta.unlink()  # as if the process died while filling: the file is not trusted
    mm.values[:100] = 0
    del mm
    gc.collect()
    np.testing.assert_array_equal(TableShard.create(layout, 1, 0, _mmap(tmp_path)).gather(np.arange(100)), want)
    gc.collect()
    # the rows came from init; asking for a checkpoint's rows fills the file from it
    ckpt = tmp_path / "ckpt"
    src = TableShard.create(layout, 1, 0, StoreConfig(optimizer=SGD, init_seed=7))
    src.save(ckpt)
    with caplog.at_level(logging.WARNING):
        loaded = TableShard.load(ckpt, layout, 1, 0, _mmap(tmp_path))
    assert "filling them again" in caplog.text
    np.testing.assert_array_equal(loaded.gather(np.arange(100)), src.gather(np.arange(100)))


def test_loading_a_checkpoint_copies_it_once(tmp_path, layout, monkeypatch):
    ckpt = tmp_path / "ckpt"
    src = TableShard.create(layout, 1, 0, StoreConfig(optimizer=SGD, init_seed=3))
    src.save(ckpt)
    first = TableShard.load(ckpt, layout, 3, 2, _mmap(tmp_path))  # another shard count
    ids = np.arange(first.row_start, first.row_stop)
    np.testing.assert_array_equal(first.gather(ids), src.gather(ids))
    del first
    gc.collect()
    monkeypatch.setattr("engram_ray.store.checkpoint.load_range", _no("load_range"))
    np.testing.assert_array_equal(TableShard.load(ckpt, layout, 3, 2, _mmap(tmp_path)).gather(ids), src.gather(ids))


@pytest.mark.parametrize("kw,why", [
    ({"data_dir": ""}, "data_dir"),
    ({"optimizer": OptimizerConfig(kind="adam")}, "Adam's state"),
    ({"resident_rows_per_shard": 10}, "holds every row"),
    ({"storage": "tape"}, '"ram" or "mmap"'),
])
def test_mmap_settings_that_cannot_work_are_refused(tmp_path, kw, why):
    base = {"storage": "mmap", "data_dir": str(tmp_path), "optimizer": SGD, **kw}
    with pytest.raises(ValueError, match=why):
        StoreConfig(**base)


def test_residency_is_read_for_a_data_dir_with_spaces(tmp_path, layout):
    mm = TableShard.create(layout, 1, 0, StoreConfig(storage="mmap", data_dir=str(tmp_path / "my data"),
                                                     optimizer=SGD))
    mm.gather(np.arange(layout.total_rows))
    assert mm.describe()["mapped_resident_bytes"] > 0


def test_a_mapped_shard_saves_without_a_copy_in_ram(tmp_path, layout, monkeypatch):
    mm = TableShard.create(layout, 1, 0, _mmap(tmp_path))
    mm.apply_gradients(np.arange(5), np.ones((5, layout.row_dim), np.float32))
    monkeypatch.setattr(TableShard, "snapshot", _no("snapshot"))  # the whole-table copy
    mm.save(tmp_path / "ckpt")
    back = TableShard.load(tmp_path / "ckpt", layout, 2, 1, StoreConfig(optimizer=SGD))
    ids = np.arange(back.row_start, back.row_stop)
    np.testing.assert_array_equal(back.gather(ids), mm.gather(ids))
