"""``engram-ray import`` and ``engram-ray export``: Engram tables in and out of safetensors."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import STORE_DTYPES, store_dtype
from ..core.dtypes import FP8, row_width
from ..core.fp8 import quantize_packed
from .common import add_table_args, gib, table_layout


def _names(args: argparse.Namespace) -> Any:
    from ..store.interchange import NameMap

    def layer_map(text: str | None, flag: str) -> dict[int, str]:
        if not text:
            return {}
        try:
            raw = json.loads(text)
            return {int(k): str(v) for k, v in raw.items()}
        except (ValueError, AttributeError, TypeError):
            raise ValueError(f"{flag} {text!r}: expected JSON mapping layer ids to tensor names, "
                             'e.g. \'{"1": "engram.1.weight"}\'') from None
    return NameMap(pattern=args.pattern, names=layer_map(args.names, "--names"),
                   scales=layer_map(args.scales, "--scales"))


def _bar(total: int, what: str) -> Any:
    from tqdm import tqdm
    return tqdm(total=total, desc=what, unit="row", unit_scale=True)


def _cmd_import(args: argparse.Namespace) -> int:
    from ..store.interchange import import_tables, plan_import

    layout, _ = table_layout(args)
    dtype = args.dtype
    sources = plan_import(args.files, layout, _names(args))  # every tensor checked before a byte is written
    with _bar(layout.total_rows, "import") as bar:
        rep = import_tables(sources, layout, args.to_checkpoint, dtype=dtype, chunk_rows=args.chunk_rows,
                            progress=bar.update)
    print(f"imported {rep.rows:,} rows of {layout.row_dim} ({layout.fingerprint}) into {args.to_checkpoint} "
          f"as {dtype}: {gib(rep.bytes_read)} read, {gib(rep.bytes_written)} written in {rep.pieces} pieces, "
          f"{rep.seconds:.1f} s ({rep.rows_per_second:,.0f} rows/s)")
    print(f"serve it: engram-ray serve --checkpoint {args.to_checkpoint} ...  or  engram-ray shard --checkpoint "
          f"{args.to_checkpoint} ...")
    if args.json:
        print(json.dumps({"rows": rep.rows, "bytes_read": rep.bytes_read, "bytes_written": rep.bytes_written,
                          "seconds": rep.seconds, "rows_per_second": rep.rows_per_second, "pieces": rep.pieces,
                          "fingerprint": layout.fingerprint, "dtype": dtype}))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ..store.interchange import export_tables

    layout, _ = table_layout(args)
    dtype = args.dtype
    if args.from_checkpoint:
        from ..store.checkpoint import load_range, verify_range

        verify_range(args.from_checkpoint, layout.fingerprint, 0, layout.total_rows)  # once, not per chunk
        width = row_width(dtype, layout.row_dim)

        def read(a: int, b: int) -> Any:
            return load_range(args.from_checkpoint, layout.fingerprint, a, b, width, dtype, verify=False)[0]
        source = args.from_checkpoint
        client = None
    else:
        import numpy as np

        from ..client import EngramClient
        from ..rpc.wire import read_token_file

        token = read_token_file(args.token_file) if args.token_file else None
        client = EngramClient(args.addresses.split(","), layout, token=token)

        def read(a: int, b: int) -> Any:
            rows = client.lookup(np.arange(a, b, dtype=np.int64))
            if (client.dtype_name == FP8) == (dtype == FP8):
                return rows  # as served (an FP8 service's packed bytes, or values cast on writing)
            values = client.values(rows)  # across FP8 and values: dequantise, or quantise
            return quantize_packed(values) if dtype == FP8 else values
        source = args.addresses
    try:
        with _bar(layout.total_rows, "export") as bar:
            path = export_tables(read, layout, args.out, dtype=dtype, names=_names(args),
                                 chunk_rows=args.chunk_rows, progress=bar.update)
    finally:
        if client is not None:
            client.close()
    print(f"exported {layout.total_rows:,} rows of {layout.row_dim} ({layout.fingerprint}) from {source} "
          f"to {path} as {dtype}")
    return 0


def _add_names(p: argparse.ArgumentParser) -> None:
    from ..store.interchange import DEFAULT_PATTERN

    p.add_argument("--pattern", default=DEFAULT_PATTERN,
                   help=f"tensor name of a layer's table, {{layer}} = its id (default: {DEFAULT_PATTERN})")
    p.add_argument("--names", metavar="JSON", help='explicit names per layer, e.g. \'{"1": "a.weight"}\'')
    p.add_argument("--scales", metavar="JSON", help="FP8 scale tensors per layer (default: the table's name with "
                                                    "weight -> weight_scale_inv)")
    p.add_argument("--chunk-rows", type=int, default=1 << 18,
                   help="rows converted at a time: what the command holds in RAM (default: 262144)")


def register(sub) -> None:
    p = sub.add_parser("import", help="load Engram tables from safetensors files into a checkpoint directory",
                       description="Read every Engram layer's table from safetensors files -- float weights "
                                   "(F32/BF16/F16, e.g. the reference demo's MultiHeadEmbedding) or FP8 e4m3 "
                                   "codes with block scales (dequantised) -- check each against the table "
                                   "layout before writing, and write a portable checkpoint directory chunk by "
                                   "chunk (the files are memory-mapped, never read whole). Serve it with "
                                   "'engram-ray serve --checkpoint DIR' or 'engram-ray shard --checkpoint DIR'.")
    p.add_argument("files", nargs="+", metavar="FILE.safetensors")
    add_table_args(p, "demo")
    p.add_argument("--to-checkpoint", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--dtype", default="bfloat16", type=store_dtype, metavar="|".join(STORE_DTYPES),
                   help="storage dtype of the rows, or bf16/fp16/fp32/fp8 (default: bfloat16, to which FP8 "
                        "converts exactly; fp8_e4m3 keeps an FP8 source's bytes as they are)")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    _add_names(p)
    p.set_defaults(func=_cmd_import)

    e = sub.add_parser("export", help="write a table's rows to a safetensors file, one tensor per layer",
                       description="Stream every Engram layer's rows from a checkpoint directory or from "
                                   "running shards into one safetensors file ([layer_rows, row_dim] per layer, "
                                   "the layout's fingerprint in its metadata).")
    e.add_argument("out", metavar="OUT.safetensors")
    add_table_args(e, "demo")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-checkpoint", metavar="DIR", help="a checkpoint directory (any shard count)")
    src.add_argument("--addresses", metavar="HOST:PORT,...", help="running shards, in shard order")
    e.add_argument("--token-file", metavar="FILE", help="with --addresses: the shards' client token")
    e.add_argument("--dtype", default="bfloat16", type=store_dtype, metavar="|".join(STORE_DTYPES),
                   help="dtype of the tensors, or bf16/fp16/fp32 (default: bfloat16)")
    _add_names(e)
    e.set_defaults(func=_cmd_export)
