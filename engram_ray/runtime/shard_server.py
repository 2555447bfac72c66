"""``ShardServer``: the Ray actor that holds one shard in its node's RAM and serves it over
gRPC. Ray places and names it; rows never pass through Ray, only its address does. The
serving itself is :class:`~engram_ray.rpc.host.ShardHost`'s, which ``engram-ray shard`` also
runs without Ray."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..rpc.host import ShardHost
from .priority import serve_at_normal_priority
from .spec import NAMESPACE, ServiceSpec

__all__ = ["NAMESPACE", "ShardServer"]

log = logging.getLogger(__name__)


class ShardServer:
    """The Ray actor around a :class:`~engram_ray.rpc.host.ShardHost`: the same server that
    ``engram-ray shard`` runs as a plain process, plus what only Ray gives -- placement and
    restarts, the service directory (where a restarted copy finds its old port and its peers,
    and announces its new address) and Ray's metrics.

    A plain class, made remote by :func:`engram_ray.runtime.deploy` with the placement and
    name it needs. Where its rows come from (recovery checkpoints, a live copy after a restart,
    the deploy's checkpoint, the initial rows) and when it refuses to serve is the host's:
    see :class:`~engram_ray.rpc.host.ShardHost`.
    """

    def __init__(self, spec: ServiceSpec, shard_index: int, replica: int = 0, *, host: str | None = None,
                 port: int = 0, peer_token: str | None = None, checkpoint: str | None = None):
        """``spec``: the service as deploy planned it (its addresses are read from the
        service's directory, as they change); ``peer_token``: the copies' own credential,
        given to shard actors only, never kept in the spec."""
        import ray

        #: This process's niceness: Ray's workers start at 15, a shard serves at 0 where allowed.
        self.nice = serve_at_normal_priority()
        self.name, self.index, self.replica = spec.name, shard_index, replica
        #: True when Ray restarted this actor after it died.
        self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        rejoin = self.restarted and spec.service.replicas > 1
        self.host = ShardHost(
            spec.layout, spec.store, spec.service, spec.num_shards, shard_index, replica,
            host=host or ray.util.get_node_ip_address(), port=port, token=spec.token, peer_token=peer_token,
            checkpoint=checkpoint, recovery_dir=spec.recovery_dir(shard_index, replica), name=spec.name,
            restarted=self.restarted, previous_address=self._directory_address() if self.restarted else None,
            rejoin_peers=self._peers if rejoin else None,
            observer=lambda shard: _RayMetrics(spec.name, shard_index, shard.nbytes))
        metrics = self.host.servicer.observer
        if isinstance(metrics, _RayMetrics):  # the usage gauges read the servicer's tracker
            metrics.usage = self.host.servicer.usage
        if self.restarted:
            self._announce()

    # What the host does, as actor methods ---------------------------------------------------
    def set_peers(self, peers: list[str]) -> None:
        """Called by deploy once every copy of this shard serves: ``peers[r]`` is replica r."""
        self.host.set_peers(peers)

    def save_recovery(self) -> tuple[str, str]:
        """Write a recovery checkpoint now; returns its directory and the rows' sha256."""
        return self.host.save_recovery()

    def recover(self, source: str = "init") -> dict[str, Any]:
        """The operator's override for a copy that refuses to serve (see ShardHost.recover)."""
        import ray
        return dict(self.host.recover(source), node_id=ray.get_runtime_context().get_node_id())

    def address(self) -> str:
        return self.host.address()

    def tls_ca(self) -> bytes | None:
        """PEM of the CA clients should trust (tls_ca, or the certificate itself)."""
        return self.host.tls_ca()

    def info(self) -> dict[str, Any]:
        """Where the shard runs and what it holds (small metadata only), with its Ray node."""
        import ray
        return dict(self.host.info(), node_id=ray.get_runtime_context().get_node_id(), nice=self.nice)

    def stop(self, grace: float = 1.0) -> None:
        self.host.stop(grace)

    # The service directory (Ray only) -------------------------------------------------------
    def _directory(self):
        import ray
        try:
            return ray.get_actor(self.name, namespace=NAMESPACE)
        except ValueError:
            return None

    def _directory_address(self) -> str | None:
        peers = self._peers()
        return peers[self.replica] if self.replica < len(peers) else None

    def _peers(self) -> list[str]:
        """Every copy's address of this shard, as the directory has them now ([] without one)."""
        import ray
        d = self._directory()
        return list(ray.get(d.spec.remote()).replicas[self.index]) if d is not None else []

    def _announce(self) -> None:
        import ray
        d = self._directory()
        if d is not None:
            ray.get(d.set_address.remote(self.index, self.host.address(), self.replica))


class _RayMetrics:
    """Exports each request to Ray's metrics (Prometheus at the dashboard's metrics port):
    engram_requests{method,status}, engram_rows{method}, engram_request_seconds{method},
    engram_resident_bytes, tagged with the service and shard; and, at most every
    ``USAGE_EVERY_S`` (on a request's thread), what lookups read: engram_rows_touched and
    engram_table_utilisation{layer,order} (HyperLogLog estimates) and
    engram_reads_top_share{top="1%"|"10%"} (read skew)."""

    USAGE_EVERY_S = 5.0

    def __init__(self, service: str, shard: int, resident_bytes: int):
        from ray.util.metrics import Counter, Gauge, Histogram

        #: The servicer's RowUsage (set once the servicer exists; None: no usage gauges).
        self.usage: Any = None
        self._usage_at = 0.0
        self.touched = Gauge("engram_rows_touched", "distinct rows lookups read (estimate), per table",
                             tag_keys=("service", "shard", "layer", "order"))
        self.utilisation = Gauge("engram_table_utilisation", "share of a table's rows on this shard "
                                 "that lookups read (estimate)", tag_keys=("service", "shard", "layer", "order"))
        self.top_share = Gauge("engram_reads_top_share", "share of sampled reads that go to the most read "
                               "rows", tag_keys=("service", "shard", "top"))

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
        now = time.monotonic()
        if self.usage is not None and now - self._usage_at >= self.USAGE_EVERY_S:
            self._usage_at = now
            self.export_usage()

    def export_usage(self) -> None:
        """Set the usage gauges from the servicer's tracker now."""
        u = self.usage.report()
        for t in u["tables"]:
            tags = dict(self.tags, layer=str(t["layer"]), order=str(t["order"]))
            self.touched.set(t["touched"], tags)
            self.utilisation.set(t["utilisation"], tags)
        for top in ("1", "10"):
            share = u[f"top{top}pct_share"]
            if share is not None:
                self.top_share.set(share, dict(self.tags, top=f"{top}%"))
