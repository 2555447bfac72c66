"""Disk-backed rows (``StoreConfig(storage="mmap", data_dir=...)``): a shard's rows in a file,
memory-mapped, so a memory node serves more table than it has RAM -- the page cache keeps the
hot rows, a cold page costs a disk read.

One file per shard range and layout, ``rows-<fingerprint>-<start>-<stop>.<dtype>.bin``, raw
rows ``[n, dim]``, and beside it a JSON sidecar written only once the file is complete (a
crash while filling leaves no sidecar, so the next start fills again). The sidecar records
where the rows came from ("init" or a checkpoint directory): a restart asking for the same
source reopens the file without a copy; one asking for another refills it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .rows import numpy_dtype

__all__ = ["open_rows", "mapped_stats", "evict"]

log = logging.getLogger(__name__)

#: Rows filled per step: what a fill holds in RAM besides the mapping.
FILL_ROWS = 1 << 16


def _paths(data_dir: str, fingerprint: str, start: int, stop: int, dtype: str) -> tuple[Path, Path, Path]:
    stem = f"rows-{fingerprint}-{start:013d}-{stop:013d}.{dtype}"
    return (Path(data_dir) / f"{stem}.bin", Path(data_dir) / f"{stem}.json", Path(data_dir) / f"{stem}.lock")


class _Lock:
    """An exclusive flock on a shard's rows, held while its mapping lives: two copies of a
    shard on one node with one data_dir would otherwise share the rows (and apply every
    update twice)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            raise ValueError(f"mapped rows {path.with_suffix('.bin')} are in use by another shard: give each "
                             "copy of a shard its own --data-dir") from None

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


def open_rows(data_dir: str, fingerprint: str, start: int, stop: int, dim: int, dtype: str, source: str,
              fill: Callable[[int, int], np.ndarray]) -> np.memmap:
    """The mapped rows ``[stop - start, dim]`` of range ``[start, stop)``: reopened as they are
    when the sidecar says the file is complete and came from ``source``; else filled by
    ``fill(a, b)`` (global rows ``[a, b)`` in ``dtype``, asked in order from ``start``), a
    chunk at a time, and only then marked complete."""
    data, meta, lock_path = _paths(data_dir, fingerprint, start, stop, dtype)
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    lock = _Lock(lock_path)
    dt = numpy_dtype(dtype)
    n = stop - start
    want = {"fingerprint": fingerprint, "row_start": start, "row_stop": stop, "dim": dim, "dtype": dtype}
    try:
        have = json.loads(meta.read_text())
    except (OSError, ValueError):
        have = None
    if (isinstance(have, dict) and {k: have.get(k) for k in want} == want and have.get("source") == source
            and data.exists() and data.stat().st_size == n * dim * dt.itemsize):
        log.info("mapped rows %s reopened (from %s)", data, source)
        return _held(np.memmap(data, dtype=dt, mode="r+", shape=(n, dim)), lock)
    if isinstance(have, dict):
        why = "another source" if have.get("source") != source else "a file of another size"
        log.warning("mapped rows %s: %s (%r, now %r); filling them again", data, why, have.get("source"), source)
    meta.unlink(missing_ok=True)  # incomplete until the fill is done
    # filled under another name and renamed into place: whoever still maps the old file (a
    # shard going down) keeps its pages, never a file cut short under it
    part = data.with_name(data.name + ".partial")
    with open(part, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(1, n * dim * dt.itemsize))  # a full disk fails here, not as SIGBUS
    rows = np.memmap(part, dtype=dt, mode="r+", shape=(n, dim))
    for a in range(0, n, FILL_ROWS):
        b = min(n, a + FILL_ROWS)
        rows[a:b] = fill(start + a, start + b)
    rows.flush()
    del rows
    os.replace(part, data)
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps({**want, "source": source}))
    os.replace(tmp, meta)
    log.info("mapped rows %s filled from %s", data, source)
    return _held(np.memmap(data, dtype=dt, mode="r+", shape=(n, dim)), lock)


def _held(rows: np.memmap, lock: _Lock) -> np.memmap:
    """``rows`` holding ``lock`` as long as the mapping lives, advised for random access:
    lookups read random rows, and readahead around a faulting page reads 32 pages to use one."""
    rows._engram_lock = lock  # type: ignore[attr-defined]
    rows._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]
    return rows


def mapped_stats(rows: Any) -> dict[str, int]:
    """Bytes of ``rows``' file mapping, and how many of them are in RAM now (this process's
    resident pages of it, from /proc/self/smaps; 0 where that cannot be read)."""
    if not isinstance(rows, np.memmap) or rows.filename is None:
        return {"mapped_bytes": 0, "mapped_resident_bytes": 0}
    name, resident = os.path.realpath(rows.filename), 0
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(maxsplit=5)  # the path (field 6) may hold spaces
                if head and "-" in head[0] and len(head) >= 5 and all(c in "0123456789abcdef-" for c in head[0]):
                    inside = len(head) >= 6 and head[5].rstrip("\n") == name
                elif inside and line.startswith("Rss:"):
                    resident += int(head[1]) * 1024
    except OSError:
        resident = 0
    # whole pages: the last one is counted whole, though the file may end inside it
    return {"mapped_bytes": int(rows.nbytes), "mapped_resident_bytes": min(resident, int(rows.nbytes))}


def evict(rows: Any) -> bool:
    """Drop ``rows``' file pages from this process and from the page cache, so the next reads
    come from the disk (benchmarks: a table colder than any cache). Pages written and not yet
    flushed stay (they are flushed first). False where it cannot be done (not a mapped file)."""
    mm = getattr(rows, "_mmap", None)
    if not isinstance(rows, np.memmap) or mm is None or rows.filename is None:
        return False
    rows.flush()
    mm.madvise(mmap.MADV_DONTNEED)  # unmap our pages: the page cache may then drop them
    fd = os.open(rows.filename, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True
