"""Checkpoint files under attack: every kind of damage is a CheckpointError that names the
file; concurrent saves into one directory never give a checkpoint that fails its checksum; a
symlink planted where a save writes is never written through; wire paths stay under a root."""

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from engram_ray.config import OptimizerConfig, StoreConfig
from engram_ray.errors import CheckpointError, InvalidRequest
from engram_ray.store import TableShard
from engram_ray.store.checkpoint import load_range

ADAM = StoreConfig(optimizer=OptimizerConfig(kind="adam", lr=0.1))


def _trained(layout):
    s = TableShard.create(layout, 1, 0, ADAM)
    s.apply_gradients(np.arange(0, 200, 3), np.ones((67, 16), np.float32))
    return s


def _flip(p: Path, at: int = -1) -> None:
    b = bytearray(p.read_bytes())
    b[at] ^= 0xFF
    p.write_bytes(bytes(b))


def _cut(p: Path, keep: float = 0.5) -> None:
    p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])


def _header(d: Path) -> Path:
    return next(d.glob("rows-*.json"))


def _edit_header(d: Path, **change) -> None:
    h = json.loads(_header(d).read_text())
    for k, v in change.items():
        if v is None:
            h.pop(k)
        else:
            h[k] = v
    _header(d).write_text(json.dumps(h))


DAMAGE = {
    "rows truncated": (lambda d: _cut(next(d.glob("rows-*[0-9].npy"))), "truncated or corrupt"),
    "rows flipped": (lambda d: _flip(next(d.glob("rows-*[0-9].npy"))), "fails its checksum"),
    "rows not an npy": (lambda d: next(d.glob("rows-*[0-9].npy")).write_bytes(b"garbage" * 100), "unreadable"),
    "rows missing": (lambda d: next(d.glob("rows-*[0-9].npy")).unlink(), "rows file is missing"),
    "header garbage": (lambda d: _header(d).write_bytes(b"\xff\xfe{not json"), "is unreadable"),
    "header cut short": (lambda d: _cut(_header(d), 0.6), "is unreadable"),
    "header without sha256": (lambda d: _edit_header(d, sha256=None), "sha256 missing"),
    "header row_stop a string": (lambda d: _edit_header(d, row_stop="12"), "row_stop missing or of the wrong type"),
    "header dim changed": (lambda d: _edit_header(d, dim=15), "has rows of 15, not 16"),
    "header not an object": (lambda d: _header(d).write_text("[1, 2]"), "incomplete or damaged"),
    "header state list altered": (lambda d: _edit_header(d, state=["adam_m", "bogus"]), "is damaged: optimiser"),
    "header state emptied": (lambda d: _edit_header(d, state=[], state_sha256={}), "is damaged: optimiser 'adam'"),
    "header without optimizer": (lambda d: _edit_header(d, optimizer=None), "optimizer missing"),
    "state file missing": (lambda d: next(d.glob("rows-*.adam_v.npy")).unlink(), "adam_v state file is missing"),
    "state file short": (lambda d: _cut(next(d.glob("rows-*.adam_m.npy")), 0.9), "adam_m state is unreadable"),
    "state file flipped": (lambda d: _flip(next(d.glob("rows-*.adam_steps.npy"))),
                           "adam_steps state fails its checksum"),
    "state file of another shape": (lambda d: np.save(next(d.glob("rows-*.adam_v.npy")), np.zeros((3, 16), np.float32)),
                                    r"header says float32 \(8214, 16\)"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_every_kind_of_damage_is_a_checkpoint_error_naming_the_file(tiny_layout, tmp_path, kind):
    _trained(tiny_layout).save(tmp_path)
    damage, match = DAMAGE[kind]
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=match):
        TableShard.load(tmp_path, tiny_layout, 1, 0, ADAM)


def test_saved_names_the_header_and_the_checksum_of_what_was_saved(tiny_layout, tmp_path):
    s = _trained(tiny_layout)
    saved = s.save(tmp_path)
    assert Path(saved.path) == _header(tmp_path)
    assert saved.sha256 == json.loads(_header(tmp_path).read_text())["sha256"] == s.checksum()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_concurrent_saves_into_one_directory_always_verify(tiny_layout, tmp_path):
    """Two saves of one shard into one directory while it trains: each answers only once its
    files are whole and consistent, so the directory always loads and verifies."""
    s = _trained(tiny_layout)
    rng = np.random.default_rng(0)
    for round_ in range(15):
        errors: list[Exception] = []

        def save(errors=errors):
            try:
                s.save(tmp_path)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=save) for _ in range(2)]
        for t in threads:
            t.start()
        s.apply_gradients(rng.integers(0, 8214, 50), rng.normal(size=(50, 16)).astype(np.float32))
        for t in threads:
            t.join()
        assert not errors, errors
        rows, state = load_range(tmp_path, s.fingerprint, 0, s.row_stop, 16, "float32", with_state=True)
        assert set(state) == {"adam_m", "adam_v", "adam_steps"}, round_


def test_a_symlink_planted_at_a_temporary_name_is_not_written_through(tiny_layout, tmp_path):
    s = _trained(tiny_layout)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = tmp_path / "ckpt"
    d.mkdir()
    stem = f"rows-{0:013d}-{s.row_stop:013d}"
    # the temporary names a save used to write (pid-based, predictable), all pointing at the victim
    for name in [f"{stem}.npy", f"{stem}.json", *(f"{stem}.{k}.npy" for k in ("adam_m", "adam_v", "adam_steps"))]:
        (d / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
    s.save(d)
    assert victim.read_bytes() == b"precious"
    assert TableShard.load(d, tiny_layout, 1, 0, ADAM).checksum() == s.checksum()


def test_open_under_keeps_wire_paths_inside_the_root(tiny_layout, tmp_path):
    from engram_ray.store.checkpoint import open_under, save_shard
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    with pytest.raises(InvalidRequest, match="no save root"):
        open_under("", "x")
    for bad, match in [("/etc/engram", "not inside the service's save root"),
                       (str(outside), "not inside"),
                       ("../outside", "without '..'"), ("a/../../outside", "without '..'"),
                       (f"{root}/../outside", "not inside"), ("", "must name a directory"),
                       (".", "must name a directory")]:
        with pytest.raises(InvalidRequest, match=match):
            open_under(root, bad)
    (root / "link").symlink_to(outside)
    (root / "file").write_text("x")
    for bad in ("link", "link/deeper", "file/x"):
        with pytest.raises(InvalidRequest, match="symlink or not a directory"):
            open_under(root, bad)
    assert list(outside.iterdir()) == []
    s = _trained(tiny_layout)
    for ok in ("a/b", f"{root}/c"):
        fd, path = open_under(root, ok)
        try:
            saved = save_shard(s, path, dir_fd=fd)
        finally:
            os.close(fd)
        assert Path(saved.path).parent == path and path.is_relative_to(root)
        assert TableShard.load(path, tiny_layout, 1, 0, ADAM).checksum() == s.checksum()
