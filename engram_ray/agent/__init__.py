"""The node-local lookup agent: one process per compute node owns the gRPC side of the
client; workers hand it ids and read rows through shared memory.

============  ==================================================================================
``protocol``  packets on a Unix SOCK_SEQPACKET socket; slots of sealed memfd shared memory
``server``    :class:`LookupAgent`: serves an :class:`~engram_ray.client.EngramClient`'s rows
``client``    :class:`AgentClient`: a worker's side (prefetch / push, as ``EngramClient``)
``process``   start an agent as a plain process (``engram-ray agent``), paths, and a supervisor
============  ==================================================================================

No Ray and no torch here: the agent runs as a plain process where there is no cluster, and
``engram_ray.runtime.agent`` wraps it in a Ray actor per node where there is one.
"""

from .client import AgentClient, AgentFetch
from .protocol import AgentRefused, AgentUnavailable
from .server import Limits, LookupAgent

__all__ = ["AgentClient", "AgentFetch", "AgentRefused", "AgentUnavailable", "Limits", "LookupAgent"]
