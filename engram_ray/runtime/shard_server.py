"""``ShardServer``: the Ray actor that holds one shard in its node's RAM and serves it over
gRPC. Ray places and names it; rows never pass through Ray, only its address does."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..config import ServiceConfig, StoreConfig
from ..core.layout import TableLayout
from ..rpc.auth import auth_metadata
from ..rpc.generated import engram_pb2 as pb
from ..rpc.replication import Replication, fetch_snapshot
from ..rpc.server import create_server
from ..rpc.servicer import ShardServicer
from ..store import TableShard
from ..store.recovery import RecoveryCheckpoints

__all__ = ["ShardServer"]

#: Ray namespace of every actor of engram_ray (shards, service directories, workers).
NAMESPACE = "engram_ray"

log = logging.getLogger(__name__)


class ShardServer:
    """Builds (or loads) its :class:`TableShard` and starts a gRPC server for it.

    A plain class, made remote by :func:`engram_ray.runtime.deploy` with the placement and
    name it needs.
    """

    def __init__(self, layout: dict[str, Any], num_shards: int, shard_index: int,
                 store: dict[str, Any], *, host: str | None = None, port: int = 0,
                 service: dict[str, Any] | None = None, token: str | None = None,
                 checkpoint: str | None = None, name: str | None = None, replica: int = 0):
        import ray

        lay = TableLayout.from_dict(layout)
        cfg = StoreConfig.from_dict(store)
        self.service = svc = ServiceConfig.from_dict(service or {})
        self.name, self.index, self.replica = name, shard_index, replica
        self.token = token
        ctx = ray.get_runtime_context()
        #: True when Ray restarted this actor after it died.
        self.restarted = bool(ctx.was_current_actor_reconstructed)
        self.recovery = None
        if svc.checkpoint_dir:
            where = Path(svc.checkpoint_dir) / (name or "engram") / f"shard-{shard_index:04d}-of-{num_shards:04d}"
            if svc.replicas > 1:
                where = where.with_name(f"{where.name}-r{replica}")
            self.recovery = RecoveryCheckpoints(where)
        t0 = time.perf_counter()
        restored = self.recovery.load_newest(lay, num_shards, shard_index, cfg) if self.recovery else None
        #: Where the rows came from: a recovery checkpoint, the deploy's checkpoint, or init.
        self.source = "init"
        if restored is not None:
            self.shard, path = restored
            self.source = str(path)
        elif checkpoint:
            self.shard = TableShard.load(checkpoint, lay, num_shards, shard_index, cfg)
            self.source = checkpoint
        else:
            self.shard = TableShard.create(lay, num_shards, shard_index, cfg)
        self.load_seconds = time.perf_counter() - t0
        host = host or ray.util.get_node_ip_address()
        tls = None
        if svc.tls_cert:  # read here: the paths are on this node
            tls = (Path(svc.tls_cert).read_bytes(), Path(svc.tls_key).read_bytes())
        self.servicer = servicer = ShardServicer(self.shard, svc.max_message_bytes, max_ids_per_request=svc.max_ids_per_request,
                                 recovery_save=self.save_recovery if self.recovery else None,
                                 observer=_RayMetrics(name or "engram", shard_index, self.shard.nbytes))
        previous = self._directory_address() if self.restarted else None
        kw = dict(max_workers=svc.max_workers, max_message_bytes=svc.max_message_bytes,
                  max_concurrent_rpcs=svc.max_concurrent_rpcs, token=token, tls=tls, servicer=servicer)
        self._server = None
        if previous and previous.rsplit(":", 1)[0] == host:
            # same node: take the old port back, so clients' channels simply reconnect
            try:
                self._server, port = create_server(self.shard, host, int(previous.rsplit(":", 1)[1]), **kw)
            except (OSError, RuntimeError):
                self._server = None
        rejoin = self.restarted and svc.replicas > 1
        servicer.ready = not rejoin  # a rejoining copy serves only once it has the primary's rows
        if self._server is None:
            self._server, port = create_server(self.shard, host, port, **kw)
        self._address = f"{host}:{port}"
        if rejoin:
            self._rejoin(lay)
        if self.restarted:
            self._announce()
        (log.warning if self.restarted else log.info)(
            "shard %d/%d rows [%d, %d) serving on %s (rows from %s, %.2f s)%s", shard_index, num_shards,
            self.shard.row_start, self.shard.row_stop, self._address, self.source, self.load_seconds,
            " after a restart" if self.restarted else "")
        self._stop = threading.Event()
        if svc.checkpoint_every_s and self.recovery is not None:
            threading.Thread(target=self._checkpoint_loop, name=f"checkpoint-{shard_index}", daemon=True).start()

    # Replication ---------------------------------------------------------------------------
    def set_peers(self, peers: list[str]) -> None:
        """Called by deploy once every copy of this shard serves: ``peers[r]`` is replica r."""
        self.servicer.replication = Replication(self.replica, list(peers), token=self.token,
                                                tls_ca=self.tls_ca())

    def _rejoin(self, layout: TableLayout) -> None:
        """After a restart: copy the rows and optimiser state of the primary, which forwards
        every later push to this copy; with no live copy left, serve what was loaded."""
        import grpc
        import ray

        d = self._directory()
        peers = list(ray.get(d.info.remote())["replicas"][self.index]) if d is not None else [self._address]
        peers[self.replica] = self._address
        repl = Replication(self.replica, peers, token=self.token, tls_ca=self.tls_ca())
        source, followers = None, []
        for r, address in enumerate(peers):
            if r == self.replica:
                continue
            try:
                info = repl.stub(address).Describe(pb.DescribeRequest(), timeout=2.0, metadata=auth_metadata(self.token))
            except grpc.RpcError:
                continue
            if info.role == "primary":
                source = address
                break
            if info.role == "backup" and info.primary == self.replica:
                followers.append(address)  # it followed this copy: it takes over when asked
        if source is None and followers:
            source = followers[0]
        t0 = time.perf_counter()
        if source is None:
            log.error("shard %d replica %d: no live copy to copy from; serving rows from %s as primary",
                      self.index, self.replica, self.source)
            repl.primary = self.replica
        else:
            arrays, repl.primary = fetch_snapshot(
                source, layout.fingerprint, self.replica, self._address, store_dtype=self.shard.store.dtype,
                token=self.token, tls_ca=self.tls_ca(), max_message_bytes=self.service.max_message_bytes)
            with self.shard._lock:
                self.shard.values[...] = arrays["rows"]
                if "adam_m" in arrays:
                    self.shard.optimizer.load_state(arrays)
            repl.seed(arrays["applied"])
            self.source = f"replica {repl.primary} at {source}"
        self.load_seconds += time.perf_counter() - t0
        self.servicer.replication = repl
        self.servicer.ready = True

    # Recovery ------------------------------------------------------------------------------
    def save_recovery(self) -> str:
        """Write a recovery checkpoint now; returns its directory."""
        if self.recovery is None:
            raise ValueError("this shard has no checkpoint_dir")
        return str(self.recovery.save(self.shard))

    def _checkpoint_loop(self) -> None:
        while not self._stop.wait(self.service.checkpoint_every_s):
            try:
                self.save_recovery()
            except Exception:  # noqa: BLE001 - keep serving; the next period tries again
                log.exception("shard %d: periodic checkpoint failed", self.index)

    def _directory(self):
        import ray
        try:
            return ray.get_actor(self.name, namespace=NAMESPACE) if self.name else None
        except ValueError:
            return None

    def _directory_address(self) -> str | None:
        import ray
        d = self._directory()
        return ray.get(d.info.remote())["replicas"][self.index][self.replica] if d is not None else None

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
        d.update(address=self._address, pid=os.getpid(), restarted=self.restarted, source=self.source,
                 replica=self.replica,
                 load_seconds=self.load_seconds, node_id=ray.get_runtime_context().get_node_id())
        return d

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self._server.stop(grace).wait()


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
