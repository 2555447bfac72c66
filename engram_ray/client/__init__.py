"""The client of a memory service: :class:`EngramClient` and its parts.

=================  ===============================================================================
``engram_client``  :class:`EngramClient`, the facade: checks input, hands work to the I/O thread
``plan``           pure numpy: dedup, split ids by shard and message size, scatter rows back
``replicas``       :class:`ReplicaSet`: each shard's copies, channels, which copy reads / takes pushes
``calls``          :class:`ShardCalls`: one RPC with failover, redirects, retries; errors as ours
``transfers``      lookups and pushes on the I/O thread, and :class:`Prefetch`
``shards``         :class:`ShardInfo`: what shards say about themselves, checked at connect
``stats``          counters and latencies
``iothread``       the client's own asyncio loop on a thread
=================  ===============================================================================

The client imports the wire (``engram_ray.rpc.codec``, ``.wire``, generated code), never the
server side (servicer, store, grpc_health).
"""

from .engram_client import EngramClient
from .shards import ShardInfo
from .transfers import Prefetch, UniqueRows

__all__ = ["EngramClient", "Prefetch", "ShardInfo", "UniqueRows"]
