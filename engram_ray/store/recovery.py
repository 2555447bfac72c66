"""Recovery checkpoints of one shard: numbered, written whole, the newest reloaded on restart.

Each checkpoint is written into ``ckpt-<seq>.partial/`` and renamed to ``ckpt-<seq>/`` only
when every file (rows, optimiser state, header with checksums) is on disk, so a shard that
dies mid-save leaves the previous checkpoint intact. ``load_newest`` tries the newest complete
one and falls back to the one before on *any* failure to load it (a truncated or flipped
array, a damaged header, a missing or short state file, an I/O error), saying why; the
unusable one is then renamed ``ckpt-<seq>.unusable/`` (kept as evidence, never pruned). When
checkpoints exist but none loads, it returns no shard and the reasons: the caller must refuse
to serve rather than start again from the initial rows (:class:`Recovered`). The ``keep``
newest complete checkpoints are kept.

Contract (one copy per shard): a shard that restarts serves exactly its newest complete
checkpoint that loads; every update acknowledged before that checkpoint began is in it, updates
acknowledged after it are lost. ``engram-ray checkpoint`` makes one on demand,
``ServiceConfig.checkpoint_every_s`` periodically.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import StoreConfig
from ..core.layout import TableLayout
from .shard import TableShard

__all__ = ["RecoveryCheckpoints", "Recovered", "recovery_dir_name"]

log = logging.getLogger(__name__)


def recovery_dir_name(shard: int, num_shards: int, replica: int | None = None) -> str:
    """The folder of one shard's (copy's) recovery checkpoints under a checkpoint dir,
    ``shard-<iiii>-of-<nnnn>[-r<r>]``: the one spelling a Ray service and a plain
    ``engram-ray shard`` share, so either finds the other's checkpoints."""
    name = f"shard-{shard:04d}-of-{num_shards:04d}"
    return name if replica is None else f"{name}-r{replica}"


_NAME = re.compile(r"ckpt-(\d+)(\.partial|\.unusable)?")


@dataclass
class Recovered:
    """What :meth:`RecoveryCheckpoints.load_newest` found."""

    #: The shard from the newest checkpoint that loads; None if none does (or there is none).
    shard: TableShard | None = None
    #: That checkpoint's directory.
    path: Path | None = None
    #: Checkpoints that failed to load, newest first, with the reason.
    unusable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        """Checkpoints exist but none loads: serving the initial rows would silently lose
        every update they held, so the shard must not serve without an operator's word."""
        return self.shard is None and bool(self.unusable)


class RecoveryCheckpoints:
    """The recovery checkpoints of one shard in ``directory`` (created if missing)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = Path(directory)
        self.keep = max(1, int(keep))
        self._lock = threading.Lock()

    def _entries(self) -> list[tuple[int, str, Path]]:
        """(seq, suffix, path) of every checkpoint directory, complete or not."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.iterdir():
            m = _NAME.fullmatch(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), m.group(2) or "", p))
        return out

    def complete(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        return [p for _, _, p in sorted((e for e in self._entries() if not e[1]), reverse=True)]

    def save(self, shard: TableShard) -> Path:
        """Write a new checkpoint of ``shard``; returns its directory once complete."""
        return self.save_checked(shard)[0]

    def save_checked(self, shard: TableShard) -> tuple[Path, str]:
        """:meth:`save`, also returning the sha256 of the rows it holds."""
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            # numbered past every checkpoint there, unusable ones included (they stay)
            seq = max((e[0] for e in self._entries()), default=0) + 1
            final = self.directory / f"ckpt-{seq:08d}"
            partial = final.with_name(final.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            t0 = time.perf_counter()
            saved = shard.save(partial)
            os.replace(partial, final)  # the checkpoint exists only once it is whole
            _fsync_dir(self.directory)
            for old in self.complete()[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("shard %d: recovery checkpoint %s in %.2f s", shard.shard_index, final.name,
                     time.perf_counter() - t0)
            return final, saved.sha256

    def load_newest(self, layout: TableLayout, num_shards: int, shard_index: int,
                    store: StoreConfig) -> Recovered:
        """The shard from the newest checkpoint that loads (see :class:`Recovered`)."""
        found = Recovered()
        for ckpt in self.complete():
            try:
                found.shard = TableShard.load(ckpt, layout, num_shards, shard_index, store)
            except Exception as e:  # noqa: BLE001 - any failure to load falls back
                why = f"{type(e).__name__}: {e}"
                log.error("shard %d: recovery checkpoint %s is unusable (%s); trying an older one",
                          shard_index, ckpt, why)
                found.unusable.append((ckpt, why))
                continue
            found.path = ckpt
            self.quarantine(found.unusable)  # a newer state than theirs exists from now on
            return found
        if found.unusable:
            log.error("shard %d: none of the %d recovery checkpoints in %s loads; refusing to serve "
                      "(they are kept as they are)", shard_index, len(found.unusable), self.directory)
        return found

    def quarantine(self, unusable: list[tuple[Path, str]]) -> list[Path]:
        """Rename unusable checkpoints to ``<name>.unusable`` (never loaded or pruned again;
        a ``WHY.txt`` inside says what failed); returns their new paths."""
        moved = []
        for path, why in unusable:
            if not path.exists():
                continue
            dest = path.with_name(path.name + ".unusable")
            try:
                os.replace(path, dest)
                (dest / "WHY.txt").write_text(why + "\n")
            except OSError as e:
                log.error("could not set unusable checkpoint %s aside: %s", path, e)
                continue
            log.warning("recovery checkpoint %s set aside as %s: %s", path.name, dest.name, why)
            moved.append(dest)
        return moved


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
