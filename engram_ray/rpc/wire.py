"""What both ends of the wire agree on beside the proto: the token's metadata, the size-limit
defaults, and the signals a shard attaches to a refusal. Imported by the client and the
shard alike; it imports neither (nor the store, nor grpc_health).

Signals. A few refusals ask the caller to do one particular thing. The shard says which in the
call's trailing metadata, beside the status code; the status details stay free text for people,
and nobody parses them:

==============  ===================  ============================================  ==========================
engram-signal   status               sent when                                     the caller
==============  ===================  ============================================  ==========================
not-primary     FAILED_PRECONDITION  a push reached a backup while the primary     sends the push to replica
                                     lives; ``engram-primary`` names the primary   ``engram-primary``
unreplicated    UNAVAILABLE          a push is applied on the primary but not yet  retries the same copy, with
                                     on every copy                                 the same request id
syncing         UNAVAILABLE          the copy is still copying the primary's rows  goes to another copy (a
                                                                                   primary keeps it in sync)
not-serving     UNAVAILABLE          none of the copy's checkpoints loads          goes to another copy
gave-up         UNAVAILABLE          a joining copy gave its join up               (a primary drops it as dead)
busy            RESOURCE_EXHAUSTED   the shard serves its limit of calls at once;  backs off and retries any
                                     the request was not looked at                 call, pushes too
==============  ===================  ============================================  ==========================

``engram-primary`` is the replica index in decimal ASCII ("0", "1", ...). A receiver trusts
none of it: a signal it does not know, one sent twice, or one with another status code than
its own is no signal (the status code alone decides), and :func:`primary_index` checks a named
primary against the number of copies.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import grpc

from ..config import ServiceConfig
from ..errors import NotPrimary, NotServing, Unreplicated

__all__ = ["METADATA_KEY", "MAX_STREAM_S", "MAX_STREAM_ANSWER_BYTES", "auth_metadata", "read_token_file",
           "DEFAULT_MAX_MESSAGE_BYTES",
           "DEFAULT_MAX_IDS_PER_REQUEST", "DEFAULT_MAX_LOOKUP_STREAMS",
           "SIGNAL_KEY", "PRIMARY_KEY", "NOT_PRIMARY", "UNREPLICATED", "SYNCING", "NOT_SERVING", "GAVE_UP",
           "BUSY", "SIGNAL_STATUS", "Signal", "signal_metadata", "metadata_for", "read_signal", "signal_of",
           "primary_index"]

#: The metadata key of the token: ``authorization: Bearer <token>``.
METADATA_KEY = "authorization"

#: The longest deadline a LookupStream may carry (seconds): a stream holds a shard's thread
#: for its life, so every stream ends by then; a client opens a new one.
MAX_STREAM_S = 600.0
#: The largest answer on a LookupStream (bytes of rows): what a stream whose client stops
#: reading can hold in the shard stays small (a lookup agent's are tens of KB); larger
#: lookups go by Lookup.
MAX_STREAM_ANSWER_BYTES = 4 << 20

#: The service's defaults (set once, in :class:`~engram_ray.config.ServiceConfig`).
DEFAULT_MAX_MESSAGE_BYTES: int = ServiceConfig.max_message_bytes
DEFAULT_MAX_IDS_PER_REQUEST: int = ServiceConfig.max_ids_per_request
DEFAULT_MAX_LOOKUP_STREAMS: int = ServiceConfig.max_lookup_streams

SIGNAL_KEY = "engram-signal"
PRIMARY_KEY = "engram-primary"
NOT_PRIMARY = "not-primary"
UNREPLICATED = "unreplicated"
SYNCING = "syncing"
NOT_SERVING = "not-serving"
GAVE_UP = "gave-up"
BUSY = "busy"
#: Each signal with the one status code it comes with.
SIGNAL_STATUS = {NOT_PRIMARY: grpc.StatusCode.FAILED_PRECONDITION, UNREPLICATED: grpc.StatusCode.UNAVAILABLE,
                 SYNCING: grpc.StatusCode.UNAVAILABLE, NOT_SERVING: grpc.StatusCode.UNAVAILABLE,
                 GAVE_UP: grpc.StatusCode.UNAVAILABLE, BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED}
#: Longest replica index a receiver reads (copies are few; this bounds what it parses).
_MAX_INDEX_DIGITS = 4

Metadata = tuple[tuple[str, str], ...]


def read_token_file(path: str | os.PathLike[str], what: str = "--token-file") -> str:
    """The secret token in file ``path``, surrounding whitespace stripped (every side reads
    it so: the shards, the agent, the bench and workers). A token never goes on a command
    line, where ``ps`` shows it. ``what`` names the file in errors."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read the token ({e.strerror or e})") from None
    if not token:
        raise ValueError(f"{what} {path} is empty: expected the clients' secret token")
    return token


def auth_metadata(token: str | None) -> Metadata | None:
    """The metadata a caller sends with ``token`` (None: no auth)."""
    return ((METADATA_KEY, f"Bearer {token}"),) if token else None


class Signal(NamedTuple):
    """What a refusal's trailing metadata said: ``name`` (one of the signals, or None) and,
    with ``not-primary``, the ``primary`` as sent (None if not sent; several values joined by
    commas), to be checked with :func:`primary_index`."""

    name: str | None = None
    primary: str | None = None


def signal_metadata(name: str, primary: int | None = None) -> Metadata:
    """The trailing metadata of signal ``name`` (and of the primary's replica index)."""
    if name not in SIGNAL_STATUS:
        raise ValueError(f"unknown signal {name!r}; expected one of {', '.join(SIGNAL_STATUS)}")
    return ((SIGNAL_KEY, name),) + (((PRIMARY_KEY, str(int(primary))),) if primary is not None else ())


def metadata_for(exc: BaseException) -> Metadata | None:
    """The signal a shard sends with the status of ``exc`` (None: only the status)."""
    if isinstance(exc, NotPrimary):
        return signal_metadata(NOT_PRIMARY, exc.primary)
    if isinstance(exc, Unreplicated):
        return signal_metadata(SYNCING if exc.syncing else UNREPLICATED)
    if isinstance(exc, NotServing):
        return signal_metadata(GAVE_UP if exc.gave_up else NOT_SERVING)
    return None


def read_signal(metadata: Iterable[tuple[str, str | bytes]] | None, code: grpc.StatusCode | None) -> Signal:
    """The signal in a refusal's trailing ``metadata`` with status ``code``, checked: a name
    that is unknown, sent more than once, or does not go with ``code`` gives ``Signal()``."""
    names: list[str | bytes] = []
    primaries: list[str | bytes] = []
    for key, value in metadata or ():
        if key == SIGNAL_KEY:
            names.append(value)
        elif key == PRIMARY_KEY:
            primaries.append(value)
    if len(names) != 1 or not isinstance(names[0], str) or SIGNAL_STATUS.get(names[0]) != code:
        return Signal()
    name = names[0]
    if name != NOT_PRIMARY:
        return Signal(name)
    if not primaries:
        return Signal(name)
    # Several values are passed on joined (no index reads so), for the caller to refuse.
    return Signal(name, ",".join(v if isinstance(v, str) else repr(v) for v in primaries))


def signal_of(err: grpc.RpcError) -> Signal:
    """The checked signal of a failed call (none if the error object carries no metadata,
    as errors raised before a call reaches the wire do)."""
    try:
        return read_signal(err.trailing_metadata(), err.code())
    except Exception:  # noqa: BLE001 - not an RPC's error: no signal
        return Signal()


def primary_index(signal: Signal, replicas: int) -> int | None:
    """The replica index ``signal`` names as the primary, if it is one of ``replicas`` copies
    (written as a plain decimal: no sign, space, leading zero or other digits); else None."""
    raw = signal.primary
    if raw is None or not 0 < len(raw) <= _MAX_INDEX_DIGITS or not raw.isascii() or not raw.isdigit():
        return None
    if raw != str(int(raw)):
        return None
    index = int(raw)
    return index if index < replicas else None
