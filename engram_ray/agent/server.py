"""``LookupAgent``: the node-local process that owns an :class:`~engram_ray.client.EngramClient`
and serves its workers' lookups and pushes through shared memory.

Routing, dedup, retries, failover, re-resolve and auth all stay in the ``EngramClient``; the
agent only turns packets into client calls whose rows land in the worker's slot
(``prefetch_unique(ids, rows_out=slot.rows)``: no copy after the wire's) and answers when they
are there. One thread per worker connection reads its packets. A packet's ordered lookups to
one shard are answered on that thread, each a message on the shard's LookupStream or one
blocking call (up to 0.5 s; the worker's next packets wait meanwhile); the rest are handed
to the client's I/O thread, which replies as they end. A lookup flagged EXPAND has its unique
rows expanded here, in the slot, into the ids' order (the worker's layer reads them there: the
gather runs on the memory side, not on the model's thread). Replies never block (a worker that
stops reading is dropped, not waited for). Every byte from a worker is checked: packet
sizes, ops, slots, counts against the slot's capacity, and the ids by the client itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import socket
import threading
from typing import Any, NamedTuple

import numpy as np

from ..client import EngramClient
from ..client.plan import flat_ids
from ..core.dtypes import row_width
from ..core.optim import lr_error
from ..errors import InvalidRequest
from .protocol import (
    EXPAND,
    HELLO,
    HELLO_INFO,
    MAGIC,
    MAX_BATCH,
    MAX_PACKET,
    OK,
    ORDERED,
    REPLY,
    REQUEST,
    VERSION,
    Op,
    Slot,
    SlotLayout,
    create_memfd,
    error_reply,
)

__all__ = ["LookupAgent", "Limits"]

log = logging.getLogger(__name__)


class Limits:
    """What one worker connection may ask for (ids per slot, slots, bytes mapped), and what all
    of them together may: connections, and slot bytes (without it, ``max_conns`` workers of
    ``max_bytes`` each could ask a node for 2 TiB of shared memory)."""

    def __init__(self, max_slot_ids: int = 1 << 22, max_slots: int = 64, max_bytes: int = 8 << 30,
                 max_conns: int = 256, max_total_bytes: int = 32 << 30):
        self.max_slot_ids, self.max_slots, self.max_bytes = max_slot_ids, max_slots, max_bytes
        #: Worker connections at once (each holds a thread and its slots); more are closed at once.
        self.max_conns = max_conns
        #: Slot bytes of every connection together; a slot past it is refused, not queued.
        self.max_total_bytes = max_total_bytes


class _Conn:
    """One worker's connection: its socket, its slots, and a lock for replies (sent from the
    connection thread and from the client's I/O thread)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.slots: list[Slot] = []
        self.nbytes = 0
        self.hello = False
        self.send_lock = threading.Lock()
        self.closed = False

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """Send (with ``fds``, passed by SCM_RIGHTS) without ever blocking: a worker whose
        socket buffer is full is not reading (a well-behaved one has at most one reply per
        slot outstanding), so it is dropped -- never waited for with the lock held."""
        with self.send_lock:
            if self.closed:
                return
            try:
                if fds:
                    socket.send_fds(self.sock, [data], list(fds), socket.MSG_DONTWAIT)
                else:
                    self.sock.send(data, socket.MSG_DONTWAIT)
            except OSError:
                self.close()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class LookupAgent:
    """Serves ``client``'s rows on a Unix socket at ``socket_path`` (mode 0600, in a 0700
    directory). ``start()`` binds and serves on background threads.
    One agent per path: a second one fails to take the lock file ``socket_path + '.lock'``."""

    def __init__(self, client: EngramClient, socket_path: str, limits: Limits | None = None):
        self.client, self.path, self.limits = client, str(socket_path), limits or Limits()
        self.layout = client.layout
        self.dtype = np.dtype(client.dtype)
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._conns: set[_Conn] = set()
        self._mapped = 0  # slot bytes of every open connection (Limits.max_total_bytes)
        self._mapped_lock = threading.Lock()
        self._stop = threading.Event()
        self.refused = 0  #: requests refused (bad packets, bad ids): for tests and logs

    # Lifecycle ------------------------------------------------------------------------------
    def start(self) -> LookupAgent:
        """Take the lock, bind the socket (replacing a dead agent's), and accept on a thread."""
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another lookup agent serves {self.path}") from None
        self._lock_fd = fd
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a dead agent's socket: the lock says nobody serves it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, name="engram-agent-accept", daemon=True).start()
        log.info("lookup agent on %s (layout %s)", self.path, self.layout.fingerprint)
        return self

    def close(self) -> None:
        """Stop accepting, drop every connection, remove the socket."""
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for c in list(self._conns):
            c.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def connections(self) -> int:
        return len(self._conns)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                # e.g. EMFILE: out of descriptors for now. Keep accepting: a returned accept
                # thread would leave a live agent that nobody can reach (and nobody restarts).
                log.warning("lookup agent: accept failed", exc_info=True)
                self._stop.wait(0.1)
                continue
            if len(self._conns) >= self.limits.max_conns:
                log.warning("lookup agent: %d connections; refusing another", len(self._conns))
                sock.close()
                continue
            conn = _Conn(sock)
            self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="engram-agent-conn", daemon=True).start()

    def _serve(self, conn: _Conn) -> None:
        """Read one worker's packets until it hangs up; its slots go with the connection."""
        try:
            while not conn.closed:
                data = conn.sock.recv(MAX_PACKET)
                if not data:
                    return
                try:
                    self._handle(conn, data)
                except _Refused as e:
                    self.refused += 1
                    conn.send(error_reply(e.op, e.req_id, e.slot, str(e)))
                except Exception as e:  # noqa: BLE001 - the agent outlives any one request
                    self.refused += 1  # (requests fail one by one in _handle; this is a packet's)
                    log.warning("lookup agent: packet failed", exc_info=True)
                    conn.send(error_reply(0, 0, 0, f"agent error: {type(e).__name__}: {e}"))
        except OSError:
            pass
        finally:
            conn.close()
            conn.sock.close()
            self._conns.discard(conn)
            with self._mapped_lock:
                self._mapped -= conn.nbytes
            had_slots, conn.slots = bool(conn.slots), []  # mappings go once in-flight lookups drop their views
            if had_slots:
                gc.collect()  # and any cycle (e.g. a traceback) holding a view: free the memory now

    # Requests -------------------------------------------------------------------------------
    def _handle(self, conn: _Conn, data: bytes) -> None:
        """A packet: a HELLO, or 1..MAX_BATCH requests (a fetch's layers travel together)."""
        if len(data) == HELLO.size and data[:4] == MAGIC and not conn.hello:
            return self._hello(conn, data)
        k, rest = divmod(len(data), REQUEST.size)
        if rest or not 1 <= k <= MAX_BATCH:
            raise _Refused(0, 0, 0, f"packet of {len(data)} bytes; expected 1..{MAX_BATCH} requests of "
                                    f"{REQUEST.size}")
        ordered: list[_Job] = []  # UNIQUE lookups flagged ORDERED: one after the other
        for i in range(k):
            try:
                job = self._request(conn, REQUEST.unpack_from(data, i * REQUEST.size))
                if job is not None and job.ordered:
                    ordered.append(job)
                elif job is not None:
                    self._start(conn, job)
            except _Refused as e:  # one bad request of a batch: the others still run
                self.refused += 1
                conn.send(error_reply(e.op, e.req_id, e.slot, str(e)))
            except Exception as e:  # noqa: BLE001 - answered to its own waiter, the batch goes on
                self.refused += 1
                log.warning("lookup agent: request failed", exc_info=True)
                _, op, _, req_id, slot, _ = REQUEST.unpack_from(data, i * REQUEST.size)
                conn.send(error_reply(op, req_id, slot, f"agent error: {type(e).__name__}: {e}"))
        if ordered:
            self._start_ordered(conn, ordered)
        return None

    def _request(self, conn: _Conn, fields: tuple) -> _Job | None:
        """A checked request, its slot taken (None: a SLOT request, answered already)."""
        magic, op, flags, req_id, slot, n = fields
        if magic != MAGIC or op not in Op.ALL:
            raise _Refused(0, req_id, slot, f"not a request (magic {magic!r}, op {op})")
        if flags & ~(ORDERED | EXPAND) or (flags and op != Op.UNIQUE):
            raise _Refused(op, req_id, slot, f"flags {flags:#x}: only ORDERED and EXPAND, on UNIQUE requests")
        if not conn.hello:
            raise _Refused(op, req_id, slot, "say HELLO first")
        if op == Op.SLOT:
            self._new_slot(conn, req_id, n)
            return None
        if op == Op.STATS:
            self._stats(conn, req_id)
            return None
        if op == Op.HELLO:
            raise _Refused(op, req_id, slot, "HELLO packet of the wrong size")
        s = self._slot(conn, op, req_id, slot, n)
        lr = 0.0
        if op == Op.PUSH:
            lr = float(s.push_lr[0])
            if lr and lr_error(lr):  # 0: the shards' own rate
                raise _Refused(op, req_id, slot, f"push with {lr_error(lr)}, or 0 for the shards' own")
        # the worker may write its slot any time: read the ids (and a push's rate) once, now;
        # ids that are not rows refuse this request alone, whichever way it would have gone
        try:
            _, ids = flat_ids(s.ids[:n], self.layout.total_rows, copy=True)
        except InvalidRequest as e:
            raise _Refused(op, req_id, slot, str(e)) from None
        s.busy = True
        return _Job(s, op, req_id, slot, ids, bool(flags & ORDERED), lr, bool(flags & EXPAND))

    def _start(self, conn: _Conn, job: _Job) -> None:
        """Hand a lookup or push to the client; the reply goes when it ends."""
        s, n = job.s, job.ids.size
        try:
            if job.op == Op.PUSH:
                fut = self.client.submit_push(job.ids, s.grads[:n].copy(), lr=job.lr or None)
                fut.add_done_callback(lambda f: self._pushed(conn, s, job.req_id, job.slot, f))
                return
            p: Any = self.client.prefetch_unique(job.ids, rows_out=s.rows)  # Op.UNIQUE
        except Exception as e:  # noqa: BLE001 - e.g. ids outside the table: the client refused them
            s.busy = False
            raise _Refused(job.op, job.req_id, job.slot, f"{type(e).__name__}: {e}") from None
        p.add_done_callback(lambda q: self._looked_up(conn, job, q))

    def _start_ordered(self, conn: _Conn, jobs: list[_Job]) -> None:
        """A packet's ORDERED lookups, one after the other, each answered as its rows land.
        Each is first tried here, on the connection's thread, with one blocking call
        (``EngramClient.lookup_unique_now``, a message on the shard's LookupStream where one
        serves: a timeline of every hop on a shared memory core put the I/O thread's hand-off
        and ``grpc.aio`` at 0.2-0.5 ms of a ~1.3 ms lookup, on the first Engram layer's
        critical path, and a call's set-up at ~0.2 ms more than a stream's message); the rest,
        from the first that cannot be or whose try failed, go to the client's I/O thread
        together, which retries and fails over."""
        for i, j in enumerate(jobs):
            try:
                r = self.client.lookup_unique_now(j.ids, j.s.rows)
            except Exception as e:  # noqa: BLE001 - the client refused these ids: this job fails
                self._fail(conn, j, f"{type(e).__name__}: {e}")
                continue
            if r is None:
                return self._hand_over_ordered(conn, jobs[i:])
            self._answer(conn, j, r)
        return None

    def _hand_over_ordered(self, conn: _Conn, jobs: list[_Job]) -> None:
        """ORDERED lookups handed to the client's I/O thread together, run one after the other."""
        try:
            ps = self.client.prefetch_unique_many([j.ids for j in jobs], [j.s.rows for j in jobs], ordered=True)
        except Exception as e:  # noqa: BLE001 - the client refused the ids: every job fails alike
            for j in jobs:
                self._fail(conn, j, f"{type(e).__name__}: {e}")
            return
        for j, p in zip(jobs, ps):
            p.add_done_callback(lambda q, j=j: self._looked_up(conn, j, q))

    def _slot(self, conn: _Conn, op: int, req_id: int, slot: int, n: int) -> Slot:
        if slot >= len(conn.slots):
            raise _Refused(op, req_id, slot, f"slot {slot} does not exist ({len(conn.slots)} slots)")
        s = conn.slots[slot]
        if n > s.capacity:
            raise _Refused(op, req_id, slot, f"{n} ids do not fit slot {slot} of {s.capacity}")
        if s.busy:
            raise _Refused(op, req_id, slot, f"slot {slot} is busy with a request in flight")
        return s

    def _hello(self, conn: _Conn, data: bytes) -> None:
        _magic, op, version, req_id, _slot, _n, fingerprint = HELLO.unpack(data)
        mine = self.layout.fingerprint
        if op != Op.HELLO or version != VERSION:
            raise _Refused(op, req_id, 0, f"HELLO of protocol version {version}; this agent speaks {VERSION}")
        if fingerprint.rstrip(b"\0").decode("ascii", "replace") != mine:
            raise _Refused(op, req_id, 0, f"worker's table layout {fingerprint.rstrip(bytes(1))!r} differs from "
                                          f"the agent's {mine}")
        conn.hello = True
        info = HELLO_INFO.pack(self.layout.total_rows, self.layout.row_dim, VERSION,
                               self.client.dtype_name.encode(), mine.encode())
        conn.send(REPLY.pack(MAGIC, Op.HELLO, OK, req_id, 0, 0, 0) + info)

    def _stats(self, conn: _Conn, req_id: int) -> None:
        """The client's statistics (latency, dedup, bytes, I/O-thread seconds by stage), for
        benchmarks and status: what a worker cannot see from its side of the socket."""
        report = dict(self.client.stats(), agent_refused=self.refused, agent_connections=len(self._conns))
        text = json.dumps(report, separators=(",", ":"), default=float).encode()
        if len(text) > MAX_PACKET - REPLY.size:
            raise _Refused(Op.STATS, req_id, 0, f"statistics of {len(text)} bytes do not fit one packet")
        conn.send(REPLY.pack(MAGIC, Op.STATS, OK, req_id, 0, 0, len(text)) + text)

    def _new_slot(self, conn: _Conn, req_id: int, capacity: int) -> None:
        lim = self.limits
        layout = SlotLayout(int(capacity), self.layout.row_dim, self.dtype.itemsize,
                            row_width(self.client.dtype_name, self.layout.row_dim))
        if not 1 <= capacity <= lim.max_slot_ids or len(conn.slots) >= lim.max_slots \
                or conn.nbytes + layout.nbytes > lim.max_bytes:
            raise _Refused(Op.SLOT, req_id, 0, f"slot of {capacity} ids refused (limits: {lim.max_slot_ids} ids, "
                                               f"{lim.max_slots} slots, {lim.max_bytes} bytes per worker)")
        with self._mapped_lock:  # connections ask at once, each on its own thread
            if self._mapped + layout.nbytes > lim.max_total_bytes:
                raise _Refused(Op.SLOT, req_id, 0, f"slot of {layout.nbytes} bytes refused: the agent's slots hold "
                                                   f"{self._mapped} of {lim.max_total_bytes} bytes for all workers")
            self._mapped += layout.nbytes
        try:
            fd = create_memfd(layout.nbytes)
        except BaseException:
            with self._mapped_lock:
                self._mapped -= layout.nbytes
            raise
        conn.nbytes += layout.nbytes  # from here the connection's close gives the bytes back
        try:
            conn.slots.append(Slot(fd, layout, self.dtype))
            conn.send(REPLY.pack(MAGIC, Op.SLOT, OK, req_id, len(conn.slots) - 1, capacity, layout.nbytes), (fd,))
        finally:
            os.close(fd)  # the mapping (and the worker's copy of the fd) keep the memory

    def _looked_up(self, conn: _Conn, job: _Job, p: Any) -> None:
        """On the client's I/O thread: the rows are in the slot; write the inverse, reply."""
        try:
            r = p.result(0)
        except Exception as e:  # noqa: BLE001 - the worker gets the client's error text
            return self._fail(conn, job, f"{type(e).__name__}: {e}")
        return self._answer(conn, job, r)

    def _fail(self, conn: _Conn, job: _Job, text: str) -> None:
        """A job that failed: its slot is free for the worker again, which gets ``text``."""
        job.s.busy = False
        self.refused += 1
        conn.send(error_reply(job.op, job.req_id, job.slot, text))

    def _answer(self, conn: _Conn, job: _Job, r: Any) -> None:
        """A lookup's unique rows are in the slot: write its inverse and unique ids there (and,
        for EXPAND, the rows in the ids' order over the unique ones), reply."""
        s, n = job.s, r.inverse.size
        if job.expand:
            # rows [U, W] -> [n, W] over them, taken from a copy of the U rows: mode 'raise' would
            # buffer all n (the inverse is this agent's own client's, always in range)
            try:
                r.rows.copy().take(r.inverse, axis=0, out=s.rows[:n], mode="clip")
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: this request fails alone
                return self._fail(conn, job, f"agent error: {type(e).__name__}: {e}")
        # the worker reads the rows' ids (for its pushes) where its ids were
        s.inverse[:n] = r.inverse
        s.ids[:r.ids.size] = r.ids
        s.busy = False
        conn.send(REPLY.pack(MAGIC, job.op, OK, job.req_id, job.slot, r.rows.shape[0], 0))

    def _pushed(self, conn: _Conn, s: Slot, req_id: int, slot: int, fut: Any) -> None:
        s.busy = False
        try:
            updated = int(fut.result(0))
        except Exception as e:  # noqa: BLE001
            self.refused += 1
            return conn.send(error_reply(Op.PUSH, req_id, slot, f"{type(e).__name__}: {e}"))
        conn.send(REPLY.pack(MAGIC, Op.PUSH, OK, req_id, slot, updated, 0))
        return None


class _Job(NamedTuple):
    """A checked request whose slot is taken: what :meth:`LookupAgent._start` hands on."""

    s: Slot
    op: int
    req_id: int
    slot: int
    ids: np.ndarray      #: [n] int64, copied out of the slot
    ordered: bool
    lr: float = 0.0      #: a push's learning rate (0: the shards' own)
    expand: bool = False  #: EXPAND: the rows go back in the ids' order


class _Refused(Exception):
    def __init__(self, op: int, req_id: int, slot: int, text: str):
        super().__init__(text)
        self.op, self.req_id, self.slot = op, req_id, slot
