"""Checkpoints of a table, one file set per shard, loadable into any other shard count.

A checkpoint is a directory. Each shard writes ``rows-<start>-<stop>.npy`` (raw little-endian
bytes viewed as unsigned ints of the storage width, since .npy cannot name bfloat16), its
optimiser state beside it, and last a ``rows-<start>-<stop>.json`` header with the layout
fingerprint, dtype, dim and a sha256 of every array. Loading ``[a, b)`` stitches the
overlapping pieces of whatever shard count wrote the checkpoint.

Writing is safe against concurrent saves and a hostile neighbour on the filesystem: every
file is created under a fresh random temporary name with ``O_EXCL | O_NOFOLLOW`` (a planted
symlink, or another writer's temporary file, is never written through), relative to the
directory opened once, then renamed into place; and a save holds an ``flock`` on the
directory, so two saves into one directory never interleave their files (a header always
describes the rows beside it). A crash leaves no torn file that looks complete. Over the wire
a shard writes only under its configured root (:func:`open_under`).

Loading trusts nothing in the files: an unreadable, incomplete or altered header, a truncated
or flipped array, a missing or short optimiser-state file each raise a
:class:`~engram_ray.errors.CheckpointError` that names the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from ..config import STORE_DTYPES
from ..core.dtypes import FP8
from ..errors import CheckpointError, InvalidRequest
from .rows import numpy_dtype, sha256_hex

__all__ = ["save_shard", "save_rows", "load_range", "verify_range", "list_pieces", "open_under"]

_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32}
#: Optimiser-state arrays a header may list: (dtype, dims).
_STATE = {"adam_m": (np.float32, 2), "adam_v": (np.float32, 2), "adam_steps": (np.int64, 1)}
_FORMAT = "engram-ray-shard-v1"


# Writing ---------------------------------------------------------------------------------
def _write_file(dir_fd: int, name: str, write) -> None:
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def open_under(root: str | os.PathLike, requested: str) -> tuple[int, Path]:
    """Open (creating it) directory ``requested`` inside ``root``, for a Save that came over
    the wire: ``(directory fd, path)``. ``requested`` is relative to ``root``, or absolute
    and inside it; ``..``, and a symlink at any level below ``root``, are refused (the walk
    opens each level with ``O_NOFOLLOW`` relative to the one above, so nothing can swap a
    level for a symlink between a check and the write)."""
    if not root:
        raise InvalidRequest("Save: this service has no save root, so it writes no portable checkpoints; "
                             "deploy it with ServiceConfig(save_root=DIR) (engram-ray serve --save-root DIR)")
    base = Path(os.path.abspath(root))
    req = Path(requested)
    if req.is_absolute():
        if os.path.normpath(req) != str(req).rstrip("/") or not req.is_relative_to(base):
            raise InvalidRequest(f"Save: {requested!r} is not inside the service's save root {str(base)!r}; "
                                 "give a path relative to it")
        req = req.relative_to(base)
    parts = req.parts
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise InvalidRequest(f"Save: {requested!r} must name a directory below the save root {str(base)!r}, "
                             "without '..'")
    os.makedirs(base, exist_ok=True)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                raise InvalidRequest(f"Save: {requested!r}: {part!r} below the save root is a symlink or not "
                                     f"a directory ({e.strerror}); refused") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd, base.joinpath(*parts)


def save_shard(shard, directory: str | os.PathLike, *, dir_fd: int | None = None):
    """Write ``shard``'s rows and optimiser state into ``directory`` (created if missing; or
    the already open ``dir_fd``, with ``directory`` naming it); returns a :class:`Saved`."""
    from .shard import Saved

    d = Path(directory)
    own = dir_fd is None
    if dir_fd is None:
        d.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stem = f"rows-{shard.row_start:013d}-{shard.row_stop:013d}"
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)  # one save at a time into this directory
        try:
            if isinstance(shard.values, np.memmap) and not shard.optimizer.state():
                # a mapped shard (no optimiser state): its rows stream from the mapping to the file
                # under the writers' lock, never copied whole into RAM (they may not fit)
                with shard._lock:
                    sha = _write_piece(dir_fd, shard.fingerprint, shard.row_start, shard.values, shard.store.dtype,
                                       shard.store.optimizer.kind, {})
            else:
                state = shard.snapshot()  # consistent: no update between the rows and the state
                values = state.pop("rows")
                sha = _write_piece(dir_fd, shard.fingerprint, shard.row_start, values, shard.store.dtype,
                                   shard.store.optimizer.kind, state)
        finally:
            fcntl.flock(dir_fd, fcntl.LOCK_UN)
    finally:
        if own:
            os.close(dir_fd)
    return Saved(str(d / f"{stem}.json"), sha)


def save_rows(directory: str | os.PathLike, fingerprint: str, row_start: int, rows_nd: np.ndarray,
              dtype: str) -> str:
    """Write rows ``[row_start, row_start + N)`` (``rows_nd`` ``[N, D]`` in storage ``dtype``)
    as one piece of a checkpoint in ``directory``, with no optimiser state: how a table
    imported from elsewhere becomes a checkpoint chunk by chunk (any piece boundaries load
    into any shard count). Returns the rows' sha256."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        return _write_piece(dir_fd, fingerprint, row_start, rows_nd, dtype, "none", {})
    finally:
        os.close(dir_fd)  # releases the lock


def _write_piece(dir_fd: int, fingerprint: str, row_start: int, values: np.ndarray, dtype: str,
                 optimizer: str, state: dict[str, np.ndarray]) -> str:
    """One piece: the rows, each state array, then the header that makes it complete."""
    stem = f"rows-{row_start:013d}-{row_start + values.shape[0]:013d}"
    _write_file(dir_fd, f"{stem}.npy", lambda f: np.save(f, values.view(_RAW[values.dtype.itemsize])))
    for name, arr in state.items():
        _write_file(dir_fd, f"{stem}.{name}.npy", lambda f, a=arr: np.save(f, a))
    sha = sha256_hex(values)
    header = {"format": _FORMAT, "fingerprint": fingerprint,
              "row_start": row_start, "row_stop": row_start + values.shape[0], "dim": values.shape[1],
              "dtype": dtype, "optimizer": optimizer, "state": sorted(state), "sha256": sha,
              "state_sha256": {k: sha256_hex(v) for k, v in state.items()}}
    _write_file(dir_fd, f"{stem}.json", lambda f: f.write(json.dumps(header, indent=1).encode()))
    os.fsync(dir_fd)
    return sha


# Loading ---------------------------------------------------------------------------------
def _header(path: Path, fingerprint: str) -> dict[str, Any]:
    """A header, with every field checked; CheckpointError naming the file otherwise."""
    try:
        h = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"checkpoint header {path} is unreadable: {e}") from None
    want = {"format": str, "fingerprint": str, "row_start": int, "row_stop": int, "dim": int,
            "dtype": str, "optimizer": str, "state": list, "sha256": str, "state_sha256": dict}
    bad = [k for k, t in want.items() if not isinstance(h, dict) or type(h.get(k)) is not t]
    if bad:
        raise CheckpointError(f"checkpoint header {path} is incomplete or damaged: "
                              f"{', '.join(bad)} missing or of the wrong type")
    if h["format"] != _FORMAT:
        raise CheckpointError(f"checkpoint header {path} has format {h['format']!r}; expected {_FORMAT!r}")
    if h["fingerprint"] != fingerprint:
        raise CheckpointError(f"checkpoint {path.name} was written for layout {h['fingerprint']!r}, "
                              f"not {fingerprint!r}")
    if not (0 <= h["row_start"] < h["row_stop"]) or h["dim"] < 1 or h["dtype"] not in STORE_DTYPES:
        raise CheckpointError(f"checkpoint header {path} is damaged: rows [{h['row_start']}, {h['row_stop']}) "
                              f"of dim {h['dim']} in {h['dtype']!r}")
    want_state = set(_STATE) if h["optimizer"] == "adam" else set()
    if set(h["state"]) != want_state or set(h["state_sha256"]) != want_state:
        raise CheckpointError(f"checkpoint header {path} is damaged: optimiser {h.get('optimizer')!r} with "
                              f"state {h['state']} and checksums for {sorted(h['state_sha256'])}")
    h["path"] = path.with_suffix(".npy")
    return h


def list_pieces(directory: str | os.PathLike, fingerprint: str) -> list[dict[str, Any]]:
    """The complete pieces (those with a header) of a checkpoint, checked against a layout."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {str(d)!r} does not exist")
    pieces = [_header(hp, fingerprint) for hp in sorted(d.glob("rows-*.json"))]
    if not pieces:
        raise CheckpointError(f"checkpoint {str(d)!r} holds no shard headers (rows-*.json)")
    return pieces


def _array(path: Path, dtype, shape: tuple[int, ...], sha: str | None, what: str) -> np.ndarray:
    """A memory-mapped array file, checked for dtype, shape and (``sha``) checksum."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint piece {path.name}: {what} file is missing") from None
    except (OSError, ValueError, EOFError) as e:  # truncated, or not an .npy at all
        raise CheckpointError(f"checkpoint piece {path.name}: {what} is unreadable ({e}): "
                              "the file is truncated or corrupt") from None
    if arr.dtype != np.dtype(dtype) or arr.shape != shape:
        raise CheckpointError(f"checkpoint piece {path.name}: {what} is {arr.dtype} {arr.shape}; "
                              f"the header says {np.dtype(dtype)} {shape}")
    if sha is not None and sha256_hex(arr) != sha:
        raise CheckpointError(f"checkpoint piece {path.name}: {what} fails its checksum: the file is corrupt")
    return arr


def verify_range(directory: str | os.PathLike, fingerprint: str, start: int, stop: int) -> None:
    """Check once the checksum of every piece overlapping rows ``[start, stop)``: then a reader
    that takes the range in many chunks (a mapped shard's fill, an export) passes
    ``verify=False``, instead of hashing each whole piece again for every chunk."""
    for h in list_pieces(directory, fingerprint):
        if h["row_start"] < stop and h["row_stop"] > start:
            _array(h["path"], _RAW[numpy_dtype(h["dtype"]).itemsize], (h["row_stop"] - h["row_start"], h["dim"]),
                   h["sha256"], "rows")


def load_range(directory: str | os.PathLike, fingerprint: str, start: int, stop: int, dim: int,
               dtype: str, *, with_state: bool = False, verify: bool = True
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows ``[start, stop)`` (and optionally Adam state) from a checkpoint written by any
    number of shards; the rows are converted to ``dtype`` if the checkpoint used another.
    Holds a shared lock on the directory meanwhile, so a save into it waits (and vice versa)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise CheckpointError(f"checkpoint {str(directory)!r} does not exist or is not a directory "
                              f"({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return _load_range(directory, fingerprint, start, stop, dim, dtype, with_state, verify)
    finally:
        os.close(fd)  # releases the lock


def _load_range(directory, fingerprint, start, stop, dim, dtype, with_state, verify):
    pieces = sorted(list_pieces(directory, fingerprint), key=lambda h: h["row_start"])
    out = np.empty((stop - start, dim), dtype=numpy_dtype(dtype))
    state: dict[str, np.ndarray] = {}
    covered = start
    for h in pieces:
        lo, hi = max(start, h["row_start"]), min(stop, h["row_stop"])
        if lo >= hi:
            continue
        if lo > covered:
            break
        if (h["dtype"] == FP8) != (dtype == FP8):  # packed bytes and values do not convert by a cast
            raise CheckpointError(f"checkpoint piece {h['path'].name} holds {h['dtype']} rows; a {dtype} table "
                                  "cannot load them (import the table again with that --dtype)")
        if h["dim"] != dim:
            raise CheckpointError(f"checkpoint piece {h['path'].name} has rows of {h['dim']}, not {dim}")
        n = h["row_stop"] - h["row_start"]
        src_dt = numpy_dtype(h["dtype"])
        rows = _array(h["path"], _RAW[src_dt.itemsize], (n, dim), h["sha256"] if verify else None, "rows").view(src_dt)
        a, b = lo - h["row_start"], hi - h["row_start"]
        out[lo - start: hi - start] = rows[a:b].astype(out.dtype, copy=False)
        if with_state:
            for name in h["state"]:
                kind, ndim = _STATE[name]
                arr = _array(h["path"].with_suffix(f".{name}.npy"), kind, (n, dim)[:ndim],
                             h["state_sha256"][name] if verify else None, f"its {name} state")
                if name not in state:
                    state[name] = np.zeros((stop - start,) + arr.shape[1:], dtype=arr.dtype)
                state[name][lo - start: hi - start] = arr[a:b]
        covered = max(covered, hi)
    if covered < stop:
        raise CheckpointError(f"checkpoint {str(directory)!r} does not cover rows [{covered}, {stop})")
    return out, state
