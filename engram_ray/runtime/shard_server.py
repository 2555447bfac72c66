"""``ShardServer``: the Ray actor that holds one shard in its node's RAM and serves it over
gRPC. Ray places and names it; rows never pass through Ray, only its address does."""

from __future__ import annotations

import logging
import os
from typing import Any

from ..config import StoreConfig
from ..core.layout import TableLayout
from ..rpc.server import DEFAULT_MAX_MESSAGE_BYTES, create_server
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
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 checkpoint: str | None = None, max_workers: int = 8):
        import ray

        lay = TableLayout.from_dict(layout)
        cfg = StoreConfig.from_dict(store)
        if checkpoint:
            self.shard = TableShard.load(checkpoint, lay, num_shards, shard_index, cfg)
        else:
            self.shard = TableShard.create(lay, num_shards, shard_index, cfg)
        host = host or ray.util.get_node_ip_address()
        self._server, port = create_server(self.shard, host, port, max_workers=max_workers,
                                           max_message_bytes=max_message_bytes)
        self._address = f"{host}:{port}"
        log.info("shard %d/%d rows [%d, %d) serving on %s", shard_index, num_shards,
                 self.shard.row_start, self.shard.row_stop, self._address)

    def address(self) -> str:
        return self._address

    def info(self) -> dict[str, Any]:
        """Where the shard runs and what it holds (small metadata only)."""
        import ray
        d = self.shard.describe()
        d.update(address=self._address, pid=os.getpid(),
                 node_id=ray.get_runtime_context().get_node_id())
        return d

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()
