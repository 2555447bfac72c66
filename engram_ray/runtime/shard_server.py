"""``ShardServer``: the Ray actor that holds one shard in its node's RAM and serves it over
gRPC. Ray places and names it; rows never pass through Ray, only its address does."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..config import ServiceConfig, StoreConfig
from ..core.layout import TableLayout
from ..rpc.server import create_server
from ..store import TableShard

__all__ = ["ShardServer"]

log = logging.getLogger(__name__)


class ShardServer:
    """Builds (or loads) its :class:`TableShard` and starts a gRPC server for it.

    A plain class, made remote by :func:`engram_ray.runtime.deploy` with the placement and
    name it needs.
    """

    def __init__(self, layout: dict[str, Any], num_shards: int, shard_index: int,
                 store: dict[str, Any], *, host: str | None = None, port: int = 0,
                 service: dict[str, Any] | None = None, token: str | None = None,
                 checkpoint: str | None = None):
        import ray

        lay = TableLayout.from_dict(layout)
        cfg = StoreConfig.from_dict(store)
        self.service = svc = ServiceConfig.from_dict(service or {})
        if checkpoint:
            self.shard = TableShard.load(checkpoint, lay, num_shards, shard_index, cfg)
        else:
            self.shard = TableShard.create(lay, num_shards, shard_index, cfg)
        host = host or ray.util.get_node_ip_address()
        tls = None
        if svc.tls_cert:  # read here: the paths are on this node
            tls = (Path(svc.tls_cert).read_bytes(), Path(svc.tls_key).read_bytes())
        self._server, port = create_server(
            self.shard, host, port, max_workers=svc.max_workers, max_message_bytes=svc.max_message_bytes,
            max_ids_per_request=svc.max_ids_per_request, max_concurrent_rpcs=svc.max_concurrent_rpcs,
            token=token, tls=tls)
        self._address = f"{host}:{port}"
        log.info("shard %d/%d rows [%d, %d) serving on %s", shard_index, num_shards,
                 self.shard.row_start, self.shard.row_stop, self._address)

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
        d.update(address=self._address, pid=os.getpid(),
                 node_id=ray.get_runtime_context().get_node_id())
        return d

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()
