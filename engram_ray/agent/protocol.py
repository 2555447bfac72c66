"""The lookup agent's wire: tiny fixed-size packets on a Unix ``SOCK_SEQPACKET`` socket, and
slots of shared memory (sealed memfds passed with ``SCM_RIGHTS``) that hold ids and rows.

Why this shape: per fetch the model's thread must pay only a copy of its ids and one small
send (the wake-up); rows are written by the agent straight into memory the worker maps, and
the reply is one 40-byte packet. ``SOCK_SEQPACKET`` keeps message boundaries, so a packet is
one ``recv`` and one of the wrong length is refused outright. memfds never appear in
``/dev/shm``: when the last process holding one dies, the memory is gone.

Packets (little-endian)::

    request  REQUEST  magic 'ERA1', op u16, flags u16, req_id u32, slot u32, n u64      (24 B)
                      (a packet holds 1..MAX_BATCH requests: one wake-up per fetch; flags:
                      ORDERED, the packet's UNIQUE lookups go out one after the other;
                      EXPAND, a UNIQUE lookup's rows come in the ids' order, n of them)
    hello    HELLO    REQUEST + fingerprint 32s                                          (56 B)
    reply    REPLY    magic, op u16, status u16, req_id u32, slot u32, value u64, aux u64 (32 B)
                      + on error, ``aux`` bytes of UTF-8 text; + for HELLO, HELLO_INFO

A slot of capacity ``c`` ids is one memfd: ``ids [c] int64 | inverse [c] int64 | rows`` where
``rows`` holds ``c`` rows of the storage dtype or ``c`` float32 gradient rows (pushes).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["MAGIC", "Op", "REQUEST", "HELLO", "REPLY", "HELLO_INFO", "OK", "ERROR", "MAX_PACKET", "MAX_BATCH",
           "ORDERED", "EXPAND", "SlotLayout", "Slot", "create_memfd", "AgentUnavailable", "AgentRefused"]

MAGIC = b"ERA1"
#: 2: a PUSH carries its learning rate in the slot (Slot.push_lr); HELLO refuses other versions,
#: so an old worker never has its stale slot bytes read as a rate. 3: the EXPAND flag (an older
#: agent would refuse each such lookup; a version mismatch says so once, at HELLO).
VERSION = 3
REQUEST = struct.Struct("<4sHHIIQ")
HELLO = struct.Struct("<4sHHIIQ32s")
REPLY = struct.Struct("<4sHHIIQQ")
#: After a HELLO reply: total_rows u64, row_dim u32, version u32, storage dtype 16s, fingerprint 32s.
HELLO_INFO = struct.Struct("<QII16s32s")
OK, ERROR = 0, 1
#: Requests in one packet at most (the layers of one fetch travel in one).
MAX_BATCH = 64
#: Longest packet either side sends (an error reply with its text); longer is refused.
MAX_PACKET = 2048
ALIGN = 64


#: Request flag: the packet's UNIQUE lookups run one after the other, each once the one before
#: has its rows (a fetch's Engram layers, earliest first).
ORDERED = 1
#: Request flag (UNIQUE only): the agent writes the rows in the ids' order -- ``rows[:n]``, the
#: unique rows expanded by the inverse, on the memory side -- so a worker computing on the host
#: reads them in place (RemoteMemory lends the slot to the layer) instead of gathering them on
#: the model's thread. ids[:U] and inverse[:n] are written as for any UNIQUE; value = U.
EXPAND = 2


class Op:
    HELLO = 1    #: check the layout; the agent answers with what it serves
    SLOT = 2     #: n = capacity in ids; the reply carries the slot's memfd (SCM_RIGHTS)
    UNIQUE = 3   #: ids[:n] -> rows[:U] of the distinct ids, inverse[:n]; value = U
    PUSH = 5     #: ids[:n], float32 gradients rows[:n] -> pushed; value = rows updated
    STATS = 6    #: the agent's client statistics, as JSON text after the reply header
    ALL = (HELLO, SLOT, UNIQUE, PUSH, STATS)  # 4 was ROWS (rows in the caller's order): unused, gone


class AgentUnavailable(ConnectionError):
    """The agent is gone (died, restarted) or cannot be reached: re-attach and retry a read."""


class AgentRefused(ValueError):
    """The agent refused a request (bad ids, wrong layout, a shard error): its text says why."""


def _up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class SlotLayout:
    """Where the parts of a slot of ``capacity`` ids lie, for stored rows of ``width`` elements
    of ``itemsize`` bytes (``width`` 0: ``row_dim``; an FP8 row's packed bytes otherwise); the
    rows area also holds float32 gradients ``[capacity, row_dim]`` for pushes."""

    capacity: int
    row_dim: int
    itemsize: int
    width: int = 0

    @property
    def row_width(self) -> int:
        return self.width or self.row_dim

    @property
    def inverse_at(self) -> int:
        return _up(8 * self.capacity)

    @property
    def rows_at(self) -> int:
        return self.inverse_at + _up(8 * self.capacity)

    @property
    def nbytes(self) -> int:
        rows = self.capacity * max(self.row_width * self.itemsize, self.row_dim * 4)
        return _up(self.rows_at + rows, mmap.PAGESIZE)


class Slot:
    """A mapped slot: numpy views ``ids [c]``, ``inverse [c]``, ``rows [c, dim]`` (storage dtype)
    and ``grads [c, dim]`` (float32) over one shared mapping. The mapping lives as long as any
    view of it does (numpy holds the buffer), so an in-flight write never hits unmapped memory."""

    def __init__(self, fd: int, layout: SlotLayout, dtype: np.dtype):
        self.layout = layout
        self.mm = mmap.mmap(fd, layout.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        buf = np.frombuffer(self.mm, dtype=np.uint8)
        c, d, w = layout.capacity, layout.row_dim, layout.row_width
        self.ids = buf[:8 * c].view(np.int64)
        self.inverse = buf[layout.inverse_at:layout.inverse_at + 8 * c].view(np.int64)
        self.rows = buf[layout.rows_at:layout.rows_at + c * w * dtype.itemsize].view(dtype).reshape(c, w)
        self.grads = buf[layout.rows_at:layout.rows_at + c * d * 4].view(np.float32).reshape(c, d)
        #: A push's learning rate (float64; 0: the shards' own), in the inverse area, which a
        #: push does not use otherwise.
        self.push_lr = buf[layout.inverse_at:layout.inverse_at + 8].view(np.float64)
        self.busy = False
        #: Worker side: registered with the device as pinned memory (AgentClient.pin_slots).
        self.pinned = False

    @property
    def address(self) -> int:
        """Where the mapping starts in this process (for registering it with a device)."""
        return int(self.ids.ctypes.data)

    @property
    def capacity(self) -> int:
        return self.layout.capacity


def create_memfd(nbytes: int, name: str = "engram-agent-slot") -> int:
    """A memfd of ``nbytes``, sealed against shrinking and growing: the peer it is passed to
    cannot truncate it under the agent's mapping (which would SIGBUS the agent)."""
    import fcntl

    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def error_reply(op: int, req_id: int, slot: int, text: str) -> bytes:
    """A refusal: the REPLY header with status ERROR and the text (cut to fit one packet)."""
    msg = text.encode("utf-8", "replace")[:MAX_PACKET - REPLY.size]
    return REPLY.pack(MAGIC, op, ERROR, req_id, slot, 0, len(msg)) + msg
