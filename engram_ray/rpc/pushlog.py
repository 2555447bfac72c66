"""``PushLog``: the request ids of the pushes a shard copy applied, so a retry is not applied twice.

A client names every push (``ApplyGradientsRequest.request_id``: its client id and a sequence
number) and retries it, with the same id, when the answer is lost or a failover intervenes.
The copy that applied it answers the retry from here instead of stepping the optimiser again.

The memory is a window in time (``window_s``, ServiceConfig.dedup_window_s, 10 minutes by
default: far beyond a client's retries, which give up after ``recover_timeout``, 60 s) and in
count (the last ``max_entries`` pushes, 1,000,000 by default, whichever is fewer), so a busy
shard's memory stays bounded: ids are at most :data:`MAX_REQUEST_ID_BYTES` bytes, so a full
log is ~200 MB at worst and ~60 MB with the client's 20-byte ids. A retry that comes later
than the window is applied again; the README states this.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from ..errors import InvalidRequest

__all__ = ["PushLog", "Applied", "check_request_id", "MAX_REQUEST_ID_BYTES"]

#: Longest request id a shard accepts (the client's are ~20 bytes).
MAX_REQUEST_ID_BYTES = 128


def check_request_id(request_id: str) -> None:
    """InvalidRequest unless ``request_id`` is at most 128 bytes of printable ASCII."""
    if len(request_id) > MAX_REQUEST_ID_BYTES or not (request_id.isascii() and request_id.isprintable()):
        shown = request_id[:40] + ("..." if len(request_id) > 40 else "")
        raise InvalidRequest(f"request_id {shown!r} ({len(request_id.encode())} bytes): expected at most "
                             f"{MAX_REQUEST_ID_BYTES} bytes of printable ASCII")


class Applied(NamedTuple):
    """What a copy remembers of a push it applied."""

    #: Distinct rows the push updated (the answer to a retry).
    rows: int
    #: On every copy in sync (a primary's push is not until each backup acknowledged it).
    complete: bool
    #: The primary's sequence number of the push (0 on an unreplicated shard).
    seq: int
    #: When it was recorded (the clock's seconds).
    at: float


class PushLog:
    """Request id -> :class:`Applied`, oldest forgotten first (see the module doc)."""

    def __init__(self, window_s: float = 600.0, max_entries: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic):
        if window_s <= 0 or max_entries < 1:
            raise ValueError(f"PushLog: window_s={window_s}, max_entries={max_entries}; expected both positive")
        self.window_s, self.max_entries, self._clock = float(window_s), int(max_entries), clock
        self._entries: collections.OrderedDict[str, Applied] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, request_id: str) -> Applied | None:
        """The push ``request_id`` if applied within the window (None for an empty id)."""
        if not request_id:
            return None
        with self._lock:
            self._expire()
            return self._entries.get(request_id)

    def record(self, request_id: str, rows: int, *, complete: bool = True, seq: int = 0) -> None:
        """Remember that push ``request_id`` was applied (an empty id is not remembered)."""
        if not request_id:
            return
        with self._lock:
            self._entries[request_id] = Applied(int(rows), bool(complete), int(seq), self._clock())
            self._entries.move_to_end(request_id)
            self._expire()

    def items(self) -> list[tuple[str, int]]:
        """(request id, rows) of every push remembered, oldest first."""
        with self._lock:
            self._expire()
            return [(k, v.rows) for k, v in self._entries.items()]

    def seed(self, items: list[tuple[str, int]]) -> None:
        """A copy that joins remembers the pushes already in the rows it copied: forwarded to
        it again (a retry), they are acknowledged, not applied a second time."""
        for rid, rows in items:
            self.record(rid, rows, complete=True)

    def _expire(self) -> None:
        old = self._clock() - self.window_s
        e = self._entries
        while e and (len(e) > self.max_entries or next(iter(e.values())).at < old):
            e.popitem(last=False)
