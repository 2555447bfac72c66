"""Checkpoints of a table, one file set per shard, loadable into any other shard count.

A checkpoint is a directory. Each shard writes ``rows-<start>-<stop>.npy`` (raw little-endian
bytes viewed as unsigned ints of the storage width, since .npy cannot name bfloat16), its
optimiser state beside it, and last a ``rows-<start>-<stop>.json`` header with the layout
fingerprint, dtype, dim and a sha256 of the rows. Every file is written to a temp name and
renamed, so a crash leaves no torn file that looks complete. Loading ``[a, b)`` stitches the
overlapping pieces of whatever shard count wrote the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .rows import numpy_dtype

__all__ = ["save_shard", "load_range", "list_pieces"]

_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).view(np.uint8)).hexdigest()


def save_shard(shard, directory: str | os.PathLike) -> Path:
    """Write ``shard``'s rows and optimiser state into ``directory``; returns the header path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    stem = f"rows-{shard.row_start:013d}-{shard.row_stop:013d}"
    with shard._lock:  # a consistent snapshot: no update between rows and state
        values = shard.values.copy()
        state = {k: v.copy() for k, v in shard.optimizer.state().items()}
    raw = values.view(_RAW[values.dtype.itemsize])
    _atomic_write(d / f"{stem}.npy", lambda f: np.save(f, raw))
    for name, arr in state.items():
        _atomic_write(d / f"{stem}.{name}.npy", lambda f, a=arr: np.save(f, a))
    header = {"format": "engram-ray-shard-v1", "fingerprint": shard.fingerprint,
              "row_start": shard.row_start, "row_stop": shard.row_stop, "dim": shard.dim,
              "dtype": shard.store.dtype, "optimizer": shard.store.optimizer.kind,
              "state": sorted(state), "sha256": _sha256(values),
              "state_sha256": {k: _sha256(v) for k, v in state.items()}}
    path = d / f"{stem}.json"
    _atomic_write(path, lambda f: f.write(json.dumps(header, indent=1).encode()))
    return path


def list_pieces(directory: str | os.PathLike, fingerprint: str) -> list[dict[str, Any]]:
    """The complete pieces (those with a header) of a checkpoint, checked against a layout."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {str(d)!r} does not exist")
    pieces = []
    for hp in sorted(d.glob("rows-*.json")):
        try:
            h = json.loads(hp.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint header {hp} is unreadable: {e}") from None
        if h.get("fingerprint") != fingerprint:
            raise CheckpointError(f"checkpoint {hp.name} was written for layout {h.get('fingerprint')!r}, "
                                  f"not {fingerprint!r}")
        h["path"] = hp.with_suffix(".npy")
        pieces.append(h)
    if not pieces:
        raise CheckpointError(f"checkpoint {str(d)!r} holds no shard headers (rows-*.json)")
    return pieces


def load_range(directory: str | os.PathLike, fingerprint: str, start: int, stop: int, dim: int,
               dtype: str, *, with_state: bool = False, verify: bool = True
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows ``[start, stop)`` (and optionally Adam state) from a checkpoint written by any
    number of shards; the rows are converted to ``dtype`` if the checkpoint used another."""
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
        if h["dim"] != dim:
            raise CheckpointError(f"checkpoint piece {h['path'].name} has rows of {h['dim']}, not {dim}")
        src_dt = numpy_dtype(h["dtype"])
        raw = np.load(h["path"], mmap_mode="r")
        rows = raw.view(src_dt)
        if rows.shape != (h["row_stop"] - h["row_start"], dim):
            raise CheckpointError(f"checkpoint piece {h['path'].name} has shape {rows.shape}")
        if verify and _sha256(rows) != h["sha256"]:
            raise CheckpointError(f"checkpoint piece {h['path'].name} fails its checksum: "
                                  "the file is corrupt")
        a, b = lo - h["row_start"], hi - h["row_start"]
        out[lo - start: hi - start] = rows[a:b].astype(out.dtype, copy=False)
        if with_state:
            for name in h["state"]:
                arr = np.load(h["path"].with_suffix(f".{name}.npy"), mmap_mode="r")
                if verify and _sha256(arr) != h["state_sha256"][name]:
                    raise CheckpointError(f"checkpoint piece {h['path'].name}: its {name} state fails "
                                          "its checksum: the file is corrupt")
                if name not in state:
                    shape = (stop - start,) + arr.shape[1:]
                    state[name] = np.zeros(shape, dtype=arr.dtype)
                state[name][lo - start: hi - start] = arr[a:b]
        covered = max(covered, hi)
    if covered < stop:
        raise CheckpointError(f"checkpoint {str(directory)!r} does not cover rows [{covered}, {stop})")
    return out, state
