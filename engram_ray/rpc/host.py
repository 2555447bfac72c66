"""``ShardHost``: one copy of one shard, served over gRPC by the process it lives in.

Everything a shard's process does that needs no Ray: where its rows come from (recovery
checkpoints, a checkpoint, the initial rows, or a live copy after a restart), the gRPC server,
periodic recovery checkpoints, replication wiring and the operator's ``recover`` override.
Two things wrap it: the Ray actor :class:`engram_ray.runtime.shard_server.ShardServer` (which
adds placement, the service directory and Ray's metrics) and ``engram-ray shard`` (a plain
process, for machines without Ray). Both therefore serve with the same code.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from ..config import ServiceConfig, StoreConfig
from ..core.layout import TableLayout
from ..errors import EngramError, NotServing
from ..store import TableShard
from ..store.recovery import Recovered, RecoveryCheckpoints
from .peer import join_copy
from .replication import Replication
from .server import create_server
from .servicer import REFUSING, SERVING, SYNCING_STATE, ShardServicer

__all__ = ["ShardHost"]

log = logging.getLogger(__name__)

#: Makes the servicer's per-request observer once the shard is loaded (it may want its size).
ObserverFactory = Callable[[TableShard], Callable[[str, float, int, bool], None]]


class ShardHost:
    """Builds (or loads) shard ``index`` of ``num_shards`` and serves it on ``host:port``.

    Where its rows come from, in order: the newest recovery checkpoint in ``recovery_dir`` that
    loads; with ``rejoin_peers`` (a restarted copy), the primary's rows; ``checkpoint``; the
    initial rows. When recovery checkpoints exist and none loads (and no copy can give the
    rows), it does not fall back to the initial rows: it serves Describe only, with the reason,
    until an operator calls :meth:`recover`.
    """

    def __init__(self, layout: TableLayout, store: StoreConfig, service: ServiceConfig, num_shards: int,
                 index: int, replica: int = 0, *, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, peer_token: str | None = None, checkpoint: str | None = None,
                 recovery_dir: Path | None = None, name: str = "engram", restarted: bool = False,
                 previous_address: str | None = None, rejoin_peers: Callable[[], list[str]] | None = None,
                 observer: ObserverFactory | None = None):
        """``token``: the clients' secret (None: no auth); ``peer_token``: the copies' own
        credential; ``previous_address``: where this copy served before a restart (its port is
        taken back if free); ``rejoin_peers``: after a restart, returns the addresses of every
        copy of this shard (``[r]`` = replica r), read again on each attempt to rejoin."""
        self.layout, self.store, self.service = layout, store, service
        self.name, self.index, self.replica, self.num_shards = name, index, replica, num_shards
        self.token, self.peer_token, self.restarted = token, peer_token, restarted
        self.recovery = RecoveryCheckpoints(recovery_dir) if recovery_dir is not None else None
        t0 = time.perf_counter()
        self.shard, source, refusal = self._load(checkpoint)
        self.load_seconds = time.perf_counter() - t0
        self.servicer = servicer = ShardServicer(
            self.shard, service.max_message_bytes, max_ids_per_request=service.max_ids_per_request,
            recovery_save=self.save_recovery if self.recovery else None, save_root=service.save_root,
            dedup_window_s=service.dedup_window_s, observer=observer(self.shard) if observer else None)
        servicer.rows_from = source
        servicer.notes = [f"recovery checkpoint {p} is unusable: {why}" for p, why in self._unusable]
        if refusal:
            servicer.refuse(refusal)
        if rejoin_peers is not None:  # a rejoining copy serves only once it has the primary's rows
            servicer.state = SYNCING_STATE
        self._address = self._start_server(host, port, previous_address)
        if rejoin_peers is not None:
            self._rejoin(refusal, rejoin_peers)
        (log.warning if restarted or refusal else log.info)(
            "shard %d/%d rows [%d, %d) %s on %s (rows from %s, %.2f s)%s", index, num_shards,
            self.shard.row_start, self.shard.row_stop, servicer.state, self._address, servicer.rows_from,
            self.load_seconds, " after a restart" if restarted else "")
        self._stop = threading.Event()
        if service.checkpoint_every_s and self.recovery is not None:
            threading.Thread(target=self._checkpoint_loop, name=f"checkpoint-{index}", daemon=True).start()

    def _start_server(self, host: str, port: int, previous: str | None) -> str:
        """Start the gRPC server on ``host``; returns its address. A restarted copy on the
        same host takes its old port back, so clients' channels simply reconnect."""
        svc = self.service
        tls = None
        if svc.tls_cert:  # read here: the paths are on this node
            tls = (Path(svc.tls_cert).read_bytes(), Path(svc.tls_key).read_bytes())
        kw: dict[str, Any] = dict(max_workers=svc.max_workers, max_message_bytes=svc.max_message_bytes,
                                  max_concurrent_rpcs=svc.max_concurrent_rpcs,
                                  max_lookup_streams=svc.max_lookup_streams, token=self.token,
                                  peer_token=self.peer_token, tls=tls, servicer=self.servicer)
        self._server = None
        old_host, _, old_port = (previous or "").rpartition(":")
        if old_host == host and old_port.isdigit() and 0 < int(old_port) < 65536:  # the directory's word
            try:
                self._server, port = create_server(self.shard, host, int(old_port), **kw)
            except (OSError, RuntimeError):
                self._server = None
        if self._server is None:
            self._server, port = create_server(self.shard, host, port, **kw)
        return f"{host}:{port}"

    def _load(self, checkpoint: str | None) -> tuple[TableShard, str, str]:
        """``(shard, where its rows came from, refusal)``; a refusal ("" if none) comes with
        placeholder rows that are never served."""
        lay, cfg, i = self.layout, self.store, self.index
        found = (self.recovery.load_newest(lay, self.num_shards, i, cfg) if self.recovery is not None
                 else Recovered())
        self._unusable = found.unusable
        if found.shard is not None:
            return found.shard, str(found.path), ""
        what = f"shard {i} copy {self.replica}" if self.service.replicas > 1 else f"shard {i}"
        fix = (f"An operator decides: engram-ray recover --name {self.name} --shard {i}"
               + (f" --replica {self.replica}" if self.service.replicas > 1 else "")
               + " --reset (serve the initial rows) or --from DIR (a checkpoint)")
        if found.refused and self.recovery is not None:
            reasons = "; ".join(f"{p.name}: {why}" for p, why in found.unusable)
            return (TableShard.empty(lay, self.num_shards, i, cfg), "nothing (refusing)",
                    f"{what} refuses to serve: none of its {len(found.unusable)} recovery checkpoints in "
                    f"{self.recovery.directory} loads ({reasons}); they are kept as they are. {fix}")
        if checkpoint:
            try:
                return TableShard.load(checkpoint, lay, self.num_shards, i, cfg), checkpoint, ""
            except Exception as e:  # noqa: BLE001
                if not self.restarted:
                    raise  # at start: the start fails, and says why
                return (TableShard.empty(lay, self.num_shards, i, cfg), "nothing (refusing)",
                        f"{what} refuses to serve: its deploy checkpoint {checkpoint} no longer loads "
                        f"({type(e).__name__}: {e}). {fix}")
        return TableShard.create(lay, self.num_shards, i, cfg), "init", ""

    # Replication ---------------------------------------------------------------------------
    def _replication(self, peers: list[str]) -> Replication:
        return Replication(self.replica, list(peers), self.shard, self.servicer.pushlog,
                           peer_token=self.peer_token, tls_ca=self.tls_ca(),
                           join_timeout_s=self.service.join_timeout_s)

    def set_peers(self, peers: list[str]) -> None:
        """Once every copy of this shard serves: ``peers[r]`` is replica r's address."""
        self.servicer.replication = self._replication(peers)

    def _find_source(self, repl: Replication, peers: list[str]) -> tuple[int, str] | None:
        """The copy to copy rows from: the serving primary, else a backup that followed
        this copy (it takes over when asked); None when no other copy answers."""
        followers = []
        for r, address in enumerate(peers):
            if r == self.replica:
                continue
            try:
                info = repl.describe(address, timeout=2.0)
            except grpc.RpcError:
                continue
            if info.role == "primary" and info.state == SERVING:
                return r, address
            if info.role == "backup" and info.primary == self.replica and info.state == SERVING:
                followers.append((r, address))
        return followers[0] if followers else None

    def _serve_alone(self, repl: Replication, refusal: str) -> None:
        """No live copy to copy from: serve what was loaded as primary (or go on refusing)."""
        repl.primary = self.replica
        self.servicer.replication = repl
        if refusal:
            self.servicer.refuse(refusal + " No other copy of the shard is alive to copy from.")
            log.error("shard %d replica %d: no live copy to copy from, and no usable checkpoint",
                      self.index, self.replica)
        else:
            log.error("shard %d replica %d: no live copy to copy from; serving rows from %s as primary",
                      self.index, self.replica, self.servicer.rows_from)
            self.servicer.state = SERVING

    def _rejoin(self, refusal: str, peers_of: Callable[[], list[str]], attempts: int = 3) -> None:
        """After a restart: copy the rows and optimiser state of the primary, which forwards
        every later push to this copy; with no live copy left, serve what was loaded (or go on
        refusing). Raises after ``attempts`` failed copies (under Ray: the actor restarts and
        tries again)."""
        for attempt in range(attempts):
            peers = list(peers_of()) or [self._address]
            if len(peers) <= self.replica:  # the directory is gone (a shutdown) or lists fewer copies
                raise RuntimeError(f"shard {self.index} copy {self.replica}: the service's directory lists "
                                   f"{len(peers)} copies of this shard; cannot rejoin")
            peers[self.replica] = self._address
            repl = self._replication(peers)
            source = self._find_source(repl, peers)
            if source is None:
                self._serve_alone(repl, refusal)
                return
            repl.close()
            t0 = time.perf_counter()
            try:
                snap = join_copy(self.servicer, self.replica, peers, source[0], peer_token=self.peer_token,
                                 tls_ca=self.tls_ca(), timeout=self.service.join_timeout_s,
                                 join_timeout_s=self.service.join_timeout_s)
            except (grpc.RpcError, EngramError) as e:
                why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
                log.warning("shard %d replica %d: copying replica %d at %s failed (%s); attempt %d of %d",
                            self.index, self.replica, source[0], source[1], why, attempt + 1, attempts)
                time.sleep(0.5 * (attempt + 1))
                continue
            self.load_seconds += time.perf_counter() - t0
            log.info("shard %d replica %d: copied replica %d (%d pushes kept meanwhile)", self.index,
                     self.replica, snap.primary, snap.kept)
            return
        raise RuntimeError(f"shard {self.index} replica {self.replica}: could not copy a live copy's rows "
                           f"after {attempts} attempts")

    # Recovery ------------------------------------------------------------------------------
    def save_recovery(self) -> tuple[str, str]:
        """Write a recovery checkpoint now; returns its directory and the rows' sha256."""
        if self.recovery is None:
            raise ValueError("this shard has no checkpoint_dir")
        if self.servicer.state != SERVING:  # a refusing copy's placeholder rows would prune the evidence
            raise NotServing(f"shard {self.index} is {self.servicer.state}; no recovery checkpoint written")
        path, sha = self.recovery.save_checked(self.shard)
        return str(path), sha

    def recover(self, source: str = "init") -> dict[str, Any]:
        """The operator's override for a copy that refuses to serve: serve ``source`` -- "init"
        (the initial rows) or a checkpoint directory -- from now on. It becomes the copy's
        recovery point at once, and the unusable checkpoints are set aside (renamed, not
        deleted). Returns :meth:`info`."""
        if self.servicer.state != REFUSING:
            raise ValueError(f"shard {self.index} copy {self.replica} is {self.servicer.state}, not refusing; "
                             "nothing to recover")
        lay, cfg = self.layout, self.store
        fresh = (TableShard.create(lay, self.num_shards, self.index, cfg) if source == "init"
                 else TableShard.load(source, lay, self.num_shards, self.index, cfg))
        self.shard.restore(fresh.snapshot())
        del fresh
        if self.recovery is not None:
            self.recovery.save(self.shard)  # the accepted rows are the recovery point from now on
            self.recovery.quarantine(self._unusable)
        self.servicer.rows_from = f"{source} (operator override)"
        self.servicer.notes.append(f"operator chose to serve {source} instead of the unusable checkpoints")
        self.servicer.state, self.servicer.refusal = SERVING, ""
        log.warning("shard %d copy %d: serving %s on the operator's word", self.index, self.replica, source)
        return self.info()

    def _checkpoint_loop(self) -> None:
        while not self._stop.wait(self.service.checkpoint_every_s):
            if self.servicer.state != SERVING:
                continue
            try:
                self.save_recovery()
            except Exception:  # noqa: BLE001 - keep serving; the next period tries again
                log.exception("shard %d: periodic checkpoint failed", self.index)

    # Facts and lifecycle -------------------------------------------------------------------
    def address(self) -> str:
        """``host:port`` the gRPC server is bound to."""
        return self._address

    def tls_ca(self) -> bytes | None:
        """PEM of the CA clients should trust (tls_ca, or the certificate itself)."""
        path = self.service.tls_ca or self.service.tls_cert
        return Path(path).read_bytes() if path else None

    def info(self) -> dict[str, Any]:
        """Where the shard runs and what it holds (small metadata only)."""
        d = self.shard.describe()
        d.update(address=self._address, pid=os.getpid(), restarted=self.restarted, source=self.servicer.rows_from,
                 replica=self.replica, state=self.servicer.state, refusal=self.servicer.refusal,
                 notes=list(self.servicer.notes), load_seconds=self.load_seconds)
        return d

    def stop(self, grace: float = 1.0) -> None:
        """Stop the checkpoint loop, the server (letting calls in flight finish within
        ``grace`` seconds) and the replication channels."""
        self._stop.set()
        if self._server is not None:
            self._server.stop(grace).wait()
        if self.servicer.replication is not None:
            self.servicer.replication.close()
