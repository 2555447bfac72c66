"""The lookup agent on a Ray cluster: one :class:`NodeAgent` actor per (service, node), placed
on its node by node affinity and found by name (``"<service>/agent/<node id>"``). A worker that
finds none starts one; Ray restarts one whose process dies, and workers re-attach on their
next fetch (:class:`~engram_ray.agent.AgentClient` calls back here when no agent answers)."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..agent import AgentClient, LookupAgent
from ..agent.process import default_socket_path
from ..client.cache import DEFAULT_POLICY
from .priority import serve_at_normal_priority
from .spec import NAMESPACE

__all__ = ["NodeAgent", "agent_name", "start_agent", "agent_client"]

log = logging.getLogger(__name__)


def agent_name(service: str, node_id: str) -> str:
    return f"{service}/agent/{node_id}"


class NodeAgent:
    """A :class:`LookupAgent` serving service ``service_name``'s rows to this node's workers,
    with an ``EngramClient`` that follows shard restarts through the service's directory and
    keeps the node's hottest rows in ``cache_bytes`` (0: no cache)."""

    def __init__(self, service_name: str, cache_bytes: int = 0, cache_policy: str = DEFAULT_POLICY):
        from .service import attach

        #: This process's niceness: Ray's workers start at 15, the agent serves at 0 where allowed.
        self.nice = serve_at_normal_priority()
        svc = attach(service_name, address=None)
        node = ray.get_runtime_context().get_node_id()
        self.path = default_socket_path(f"{service_name}-{node[:16]}")
        self.client = svc.client(cache_bytes=cache_bytes, cache_policy=cache_policy)
        self.agent = LookupAgent(self.client, self.path).start()
        log.info("lookup agent of %s on node %s: %s", service_name, node, self.path)
        if cache_bytes:
            threading.Thread(target=self._export_cache, args=(service_name, node), daemon=True,
                             name="engram-agent-metrics").start()

    def _export_cache(self, service: str, node: str, every_s: float = 5.0) -> None:
        """The row cache's figures to Ray's metrics (Prometheus) every ``every_s``:
        engram_cache_hit_rate, engram_cache_fill, engram_cache_rows, and the running totals
        engram_cache_hits / _misses / _evictions / _bytes_saved, tagged with service and node."""
        from ray.util.metrics import Gauge

        tags = {"service": service, "node": node[:16]}
        names = {"hit_rate": "share of looked-up unique rows served from the node's cache",
                 "fill": "share of the cache's rows in use", "rows": "rows held in the cache",
                 "hits": "unique rows served from the cache", "misses": "unique rows fetched from shards",
                 "evictions": "rows evicted from the cache", "bytes_saved": "bytes not fetched over gRPC"}
        gauges = {k: Gauge(f"engram_cache_{k}", doc, tag_keys=tuple(tags)) for k, doc in names.items()}
        while True:
            try:
                st = self.client.stats()
                c = dict(st["cache"] or {}, bytes_saved=st.get("bytes_saved", 0))
                for k, g in gauges.items():
                    if c.get(k) is not None:
                        g.set(float(c[k]), tags)
            except Exception:  # noqa: BLE001 - metrics must never take the agent down
                log.debug("exporting the cache's metrics failed", exc_info=True)
            time.sleep(every_s)

    def socket_path(self) -> str:
        return self.path

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "nice": self.nice, "socket": self.path, "connections": self.agent.connections,
                "refused": self.agent.refused, "client": self.client.stats()}


def start_agent(service_name: str, node_id: str | None = None, *, cache_bytes: int = 0,
                cache_policy: str = DEFAULT_POLICY) -> Any:
    """The agent actor of ``service_name`` on ``node_id`` (default: this process's node),
    started if there is none (with a hot-row cache of ``cache_bytes``: the first starter's
    settings hold for the node); returns its handle once it serves."""
    node = node_id or ray.get_runtime_context().get_node_id()
    name = agent_name(service_name, node)
    actor: Any
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        # get_if_exists: two workers racing to start it get the same actor
        actor = ray.remote(NodeAgent).options(
            name=name, namespace=NAMESPACE, get_if_exists=True, max_restarts=-1, num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                service_name, cache_bytes, cache_policy)
    ray.get(actor.socket_path.remote())  # surfaces a failed constructor here
    return actor


def agent_client(service: Any, *, cache_bytes: int = 0, cache_policy: str = DEFAULT_POLICY,
                 **kwargs: Any) -> AgentClient:
    """An :class:`AgentClient` on this node's agent of ``service`` (a ``MemoryService``),
    starting the agent if needed (``cache_bytes``, ``cache_policy``: its hot-row cache); when
    the agent dies, the client's next call waits for Ray to restart it (or starts a new one,
    if it is gone for good)."""
    actor = start_agent(service.name, cache_bytes=cache_bytes, cache_policy=cache_policy)
    path = ray.get(actor.socket_path.remote())

    def restart() -> None:
        try:
            ray.get(actor.socket_path.remote(), timeout=60)  # Ray restarts a dead one
        except Exception:  # noqa: BLE001 - gone for good (e.g. its owner died): start another
            start_agent(service.name, cache_bytes=cache_bytes, cache_policy=cache_policy)
    return AgentClient(path, service.layout, start=restart, **kwargs)
