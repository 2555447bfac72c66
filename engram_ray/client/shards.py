"""What the shards say about themselves (Describe), checked before a client acts on it.

At connect, every copy is asked; per shard the first copy that answers is where reads go. Its
answer must be a shard of this client's layout, in the order given, and describe itself with
values a real shard gives: a value no real shard gives is refused, not acted on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc

from ..config import STORE_DTYPES
from ..core.layout import ShardPlan, TableLayout
from ..errors import AuthError, EngramError, FingerprintMismatch, ShardUnavailable
from .plan import MIN_SHARD_MESSAGE_BYTES, NO_ID_LIMIT
from .replicas import ReplicaSet

__all__ = ["ShardInfo", "pick_read_copies", "shard_info", "describe_dict", "connected", "describe_dicts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    """What a shard said about itself when the client connected."""

    index: int
    address: str
    row_start: int
    row_stop: int
    dtype: str
    max_message_bytes: int
    max_ids_per_request: int


def pick_read_copies(replicas: ReplicaSet, answers: list[Any]) -> list[Any]:
    """Per shard, the answer of its first copy that answered (``answers``: one per copy, in
    order), which becomes the copy reads go to; or the first copy's error if none did."""
    flat = iter(answers)
    picked = []
    for s, reps in enumerate(replicas.replicas):
        got = [next(flat) for _ in reps]
        ok = [r for r, d in enumerate(got) if not isinstance(d, BaseException)]
        if ok and len(ok) < len(reps):
            log.warning("shard %d: replicas %s do not answer; using the others",
                        s, [r for r in range(len(reps)) if r not in ok])
        if ok:
            replicas.use_read(s, ok[0])
        picked.append(got[ok[0]] if ok else got[0])
    return picked


def shard_info(i: int, address: str, d: Any, layout: TableLayout, plan: ShardPlan) -> ShardInfo:
    """Shard ``i``'s Describe answer ``d`` (or the error it failed with), checked."""
    if isinstance(d, grpc.RpcError):
        if d.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise AuthError(f"shard {i} at {address}: {d.details()}")
        raise ShardUnavailable(i, address, f"{d.code().name}: {d.details()}")
    if isinstance(d, BaseException):
        raise d
    if d.fingerprint != layout.fingerprint:
        raise FingerprintMismatch(f"shard {i} at {address} serves layout {d.fingerprint!r}, this client "
                                  f"hashes for {layout.fingerprint!r}")
    want = plan.shard_range(i)
    if (d.row_start, d.row_stop) != want or d.num_shards != plan.num_shards:
        raise EngramError(f"shard {i} at {address} owns rows [{d.row_start}, {d.row_stop}) of {d.num_shards} "
                          f"shards; expected {list(want)} of {plan.num_shards}: addresses are out of order or "
                          "from another deployment")
    bad = ([f"dtype {d.dtype!r} (expected one of {', '.join(STORE_DTYPES)})"] * (d.dtype not in STORE_DTYPES)
           + [f"dim {d.dim} (the layout's rows have {layout.row_dim})"] * (d.dim != layout.row_dim)
           + [f"max_message_bytes {d.max_message_bytes} (expected at least {MIN_SHARD_MESSAGE_BYTES})"]
           * (d.max_message_bytes < MIN_SHARD_MESSAGE_BYTES)
           + [f"max_ids_per_request {d.max_ids_per_request} (expected >= 0)"] * (d.max_ids_per_request < 0))
    if bad:
        raise EngramError(f"shard {i} at {address} describes itself with {'; '.join(bad)}: "
                          "not an engram_ray shard of this layout")
    return ShardInfo(i, address, d.row_start, d.row_stop, d.dtype, d.max_message_bytes,
                     d.max_ids_per_request or NO_ID_LIMIT)


def describe_dict(d: Any, address: str, replicas: list[str]) -> dict[str, Any]:
    """A Describe answer as a dict, counters included, with the copy's address and its shard's."""
    info = {fd.name: getattr(d, fd.name) for fd in d.DESCRIPTOR.fields
            if fd.name not in ("counters", "backups", "table_use")}
    info["backups"] = list(d.backups)
    info["table_use"] = [{"layer": t.layer, "order": t.order, "rows": t.rows, "touched": t.touched,
                          "utilisation": min(1.0, t.touched / t.rows) if t.rows else 0.0} for t in d.table_use]
    info["counters"] = {fd.name: getattr(d.counters, fd.name) for fd in d.counters.DESCRIPTOR.fields}
    info["address"] = address
    info["replicas"] = list(replicas)
    return info


def connected(replicas: ReplicaSet, answers: list[Any], layout: TableLayout, plan: ShardPlan) -> list[ShardInfo]:
    """The shards a client reads from, out of every copy's Describe ``answers``: per shard the
    first copy that answered, which must be a shard of ``layout`` in order; one storage dtype."""
    picked = pick_read_copies(replicas, answers)
    infos = [shard_info(i, replicas.addresses[i], d, layout, plan) for i, d in enumerate(picked)]
    dtypes = {s.dtype for s in infos}
    if len(dtypes) != 1:
        raise EngramError(f"shards disagree on the storage dtype: {sorted(dtypes)}")
    return infos


def describe_dicts(where: list[tuple[int, int]], answers: list[Any], replicas: list[list[str]],
                   error: Any, tolerate: bool) -> list[dict[str, Any]]:
    """Describe answers of the copies ``where`` as dicts; a failed one raises ``error(shard,
    err)``, or with ``tolerate`` gives ``{"shard_index", "replica", "address", "error"}``."""
    out = []
    for (i, r), d in zip(where, answers):
        address = replicas[i][r]
        if not isinstance(d, BaseException):
            out.append(describe_dict(d, address, replicas[i]))
        elif tolerate:
            out.append({"shard_index": i, "replica": r, "address": address, "error": str(error(i, d))})
        else:
            raise error(i, d) from None
    return out
