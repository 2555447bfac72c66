"""safetensors files, read lazily and written as a stream (pure numpy + stdlib).

The format (huggingface/safetensors): 8 bytes little-endian ``N``, then ``N`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data; offsets count from the end of the header. A table of 384M rows x 264 bytes is
~100 GB: reading maps the file (:class:`SafetensorsFile`, slices read only what they touch, the
page cache does the rest), and writing takes the tensors chunk by chunk
(:class:`SafetensorsWriter`), so neither side holds a table in RAM. Our own reader rather than
the ``safetensors`` package: it must read ``BF16`` and ``F8_E4M3`` into numpy (the package's
numpy API cannot) and check a hostile header before trusting an offset; the tests check both
directions against the package.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TensorInfo", "SafetensorsFile", "SafetensorsWriter", "DTYPES"]

#: safetensors dtype -> numpy dtype name of its storage (FP8 codes as bytes; BF16 via ml_dtypes).
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
          "U8": "uint8", "BOOL": "bool", "F8_E4M3": "uint8", "F8_E5M2": "uint8", "F8_E8M0": "uint8"}
#: A header larger than this is refused unread (the package's own limit is 100 MB).
MAX_HEADER = 100 << 20


def _np_dtype(st_dtype: str) -> np.dtype:
    name = DTYPES[st_dtype]
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: its safetensors dtype, shape, and byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int   # absolute file offset of its first byte
    nbytes: int


class SafetensorsFile:
    """A safetensors file's header, checked; :meth:`array` maps a tensor read-only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: {size} bytes, not a safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ValueError(f"{self.path}: header of {n} bytes in a file of {size}: not a safetensors file")
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise ValueError(f"{self.path}: the header is not JSON ({type(e).__name__})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: the header is {type(header).__name__}, not an object")
        meta = header.pop("__metadata__", {}) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        data_start, data_size = 8 + n, size - 8 - n
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._entry(name, entry, data_start, data_size)

    def _entry(self, name: str, e: object, data_start: int, data_size: int) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        dtype = e.get("dtype") if isinstance(e, dict) else None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ValueError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        assert isinstance(e, dict)
        shape, offs = e.get("shape"), e.get("data_offsets")
        # type(d) is int: JSON true/false are bools, which isinstance(d, int) would take
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{where}: shape {shape!r} is not a list of at most 8 sizes")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1] <= data_size):
            raise ValueError(f"{where}: data_offsets {offs!r} outside the {data_size} bytes of data")
        nbytes = math.prod(shape) * _np_dtype(dtype).itemsize  # exact: numpy's int64 product wraps
        if offs[1] - offs[0] != nbytes:
            raise ValueError(f"{where}: {offs[1] - offs[0]} bytes for {e['dtype']} {shape} ({nbytes} expected)")
        return TensorInfo(name, dtype, tuple(shape), data_start + offs[0], nbytes)

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only memory map (F8 codes as uint8, BF16 as bfloat16)."""
        if name not in self.tensors:
            raise KeyError(name)
        t = self.tensors[name]
        if t.nbytes == 0:
            return np.zeros(t.shape, dtype=_np_dtype(t.dtype))
        return np.memmap(self.path, dtype=_np_dtype(t.dtype), mode="r", offset=t.start, shape=t.shape)


class SafetensorsWriter:
    """Write tensors ``specs`` (name -> (safetensors dtype, shape)), in that order, each as a
    stream of row chunks (:meth:`write`); :meth:`close` checks every byte came and renames the
    file into place (a crash leaves no file that looks complete). Deterministic: the same
    specs, metadata and data give the same bytes."""

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[str, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise ValueError("SafetensorsWriter: metadata must map strings to strings")
            header["__metadata__"] = dict(metadata)
        self._order: list[tuple[str, int, np.dtype]] = []
        offset = 0
        for name, (dtype, shape) in specs.items():
            if dtype not in DTYPES:
                raise ValueError(f"tensor {name!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
            if name == "__metadata__" or not all(type(d) is int and d >= 0 for d in shape):
                raise ValueError(f"tensor {name!r} of shape {list(shape)}: not a name and shape a reader takes")
            dt = _np_dtype(dtype)
            nbytes = math.prod(shape) * dt.itemsize
            header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes, dt))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the package writes it
        self._tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.partial")
        self._f = self._tmp.open("xb")
        self._f.write(struct.pack("<Q", len(text)) + text)
        self._at, self._left = 0, self._order[0][1] if self._order else 0

    def write(self, name: str, chunk: np.ndarray) -> None:
        """The next bytes of tensor ``name`` (the current one): rows in order, any count."""
        while self._at < len(self._order) and self._left == 0:
            self._next()
        if self._at >= len(self._order) or self._order[self._at][0] != name:
            want = self._order[self._at][0] if self._at < len(self._order) else "nothing more"
            raise ValueError(f"SafetensorsWriter: got data for {name!r}; expected {want!r}")
        arr = np.ascontiguousarray(chunk)
        if arr.dtype != self._order[self._at][2] or arr.nbytes > self._left:  # same dtype: no reinterpreting
            raise ValueError(f"SafetensorsWriter: {arr.dtype} chunk of {arr.nbytes} bytes for {name!r} "
                             f"({self._order[self._at][2]}, {self._left} bytes left)")
        self._f.write(arr.view(np.uint8).reshape(-1).data)
        self._left -= arr.nbytes

    def _next(self) -> None:
        self._at += 1
        if self._at < len(self._order):
            self._left = self._order[self._at][1]

    def close(self) -> Path:
        while self._at < len(self._order) and self._left == 0:
            self._next()
        try:
            if self._at < len(self._order):
                raise ValueError(f"SafetensorsWriter: tensor {self._order[self._at][0]!r} is missing "
                                 f"{self._left} bytes")
            self._f.flush()
            os.fsync(self._f.fileno())
        except BaseException:
            self.abort()
            raise
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop what was written (no file appears)."""
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
