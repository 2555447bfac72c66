"""Moved to :mod:`engram_ray.remote_memory` (Ray-free, so a worker without a cluster uses it);
this name stays for old imports."""

from ..remote_memory import RemoteFetch, RemoteMemory, RowSource, expand_rows

__all__ = ["RemoteMemory", "RemoteFetch", "RowSource", "expand_rows"]
