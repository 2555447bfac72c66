"""Recovery checkpoints of one shard: numbered, written whole, the newest reloaded on restart.

Each checkpoint is written into ``ckpt-<seq>.partial/`` and renamed to ``ckpt-<seq>/`` only
when every file (rows, optimiser state, header with checksums) is on disk, so a shard that
dies mid-save leaves the previous checkpoint intact. ``load_newest`` tries the newest complete
one and falls back to the one before if its checksums fail. The ``keep`` newest are kept.

Contract (one copy per shard): a shard that restarts serves exactly its newest complete
checkpoint; every update acknowledged before that checkpoint began is in it, updates
acknowledged after it are lost. ``engram-ray checkpoint`` makes one on demand,
``ServiceConfig.checkpoint_every_s`` periodically.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

from ..config import StoreConfig
from ..core.layout import TableLayout
from ..errors import CheckpointError
from .shard import TableShard

__all__ = ["RecoveryCheckpoints"]

log = logging.getLogger(__name__)


class RecoveryCheckpoints:
    """The recovery checkpoints of one shard in ``directory`` (created if missing)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = Path(directory)
        self.keep = max(1, int(keep))
        self._lock = threading.Lock()

    def complete(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("ckpt-")
                 and not p.name.endswith(".partial")]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)

    def save(self, shard: TableShard) -> Path:
        """Write a new checkpoint of ``shard``; returns its directory once complete."""
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            done = self.complete()
            seq = int(done[0].name.split("-")[1]) + 1 if done else 1
            final = self.directory / f"ckpt-{seq:08d}"
            partial = final.with_name(final.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            t0 = time.perf_counter()
            shard.save(partial)
            os.replace(partial, final)  # the checkpoint exists only once it is whole
            _fsync_dir(self.directory)
            for old in self.complete()[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("shard %d: recovery checkpoint %s in %.2f s", shard.shard_index, final.name,
                     time.perf_counter() - t0)
            return final

    def load_newest(self, layout: TableLayout, num_shards: int, shard_index: int,
                    store: StoreConfig) -> tuple[TableShard, Path] | None:
        """The shard from the newest checkpoint that verifies, or None if there is none."""
        for ckpt in self.complete():
            try:
                return TableShard.load(ckpt, layout, num_shards, shard_index, store), ckpt
            except CheckpointError as e:
                log.warning("shard %d: recovery checkpoint %s is unusable (%s); trying an older one",
                            shard_index, ckpt, e)
        return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
