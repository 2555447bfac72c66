"""Engram tables in and out of safetensors files: import a checkpoint's tables into a portable
checkpoint directory (``serve --checkpoint DIR``, ``shard --checkpoint DIR``), chunk by chunk, and
export a table back.

Sources a layer's table may come as (``[layer_rows, row_dim]``, rows in (order, head) order:
the layout's, and the reference demo's ``MultiHeadEmbedding`` weight, which stacks its heads'
tables the same way):

* float weights, ``F32`` / ``BF16`` / ``F16`` (the reference demo, a trained table);
* FP8: ``F8_E4M3`` codes with their scales in a second tensor ``[layer_rows, row_dim / 32]``,
  as ue8m0 exponent bytes (``U8`` / ``F8_E8M0``: scale ``2**(s - 127)``) or float scales.
  They are dequantised on import (exactly: an e4m3 value times a power of two is a bfloat16).

Tensor names come from a :class:`NameMap`: a pattern with ``{layer}`` (default
:data:`DEFAULT_PATTERN`) or explicit names per layer; the scales of a tensor named ``...weight``
are ``...weight_scale_inv`` (DeepSeek's FP8 convention) unless given. Every tensor is checked
against the layout -- present, shape, dtype, its scales -- before a byte is written, and a
mismatch names the tensor, what it has and what the layout expects. The files are memory-mapped
(:mod:`engram_ray.core.safetensors`): a chunk is read when it is converted, so no process ever
holds a whole table.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core import fp8
from ..core.dtypes import FP8, numpy_dtype, row_width
from ..core.layout import TableLayout
from ..core.safetensors import SafetensorsFile, SafetensorsWriter
from .checkpoint import save_rows

__all__ = ["DEFAULT_PATTERN", "NameMap", "LayerSource", "plan_import", "import_tables", "export_tables",
           "ImportReport"]

#: Where a layer's table is looked for unless told otherwise ({layer}: the layer id).
DEFAULT_PATTERN = "model.layers.{layer}.engram.embedding.weight"
#: Storage dtype -> safetensors dtype of an exported table.
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_FLOAT_SOURCES = ("F32", "BF16", "F16")


@dataclass(frozen=True)
class NameMap:
    """Tensor names per Engram layer: ``names[layer_id]`` if given, else ``pattern``; the FP8
    scales of a table in ``scales[layer_id]``, else its name with ``weight`` ->
    ``weight_scale_inv`` (or ``+ "_scale_inv"``)."""

    pattern: str = DEFAULT_PATTERN
    names: Mapping[int, str] = field(default_factory=dict)
    scales: Mapping[int, str] = field(default_factory=dict)

    def table(self, layer_id: int) -> str:
        if layer_id in self.names:
            return self.names[layer_id]
        if "{layer}" not in self.pattern:
            raise ValueError(f"name pattern {self.pattern!r}: expected a '{{layer}}' in it")
        return self.pattern.replace("{layer}", str(layer_id))

    def scale(self, layer_id: int) -> str:
        if layer_id in self.scales:
            return self.scales[layer_id]
        name = self.table(layer_id)
        return name[:-len("weight")] + "weight_scale_inv" if name.endswith("weight") else name + "_scale_inv"


@dataclass(frozen=True)
class LayerSource:
    """Where one layer's table is: its file and tensor (and, for FP8, its scales')."""

    layer_id: int
    row_start: int            # the layer's first global row
    rows: int
    file: SafetensorsFile
    tensor: str
    scales: str | None = None

    def read_packed(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` as packed FP8 rows ``[b - a, D + D/32]``: an FP8 source's own codes
        and ue8m0 scales byte for byte, anything else quantised."""
        if self.scales is not None and self.file.tensors[self.scales].dtype in ("U8", "F8_E8M0"):
            return fp8.pack_rows(np.asarray(self.file.array(self.tensor)[a:b]),
                                 np.asarray(self.file.array(self.scales)[a:b]))
        return fp8.quantize_packed(self.read(a, b))

    def read(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` of the layer as float32 ``[b - a, D]`` (FP8 dequantised)."""
        block = self.file.array(self.tensor)[a:b]
        if self.scales is None:
            return np.asarray(block, dtype=np.float32)
        s = self.file.array(self.scales)[a:b]
        if self.file.tensors[self.scales].dtype in ("U8", "F8_E8M0"):
            return fp8.dequantize_rows(np.asarray(block), np.asarray(s))
        values = fp8.decode_e4m3(np.asarray(block))                                   # float scales
        n, d = values.shape
        return (values.reshape(n, -1, fp8.BLOCK) * np.asarray(s, np.float32)[..., None]).reshape(n, d)


def _find(files: Sequence[SafetensorsFile], name: str) -> SafetensorsFile | None:
    return next((f for f in files if name in f.tensors), None)


def plan_import(paths: Sequence[str | os.PathLike], layout: TableLayout, names: NameMap = NameMap()
                ) -> list[LayerSource]:
    """Find and check every layer's table in the files (before anything is written)."""
    if not paths:
        raise ValueError("no safetensors files given")
    files = [SafetensorsFile(p) for p in paths]
    held = sorted({t for f in files for t in f.tensors})
    out, d = [], layout.row_dim
    for li, layer_id in enumerate(layout.layer_ids):
        name, rows = names.table(layer_id), layout.layer_rows[li]
        f = _find(files, name)
        if f is None:
            shown = ", ".join(held[:12]) + (f", ... ({len(held)} in all)" if len(held) > 12 else "")
            raise ValueError(f"tensor {name!r} (Engram layer {layer_id}) is in none of the files; they hold: "
                             f"{shown}. Map names with --pattern or --names")
        t = f.tensors[name]
        if t.shape != (rows, d):
            raise ValueError(f"tensor {name!r} (layer {layer_id}) is {t.dtype} {list(t.shape)}; the layout "
                             f"({layout.fingerprint}) expects [{rows}, {d}]: {rows:,} rows of {d}")
        scales = None
        if t.dtype == "F8_E4M3":
            scales = names.scale(layer_id)
            sf = f if scales in f.tensors else None
            if sf is None:
                raise ValueError(f"tensor {name!r} (layer {layer_id}) holds FP8 codes, but its scales "
                                 f"{scales!r} are not beside it in {f.path.name}")
            st = sf.tensors[scales]
            if d % fp8.BLOCK or st.shape != (rows, d // fp8.BLOCK) or st.dtype not in ("U8", "F8_E8M0", "F32"):
                raise ValueError(f"scales {scales!r} of layer {layer_id} are {st.dtype} {list(st.shape)}; expected "
                                 f"U8/F8_E8M0 (ue8m0) or F32 [{rows}, {d // fp8.BLOCK}]: one per {fp8.BLOCK} values")
        elif t.dtype not in _FLOAT_SOURCES:
            raise ValueError(f"tensor {name!r} (layer {layer_id}) is {t.dtype}; expected one of "
                             f"{', '.join(_FLOAT_SOURCES)} or F8_E4M3 with scales")
        out.append(LayerSource(layer_id, int(layout.offsets[li][0]), rows, f, name, scales))
    return out


@dataclass(frozen=True)
class ImportReport:
    """What an import wrote: rows, bytes read from the files, bytes written, seconds."""

    rows: int
    bytes_read: int
    bytes_written: int
    seconds: float
    pieces: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def import_tables(sources: Sequence[LayerSource], layout: TableLayout, out_dir: str | os.PathLike, *,
                  dtype: str = "bfloat16", chunk_rows: int = 1 << 18,
                  progress: Callable[[int], Any] | None = None) -> ImportReport:
    """Write the planned tables into a new checkpoint ``out_dir`` (absent or empty) as ``dtype``
    rows, one piece per ``chunk_rows`` rows (about twice a float32 chunk is what the import
    holds). A row that is not finite in ``dtype`` stops the import, naming the tensor and row;
    the directory appears only once every row is in."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: expected a positive count")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"checkpoint directory {out} exists and is not empty: an import writes a new one "
                         "(old pieces beside new ones would mix two tables)")
    target = numpy_dtype(dtype)
    t0, rows, read, written, pieces = time.perf_counter(), 0, 0, 0, 0
    # written under another name and renamed when whole: a failed import leaves no checkpoint
    part = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    try:
        for src in sources:
            for a in range(0, src.rows, chunk_rows):
                b = min(src.rows, a + chunk_rows)
                read += (b - a) * (src.file.tensors[src.tensor].nbytes // src.rows) + (
                    (b - a) * (src.file.tensors[src.scales].nbytes // src.rows) if src.scales else 0)
                if dtype == FP8:  # kept as FP8: the source's bytes where it has them
                    chunk = src.read_packed(a, b)
                    check = fp8.dequantize_packed(chunk, layout.row_dim)
                else:
                    with np.errstate(over="ignore", invalid="ignore"):
                        chunk = src.read(a, b).astype(target)
                    check = chunk.astype(np.float32)
                bad = ~np.isfinite(check).all(axis=1)
                if bad.any():
                    r = a + int(np.flatnonzero(bad)[0])
                    raise ValueError(f"tensor {src.tensor!r} (layer {src.layer_id}) row {r}: a value that is not "
                                     f"finite in {dtype} (NaN, infinity, or too large for it); nothing was imported")
                save_rows(part, layout.fingerprint, src.row_start + a, chunk, dtype)
                rows, written, pieces = rows + (b - a), written + chunk.nbytes, pieces + 1
                if progress is not None:
                    progress(b - a)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(part, out)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    return ImportReport(rows, read, written, time.perf_counter() - t0, pieces)


def export_tables(read_rows: Callable[[int, int], np.ndarray], layout: TableLayout, path: str | os.PathLike, *,
                  dtype: str = "bfloat16", names: NameMap = NameMap(), chunk_rows: int = 1 << 18,
                  progress: Callable[[int], Any] | None = None) -> Path:
    """Write every layer's table, ``read_rows(start, stop)`` (global rows, as stored in
    ``dtype``) chunk by chunk, named by ``names``: one ``dtype`` tensor per layer, or for FP8
    the codes and their ue8m0 scales (V4.1's two tensors; the layer is read once for each).
    The layout's fingerprint goes into the file's metadata. Deterministic: the same rows give
    the same bytes."""
    if dtype not in _ST_DTYPE and dtype != FP8:
        raise ValueError(f"dtype {dtype!r}: export writes one of {', '.join([*_ST_DTYPE, FP8])}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: expected a positive count")
    d, target = layout.row_dim, numpy_dtype(dtype)

    def parts(lid: int, rows: int) -> list[tuple[str, str, tuple[int, int], Callable[[np.ndarray], np.ndarray]]]:
        """(tensor name, safetensors dtype, shape, block -> its bytes) for layer ``lid``."""
        if dtype != FP8:
            return [(names.table(lid), _ST_DTYPE[dtype], (rows, d), lambda blk: blk.astype(target, copy=False))]
        return [(names.table(lid), "F8_E4M3", (rows, d), lambda blk: np.ascontiguousarray(blk[:, :d])),
                (names.scale(lid), "F8_E8M0", (rows, d // fp8.BLOCK), lambda blk: np.ascontiguousarray(blk[:, d:]))]

    layers = [parts(lid, rows) for lid, rows in zip(layout.layer_ids, layout.layer_rows)]
    specs = {name: (st, shape) for ps in layers for name, st, shape, _ in ps}
    meta = {"format": "engram-ray-tables-v1", "fingerprint": layout.fingerprint,
            "layer_ids": ",".join(map(str, layout.layer_ids))}
    width = row_width(dtype, d)
    with SafetensorsWriter(path, specs, meta) as w:
        for li, ps in enumerate(layers):
            start, n = int(layout.offsets[li][0]), layout.layer_rows[li]
            for k, (name, _, _, take) in enumerate(ps):
                for a in range(0, n, chunk_rows):
                    b = min(n, a + chunk_rows)
                    block = np.asarray(read_rows(start + a, start + b))
                    if block.shape != (b - a, width):
                        raise ValueError(f"export: rows [{start + a}, {start + b}) came back as {block.shape}")
                    w.write(name, take(block))
                    if progress is not None and k == len(ps) - 1:
                        progress(b - a)
    return Path(path)
