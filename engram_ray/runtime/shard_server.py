"""``ShardServer``: the Ray actor that holds one shard in its node's RAM and serves it over
gRPC. Ray places and names it; rows never pass through Ray, only its address does."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import EngramError, NotServing
from ..rpc.peer import join_copy
from ..rpc.replication import Replication
from ..rpc.server import create_server
from ..rpc.servicer import REFUSING, SERVING, SYNCING_STATE, ShardServicer
from ..store import TableShard
from ..store.recovery import Recovered, RecoveryCheckpoints
from .spec import NAMESPACE, ServiceSpec

__all__ = ["NAMESPACE", "ShardServer"]

log = logging.getLogger(__name__)


class ShardServer:
    """Builds (or loads) its :class:`TableShard` and starts a gRPC server for it.

    A plain class, made remote by :func:`engram_ray.runtime.deploy` with the placement and
    name it needs. Where its rows come from, in order: the newest recovery checkpoint that
    loads; with copies, after a restart, the primary's rows; the deploy's checkpoint; the
    initial rows. When recovery checkpoints exist and none loads (and no copy can give the
    rows), it does not fall back to the initial rows: it serves Describe only, with the reason,
    until an operator calls :meth:`recover` (``engram-ray recover``).
    """

    def __init__(self, spec: ServiceSpec, shard_index: int, replica: int = 0, *, host: str | None = None,
                 port: int = 0, peer_token: str | None = None, checkpoint: str | None = None):
        """``spec``: the service as deploy planned it (its addresses are read from the
        service's directory, as they change); ``peer_token``: the copies' own credential,
        given to shard actors only, never kept in the spec."""
        import ray

        self.layout, self.store, self.service = spec.layout, spec.store, spec.service
        svc = spec.service
        self.name, self.index, self.replica, self.num_shards = spec.name, shard_index, replica, spec.num_shards
        self.token, self.peer_token = spec.token, peer_token
        ctx = ray.get_runtime_context()
        #: True when Ray restarted this actor after it died.
        self.restarted = bool(ctx.was_current_actor_reconstructed)
        where = spec.recovery_dir(shard_index, replica)
        self.recovery = RecoveryCheckpoints(where) if where is not None else None
        t0 = time.perf_counter()
        self.shard, source, refusal = self._load(checkpoint)
        self.load_seconds = time.perf_counter() - t0
        self.servicer = servicer = ShardServicer(
            self.shard, svc.max_message_bytes, max_ids_per_request=svc.max_ids_per_request,
            recovery_save=self.save_recovery if self.recovery else None, save_root=svc.save_root,
            dedup_window_s=svc.dedup_window_s, observer=_RayMetrics(self.name, shard_index, self.shard.nbytes))
        servicer.rows_from = source
        servicer.notes = [f"recovery checkpoint {p} is unusable: {why}" for p, why in self._unusable]
        if refusal:
            servicer.refuse(refusal)
        rejoin = self.restarted and svc.replicas > 1
        if rejoin:  # a rejoining copy serves only once it has the primary's rows
            servicer.state = SYNCING_STATE
        self._address = self._start_server(host or ray.util.get_node_ip_address(), port)
        if rejoin:
            self._rejoin(refusal)
        if self.restarted:
            self._announce()
        (log.warning if self.restarted or refusal else log.info)(
            "shard %d/%d rows [%d, %d) %s on %s (rows from %s, %.2f s)%s", shard_index, self.num_shards,
            self.shard.row_start, self.shard.row_stop, servicer.state, self._address, servicer.rows_from,
            self.load_seconds, " after a restart" if self.restarted else "")
        self._stop = threading.Event()
        if svc.checkpoint_every_s and self.recovery is not None:
            threading.Thread(target=self._checkpoint_loop, name=f"checkpoint-{shard_index}", daemon=True).start()

    def _start_server(self, host: str, port: int) -> str:
        """Start the gRPC server on ``host``; returns its address. A restarted copy on the
        same node takes its old port back, so clients' channels simply reconnect."""
        svc = self.service
        tls = None
        if svc.tls_cert:  # read here: the paths are on this node
            tls = (Path(svc.tls_cert).read_bytes(), Path(svc.tls_key).read_bytes())
        kw: dict[str, Any] = dict(max_workers=svc.max_workers, max_message_bytes=svc.max_message_bytes,
                                  max_concurrent_rpcs=svc.max_concurrent_rpcs, token=self.token,
                                  peer_token=self.peer_token, tls=tls, servicer=self.servicer)
        previous = self._directory_address() if self.restarted else None
        self._server = None
        if previous and previous.rsplit(":", 1)[0] == host:
            try:
                self._server, port = create_server(self.shard, host, int(previous.rsplit(":", 1)[1]), **kw)
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
                    raise  # at deploy: the deploy fails, and says why
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
        """Called by deploy once every copy of this shard serves: ``peers[r]`` is replica r."""
        self.servicer.replication = self._replication(peers)

    def _rejoin(self, refusal: str, attempts: int = 3) -> None:
        """After a restart: copy the rows and optimiser state of the primary, which forwards
        every later push to this copy; with no live copy left, serve what was loaded (or go on
        refusing). Raises after ``attempts`` failed copies: Ray restarts the actor, which tries
        again."""
        import grpc
        import ray

        for attempt in range(attempts):
            d = self._directory()
            peers = list(ray.get(d.spec.remote()).replicas[self.index]) if d is not None else [self._address]
            peers[self.replica] = self._address
            repl = self._replication(peers)
            source, followers = None, []
            for r, address in enumerate(peers):
                if r == self.replica:
                    continue
                try:
                    info = repl.describe(address, timeout=2.0)
                except grpc.RpcError:
                    continue
                if info.role == "primary" and info.state == SERVING:
                    source = (r, address)
                    break
                if info.role == "backup" and info.primary == self.replica and info.state == SERVING:
                    followers.append((r, address))  # it followed this copy: it takes over when asked
            source = source or (followers[0] if followers else None)
            if source is None:
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

    def _directory(self):
        import ray
        try:
            return ray.get_actor(self.name, namespace=NAMESPACE)
        except ValueError:
            return None

    def _directory_address(self) -> str | None:
        import ray
        d = self._directory()
        return ray.get(d.spec.remote()).replicas[self.index][self.replica] if d is not None else None

    def _announce(self) -> None:
        import ray
        d = self._directory()
        if d is not None:
            ray.get(d.set_address.remote(self.index, self._address, self.replica))

    def address(self) -> str:
        return self._address

    def tls_ca(self) -> bytes | None:
        """PEM of the CA clients should trust (tls_ca, or the certificate itself)."""
        path = self.service.tls_ca or self.service.tls_cert
        return Path(path).read_bytes() if path else None

    def info(self) -> dict[str, Any]:
        """Where the shard runs and what it holds (small metadata only)."""
        import ray
        d = self.shard.describe()
        d.update(address=self._address, pid=os.getpid(), restarted=self.restarted, source=self.servicer.rows_from,
                 replica=self.replica, state=self.servicer.state, refusal=self.servicer.refusal,
                 notes=list(self.servicer.notes),
                 load_seconds=self.load_seconds, node_id=ray.get_runtime_context().get_node_id())
        return d

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.stop(grace).wait()
        if self.servicer.replication is not None:
            self.servicer.replication.close()


class _RayMetrics:
    """Exports each request to Ray's metrics (Prometheus at the dashboard's metrics port):
    engram_requests{method,status}, engram_rows{method}, engram_request_seconds{method},
    engram_resident_bytes, tagged with the service and shard."""

    def __init__(self, service: str, shard: int, resident_bytes: int):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"service": service, "shard": str(shard)}
        keys = ("service", "shard", "method")
        self.requests = Counter("engram_requests", "EngramMemory calls served, by outcome",
                                tag_keys=keys + ("status",))
        self.rows = Counter("engram_rows", "rows looked up or updated", tag_keys=keys)
        self.seconds = Histogram("engram_request_seconds", "handler time of EngramMemory calls",
                                 boundaries=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0],
                                 tag_keys=keys)
        Gauge("engram_resident_bytes", "bytes of rows and optimiser state in RAM",
              tag_keys=("service", "shard")).set(resident_bytes, self.tags)

    def __call__(self, method: str, seconds: float, rows: int, ok: bool) -> None:
        tags = dict(self.tags, method=method)
        self.requests.inc(1, dict(tags, status="ok" if ok else "rejected"))
        if ok:
            self.rows.inc(rows, tags)
            self.seconds.observe(seconds, tags)
