"""``AgentClient``: a worker's side of the lookup agent -- the same lookup and push calls as an
:class:`~engram_ray.client.EngramClient` (the subset ``RemoteMemory`` uses), through a Unix
socket and shared-memory slots.

Per fetch the caller's thread copies its ids into a free slot and sends one 24-byte packet;
waiting is a blocking ``recv`` (the GIL is released; ``spin_s`` polls first, off by default).
No gRPC, no asyncio and no thread of its own run in the worker's process. Rows stay in the
slot until the fetch is released, so a consumer copies them once, to where they are used (a
tensor, the device) -- or not at all: a fetch asked with ``expand=True`` holds its rows in the
ids' order, and :meth:`AgentFetch.lend` gives them as a view of the slot, which stays lent until
:meth:`AgentFetch.give_back` (RemoteMemory calls it when the tensor over the view is gone).

If the agent dies, calls in flight raise :class:`AgentUnavailable`; the next call reconnects
(calling ``start()`` first when no agent answers, so a worker can start one) with fresh slots.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..client import UniqueRows
from ..client.plan import check_grads, check_lr, out_rows, scatter
from ..core.dtypes import row_values, row_width
from ..core.layout import TableLayout
from ..rpc.codec import wire_dtype
from .protocol import (
    ERROR,
    EXPAND,
    HELLO,
    HELLO_INFO,
    MAGIC,
    MAX_BATCH,
    MAX_PACKET,
    ORDERED,
    REPLY,
    REQUEST,
    VERSION,
    AgentRefused,
    AgentUnavailable,
    Op,
    Slot,
    SlotLayout,
)

__all__ = ["AgentClient", "AgentFetch", "SPIN_S"]

MIN_SLOT_IDS = 4096

log = logging.getLogger(__name__)


class AgentFetch:
    """One lookup through the agent. ``result()`` gives :class:`UniqueRows` whose ``rows`` and
    ``inverse`` are views of the slot: valid until :meth:`release` (copy what you keep)."""

    def __init__(self, agent: AgentClient, gen: int, req_id: int, slot: int, flat_size: int,
                 shape: tuple[int, ...], ids: np.ndarray, expanded: bool = False):
        self.agent, self.gen, self.req_id, self.slot = agent, gen, req_id, slot
        self.n, self.shape, self.ids = flat_size, shape, ids
        #: Asked with EXPAND: the slot holds the rows in the ids' order (read them with lend()).
        self.expanded = expanded
        self._t0 = time.perf_counter()
        self._value: int | None = None
        self._released = False
        self._lent = False  # lend() gave a view of the slot: give_back() releases it
        self._given = False  # give_back() was called (the slot is freed at the next staging)
        #: Issue-to-arrival seconds, as seen when the reply was read (None before).
        self.fetch_seconds: float | None = None

    @property
    def pinned(self) -> bool:
        """Whether the slot holding this fetch's rows is registered as pinned memory (see
        :meth:`AgentClient.pin_slots`): a device copy may then read it directly, and the
        fetch is released only once that copy is done."""
        s = self.agent._slots
        return self.gen == self.agent._gen and self.slot < len(s) and s[self.slot].pinned

    def done(self) -> bool:
        """Whether the reply is in (reads replies waiting on the socket; never blocks). A
        refusal counts as done and stays filed: :meth:`result` raises it."""
        if self._value is None and not self._released:
            with self.agent._lock:
                self.agent._poll()
                reply = self.agent._replies.get(self.req_id)
                if reply is not None:
                    if reply[0] == ERROR:
                        return True
                    self._value = self.agent._wait(self, None)
                    self.fetch_seconds = time.perf_counter() - self._t0
        return self._value is not None

    def result(self, timeout: float | None = None) -> UniqueRows:
        if self.expanded:
            raise ValueError("this fetch was asked with expand=True: its slot holds the rows in the ids' order; "
                             "read them with lend()")
        s = self._arrived(timeout)
        u = self._value
        # the agent wrote the sorted unique ids over the slot's ids: the ids of rows[:u]
        return UniqueRows(s.ids[:u], s.rows[:u], s.inverse[:self.n], self.shape)

    def lend(self, timeout: float | None = None) -> np.ndarray:
        """The rows in the ids' order, ``[n, width]`` (a fetch asked with ``expand=True``): a
        view of the slot, no copy. The slot stays lent -- :meth:`release` does nothing, the
        agent writes nothing there -- until :meth:`give_back`."""
        if not self.expanded:
            raise ValueError("lend(): this fetch holds unique rows; ask with expand=True for rows in the ids' order")
        if self._lent:
            raise RuntimeError("lend(): this fetch's rows are lent already")
        s = self._arrived(timeout)
        with self.agent._lock:
            if self._released:  # by another thread since: its slot may hold other rows already
                raise RuntimeError("this fetch was released: its slot holds other rows now")
            if self._lent:
                raise RuntimeError("lend(): this fetch's rows are lent already")
            self.agent._free_given_back()
            self._lent = True
            self.agent._lent_n += 1
        return s.rows[:self.n]

    def give_back(self) -> None:
        """The lent rows will not be read again: the slot is freed at the next fetch (or lend).
        Safe from any thread and inside any code (it takes no lock), e.g. from a finaliser;
        a second call does nothing. Raises RuntimeError on a fetch not lent."""
        if self._given:
            return
        if not self._lent:
            raise RuntimeError("give_back(): this fetch's rows were not lent")
        self._given = True
        self.agent._given_back.append(self)  # deque.append: atomic

    def _arrived(self, timeout: float | None) -> Slot:
        """The slot, once the reply is in."""
        if self._released:
            raise RuntimeError("this fetch was released: its slot holds other rows now")
        if self._value is None:
            self._value = self.agent._wait(self, timeout)
            self.fetch_seconds = time.perf_counter() - self._t0
        return self.agent._slot_of(self)

    def release(self) -> None:
        """Give the slot back (idempotent); a fetch whose reply is not in yet frees it on arrival.
        A lent fetch's slot comes back after :meth:`give_back`, not here."""
        if self._released or self._lent:
            return
        with self.agent._lock:  # checked again: lend() on another thread may have just lent it
            if not self._released and not self._lent:
                self._released = True
                self.agent._release(self)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


#: Default seconds a reader polls for its reply before it sleeps in ``recv``: none (see AgentClient).
SPIN_S = 0.0


class AgentClient:
    """Lookups and pushes of ``layout``'s rows through the lookup agent at ``socket_path``.
    ``start``: called when no agent answers (e.g. spawn one), then connecting is retried for
    up to ``connect_timeout`` seconds. ``timeout``: seconds to wait for a reply.

    ``spin_s``: a reader whose reply is not in polls the socket for up to this long before it
    sleeps in ``recv`` (default 0: sleep at once); ``timeout`` bounds the poll and the sleep
    together. Measured on this project's 2-core box, polling helps the step right after the
    wait (``engram-ray bench overlap``: two blocks of 1.0 ms ran 52-61 µs faster after polling
    than after sleeping for a lookup's round trip) but not a whole run: ``bench offload
    --repeats 100`` gave decode +3.3 % paired with a 2 ms poll and +3.3 % without, and the
    means +4.5 % against +2.9 % (compute +12.7 ms against +6.0 ms a run, sleep 0.3 against
    4.0 ms). So it is off by default. The poll also holds the GIL between non-blocking
    ``recv`` calls."""

    #: ``prefetch_unique_many(..., expand=True)`` is served: rows in the ids' order, lent (RemoteMemory).
    expands = True

    def __init__(self, socket_path: str, layout: TableLayout, *, start: Callable[[], Any] | None = None,
                 timeout: float = 60.0, connect_timeout: float = 30.0, spin_s: float = SPIN_S):
        if not 0 <= spin_s <= 1:
            raise ValueError(f"spin_s={spin_s}: expected seconds between 0 and 1")
        self.path, self.layout, self.start = str(socket_path), layout, start
        self.timeout, self.connect_timeout, self.spin_s = timeout, connect_timeout, spin_s
        self.dtype_name = ""
        self.dtype = np.dtype(np.float32)
        self.width = layout.row_dim
        self._sock: socket.socket | None = None
        self._gen = 0
        self._slots: list[Slot] = []
        self._free: list[int] = []
        self._replies: dict[int, tuple[int, int, bytes, int]] = {}
        self._reply_slot = 0  # the slot field of the reply _wait_id returned last
        self._orphans: set[int] = set()  # released before their reply came: free slot on arrival
        self._owner: dict[int, int] = {}  # req_id -> slot, for orphans
        self._asked: set[int] = set()  # request ids sent and not answered yet
        self._next_id = 1
        self._lock = threading.RLock()
        #: Lent fetches given back: their slots are freed at the next staging, under the lock
        #: (give_back may run anywhere, e.g. as a finaliser inside this client's own code).
        self._given_back: deque[AgentFetch] = deque()
        self._lent_n = 0  # fetches lent and not freed yet (given back or not)
        self._req = bytearray(REQUEST.size)
        self.reconnects = 0
        #: (register(address, nbytes) -> bool, unregister(address)) from pin_slots, or None.
        self._pinner: tuple[Callable[[int, int], bool], Callable[[int], None]] | None = None
        self._connect()

    # Connection -----------------------------------------------------------------------------
    def _connect(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        started = False
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if self.start is not None and not started:
                    self.start()
                    started = True
                elif time.monotonic() > deadline or self.start is None:
                    raise AgentUnavailable(f"no lookup agent at {self.path}: {e}") from None
                time.sleep(0.05)
        sock.settimeout(self.timeout)
        self._sock = sock
        self._hello()

    def _hello(self) -> None:
        try:
            self._say_hello()
        except (struct.error, ValueError, UnicodeDecodeError) as e:  # a reply that is not one
            self._drop()
            raise AgentUnavailable(f"lookup agent at {self.path} answered HELLO with garbage: {e}") from None

    def _say_hello(self) -> None:
        assert self._sock is not None
        self._sock.send(HELLO.pack(MAGIC, Op.HELLO, VERSION, 0, 0, 0, self.layout.fingerprint.encode()))
        data = self._recv_packet()
        magic, op, status, _rid, _slot, _value, aux = REPLY.unpack_from(data)
        if op != Op.HELLO:
            raise ValueError(f"a reply of op {op}")
        if status == ERROR:
            self._drop()
            raise AgentRefused(data[REPLY.size:REPLY.size + aux].decode("utf-8", "replace"))
        total, dim, _version, dtype, fp = HELLO_INFO.unpack_from(data, REPLY.size)
        if (total, dim, fp.rstrip(b"\0").decode()) != (self.layout.total_rows, self.layout.row_dim,
                                                      self.layout.fingerprint):
            self._drop()
            raise AgentRefused(f"agent at {self.path} serves another table ({fp!r})")
        self.dtype_name = dtype.rstrip(b"\0").decode()
        self.dtype = np.dtype(wire_dtype(self.dtype_name))
        self.width = row_width(self.dtype_name, self.layout.row_dim)  # packed bytes for FP8 rows

    def _ensure(self) -> socket.socket:
        if self._sock is None:
            self.reconnects += 1
            self._connect()
        assert self._sock is not None
        return self._sock

    def _drop(self) -> None:
        """Forget the connection and its slots: fetches of it raise AgentUnavailable."""
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._gen += 1
        slots = self._slots
        self._slots, self._free, self._replies = [], [], {}
        self._orphans, self._owner, self._asked = set(), {}, set()
        for s in slots:  # the state is reset first: a failing hook cannot leave it half dropped
            if s.pinned and self._pinner is not None:
                s.pinned = False
                try:
                    self._pinner[1](s.address)  # before the mapping can go
                except Exception:  # noqa: BLE001 - the pages stay pinned until the process ends
                    log.warning("lookup agent client: unregistering a slot failed", exc_info=True)

    def close(self) -> None:
        with self._lock:
            self._drop()

    @property
    def lent(self) -> int:
        """Slots lent now (:meth:`AgentFetch.lend`) and not given back: a consumer may cap it."""
        return self._lent_n - len(self._given_back)

    def _free_given_back(self) -> None:
        """Free the slots of lent fetches given back since (call with the lock held)."""
        while self._given_back:
            f = self._given_back.popleft()
            if not f._lent:  # queued twice (give_back raced itself on two threads): once is enough
                continue
            f._lent = False
            self._lent_n -= 1
            f.release()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Packets --------------------------------------------------------------------------------
    def _recv_packet(self, fds: list[int] | None = None) -> bytes:
        """One reply packet (and, with ``fds``, the descriptors it carries); a hang-up or a
        malformed packet drops the connection: the agent died or is not one."""
        assert self._sock is not None
        try:
            if fds is None:
                data = self._sock.recv(MAX_PACKET)
            else:
                data, got, _flags, _addr = socket.recv_fds(self._sock, MAX_PACKET, 1)
                fds.extend(got)
        except TimeoutError:
            raise
        except OSError as e:
            self._drop()
            raise AgentUnavailable(f"lookup agent at {self.path}: {e}") from None
        return self._check(data)

    def _send(self, op: int, req_id: int, slot: int, n: int) -> None:
        REQUEST.pack_into(self._req, 0, MAGIC, op, 0, req_id, slot, n)
        self._send_packet(self._req)

    def _send_packet(self, packet: bytearray) -> None:
        try:
            self._ensure().send(packet)
        except OSError as e:
            self._drop()
            raise AgentUnavailable(f"lookup agent at {self.path}: {e}") from None

    def _poll(self, req_id: int | None = None, until: float = 0.0) -> None:
        """Read every reply already waiting, without blocking. With ``req_id``: go on reading
        until its reply is in or ``time.perf_counter()`` passes ``until`` (a waiter's poll,
        the socket made non-blocking once for all of it)."""
        sock = self._sock
        if sock is None:
            return
        # MSG_DONTWAIT alone is not enough: a Python socket with a timeout polls for up to
        # that timeout *before* its recv, so done() blocked 60 s and then dropped the
        # connection (seen on CUDA, the one path that polls). Non-blocking for the sweep.
        sock.settimeout(0.0)
        try:
            while self._sock is sock:
                try:
                    data = sock.recv(MAX_PACKET)
                except (BlockingIOError, InterruptedError):
                    if req_id is None or time.perf_counter() >= until:
                        return
                    continue
                except OSError as e:
                    self._drop()
                    raise AgentUnavailable(f"lookup agent at {self.path}: {e}") from None
                self._keep(self._check(data))
                if req_id is not None and req_id in self._replies:
                    return
        finally:
            if self._sock is sock:
                sock.settimeout(self.timeout)

    def _check(self, data: bytes) -> bytes:
        if not data or len(data) < REPLY.size or data[:4] != MAGIC:
            self._drop()
            raise AgentUnavailable(f"lookup agent at {self.path} hung up")
        return data

    def _keep(self, data: bytes) -> None:
        """File a reply for its waiter (or free the slot of a fetch released unread)."""
        _m, _op, status, rid, slot, value, aux = REPLY.unpack_from(data)
        if rid not in self._asked:  # a reply to nothing asked (or a second one): not our agent
            self._drop()
            raise AgentUnavailable(f"lookup agent at {self.path} answered request {rid}, which is not "
                                   "waiting for a reply")
        self._asked.discard(rid)
        if rid in self._orphans:
            self._orphans.discard(rid)
            self._free.append(self._owner.pop(rid))
        else:
            self._replies[rid] = (status, value, data[REPLY.size:REPLY.size + aux], slot)

    def _wait_id(self, req_id: int, timeout: float | None, fds: list[int] | None = None) -> tuple[int, int, bytes]:
        """Read replies until ``req_id``'s; others are kept for their own waiters. A reply that
        is not in yet is polled for up to ``spin_s``, then waited for asleep; ``timeout``
        (None: the client's) bounds the whole wait, the poll included."""
        start = time.perf_counter()
        limit = self.timeout if timeout is None else timeout  # None: no limit
        spun = False
        if fds is None and req_id not in self._replies and self.spin_s:
            spun = True  # never a reply that carries descriptors: a plain recv would drop them
            self._poll(req_id, start + (self.spin_s if limit is None else min(self.spin_s, limit)))
        if req_id not in self._replies:
            remaining = None if limit is None else limit - (time.perf_counter() - start)
            if remaining is not None and remaining <= 0:
                self._poll()  # a zero timeout: what is already there, never a blocking recv
                if req_id not in self._replies:
                    raise TimeoutError(f"lookup agent at {self.path}: no reply after {limit} s")
            sock, retimed = self._sock, False
            if (timeout is not None or spun) and remaining is not None and sock is not None:
                sock.settimeout(max(1e-6, remaining))  # what is left of the wait, not all of it again
                retimed = True
            try:
                while req_id not in self._replies:
                    self._keep(self._recv_packet(fds))
            except TimeoutError:
                raise TimeoutError(f"lookup agent at {self.path}: no reply after {limit} s") from None
            finally:
                if retimed and self._sock is not None:
                    self._sock.settimeout(self.timeout)
        status, value, text, self._reply_slot = self._replies.pop(req_id)
        self._owner.pop(req_id, None)
        if status == ERROR:
            raise AgentRefused(text.decode("utf-8", "replace"))
        return status, value, text

    def _new_id(self) -> int:
        rid = self._next_id
        self._next_id = rid + 1 if rid < 0xFFFFFFF0 else 1
        self._asked.add(rid)  # one reply is expected for it
        return rid

    # Slots ----------------------------------------------------------------------------------
    def _take_slot(self, n: int) -> int:
        """The smallest free slot that holds ``n`` ids, or a new one from the agent."""
        self._ensure()
        fits = [i for i in self._free if self._slots[i].capacity >= n]
        if fits:
            best = min(fits, key=lambda i: self._slots[i].capacity)
            self._free.remove(best)
            return best
        capacity = max(MIN_SLOT_IDS, 1 << max(0, n - 1).bit_length())
        rid = self._new_id()
        self._send(Op.SLOT, rid, 0, capacity)
        fds: list[int] = []
        try:
            _status, value, _ = self._wait_id(rid, None, fds)
            self._slots.append(self._pin(self._map_slot(fds, capacity, value)))
        finally:
            for fd in fds:
                os.close(fd)  # the mapping keeps the memory
        return len(self._slots) - 1

    def _map_slot(self, fds: list[int], capacity: int, value: int) -> Slot:
        """Map the slot the agent sent, checked: the number both sides will use, a memfd sealed
        against shrinking (a truncated mapping would SIGBUS this process) and large enough.
        Anything else ends the connection: slot numbers must never drift apart."""
        layout = SlotLayout(capacity, self.layout.row_dim, self.dtype.itemsize, self.width)
        try:
            if len(fds) != 1 or value != capacity or self._reply_slot != len(self._slots):
                raise ValueError(f"{len(fds)} fds, capacity {value}, slot {self._reply_slot}")
            if not fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK \
                    or os.fstat(fds[0]).st_size < layout.nbytes:
                raise ValueError("memfd not sealed against shrinking, or too small")
            return Slot(fds[0], layout, self.dtype)
        except (OSError, ValueError) as e:
            self._drop()
            raise AgentUnavailable(f"lookup agent at {self.path} sent a bad slot: {e}") from None

    def pin_slots(self, register: Callable[[int, int], bool], unregister: Callable[[int], None]) -> None:
        """Register every slot, mapped now or later, with ``register(address, nbytes)`` (True:
        registered), and ``unregister(address)`` each before its mapping is dropped. On CUDA
        these are cudaHostRegister / cudaHostUnregister: the slots become pinned memory, so
        a host-to-device copy reads the rows where the agent wrote them, with no copy on the
        model's thread (RemoteMemory does this; the agent client itself knows no device)."""
        with self._lock:
            self._pinner = (register, unregister)
            for s in self._slots:
                self._pin(s)

    def _pin(self, s: Slot) -> Slot:
        if self._pinner is not None and not s.pinned:
            s.pinned = bool(self._pinner[0](s.address, s.layout.nbytes))
        return s

    def _slot_of(self, f: AgentFetch) -> Slot:
        if f.gen != self._gen:
            raise AgentUnavailable("the lookup agent restarted: fetch again")
        return self._slots[f.slot]

    def _release(self, f: AgentFetch) -> None:
        with self._lock:
            if f.gen != self._gen:
                return
            if f._value is None and f.req_id in self._owner:
                if self._replies.pop(f.req_id, None) is None:
                    self._orphans.add(f.req_id)  # the agent still writes this slot
                    return
                # its reply was read already, for another fetch's waiter: the slot is done
                self._owner.pop(f.req_id)
            self._free.append(f.slot)

    def _wait(self, f: AgentFetch, timeout: float | None) -> int:
        with self._lock:
            if f.gen != self._gen:
                raise AgentUnavailable("the lookup agent restarted: fetch again")
            _status, value, _ = self._wait_id(f.req_id, timeout)
            if not 0 <= value <= f.n:
                self._drop()
                raise AgentUnavailable(f"lookup agent at {self.path} answered {value} rows for {f.n} ids")
            return value

    # Lookups and pushes ---------------------------------------------------------------------
    def _stage(self, row_ids: Sequence[Any], packet: bytearray, flags: int = 0) -> list[AgentFetch]:
        """Copy each id array into a free slot and pack its request into ``packet``."""
        self._free_given_back()
        fetches: list[AgentFetch] = []
        gen, slot = self._gen, None
        try:
            for k, r in enumerate(row_ids):
                ids = np.asarray(r)
                if ids.dtype.kind not in "iu":
                    raise AgentRefused(f"row ids must be integers, got dtype {ids.dtype}")
                flat = ids.reshape(-1)
                n = int(flat.size)
                slot = self._take_slot(n)
                self._slots[slot].ids[:n] = flat
                rid = self._new_id()
                self._owner[rid] = slot
                REQUEST.pack_into(packet, k * REQUEST.size, MAGIC, Op.UNIQUE, flags, rid, slot, n)
                f = AgentFetch(self, gen, rid, slot, n, ids.shape, flat, bool(flags & EXPAND))
                slot = None  # (before the append: an interruption between them loses it, never frees it twice)
                fetches.append(f)
        except BaseException:
            # nothing was sent: the slots taken so far are free again (on this connection: a
            # dropped one took its slots with it) and their requests were never asked
            for f in fetches:
                f._released = True
                self._owner.pop(f.req_id, None)
                self._asked.discard(f.req_id)
            if self._gen == gen:
                self._free.extend([f.slot for f in fetches] + ([slot] if slot is not None else []))
            raise
        return fetches

    def prefetch_unique_many(self, row_ids: Sequence[Any], *, ordered: bool = False,
                             expand: bool = False) -> list[AgentFetch]:
        """:meth:`prefetch_unique` for several arrays (e.g. one per Engram layer) in one packet:
        one wake-up of the agent per fetch, however many layers. ``ordered``: the agent sends
        each lookup once the one before it has its rows. ``expand``: the agent writes the rows
        in the ids' order (read with :meth:`AgentFetch.lend`, not ``result``)."""
        if not row_ids:
            return []
        if len(row_ids) > MAX_BATCH:
            return [f for i in range(0, len(row_ids), MAX_BATCH)
                    for f in self.prefetch_unique_many(row_ids[i:i + MAX_BATCH], ordered=ordered, expand=expand)]
        packet = bytearray(REQUEST.size * len(row_ids))
        flags = (ORDERED if ordered else 0) | (EXPAND if expand else 0)
        with self._lock:
            gen = self._gen
            try:
                fetches = self._stage(row_ids, packet, flags)
            except AgentUnavailable:
                if self._gen == gen:  # no connection was dropped (connecting failed): nothing to re-attach to
                    raise
                fetches = self._stage(row_ids, packet, flags)  # the agent died asking for a slot: re-attach once
            try:
                self._ensure().send(packet)
            except OSError:  # the agent is gone and nothing is in flight: re-attach once, send again
                for f in fetches:
                    f._released = True
                self._drop()
                fetches = self._stage(row_ids, packet, flags)
                self._send_packet(packet)
            return fetches

    def prefetch_unique(self, row_ids: Any) -> AgentFetch:
        """Start fetching ``row_ids`` (any shape) as unique rows + inverse; returns at once."""
        return self.prefetch_unique_many([row_ids])[0]

    def values(self, rows: np.ndarray) -> np.ndarray:
        """Looked-up rows as float32 ``[..., row_dim]`` (FP8 dequantised, exactly)."""
        return row_values(rows, self.dtype_name, self.layout.row_dim)

    def lookup(self, row_ids: Any, timeout: float | None = None) -> np.ndarray:
        """Rows ``[*row_ids.shape, width]`` as stored (a copy: the slot is released; FP8 rows
        are packed bytes: :meth:`values`)."""
        f = self.prefetch_unique(row_ids)
        try:
            u = f.result(timeout)
            return scatter(u.rows, u.inverse, u.shape)
        finally:
            f.release()

    def lookup_into(self, row_ids: Any, out: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Rows of ``row_ids`` into the caller's ``out`` (``[*shape, dim]``): one copy from the slot."""
        f = self.prefetch_unique(row_ids)
        try:
            u = f.result(timeout)
            rows = out_rows(out, u.inverse.size, self.width, self.dtype, unique=False)  # as the client
            np.take(u.rows, u.inverse, axis=0, out=rows)
            return out
        finally:
            f.release()

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """The agent's client statistics (as :meth:`EngramClient.stats`, plus the agent's own
        refusals and connections): latency and dedup are measured where the lookups run."""
        with self._lock:
            self._ensure()
            rid = self._new_id()
            self._send(Op.STATS, rid, 0, 0)
            text = self._wait_id(rid, timeout)[2]
        try:
            report = json.loads(text.decode("utf-8"))
        except ValueError as e:
            raise AgentRefused(f"lookup agent at {self.path} sent unreadable statistics: {e}") from None
        if not isinstance(report, dict):
            raise AgentRefused(f"lookup agent at {self.path} sent statistics that are not an object")
        return report

    def push_gradients(self, row_ids: Any, grads: Any, timeout: float | None = None, *,
                       lr: float | None = None) -> int:
        """Send row gradients ``[*ids.shape, dim]`` through the agent, applied at ``lr`` (None:
        the shards' own rate); returns rows updated."""
        ids = np.asarray(row_ids)
        g = check_grads(ids.shape, grads, self.layout.row_dim)
        check_lr(lr)
        with self._lock:
            flat = ids.reshape(-1)
            n = int(flat.size)
            slot = self._take_slot(n)
            s = self._slots[slot]
            s.ids[:n], s.grads[:n] = flat, g
            s.push_lr[0] = lr or 0.0
            rid, gen = self._new_id(), self._gen
            self._owner[rid] = slot
            self._send(Op.PUSH, rid, slot, n)  # not resent on failure: a push may have landed
            try:
                return self._wait_id(rid, timeout)[1]
            finally:
                if gen == self._gen:
                    self._free.append(slot)
