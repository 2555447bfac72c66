"""The gRPC face of a :class:`~engram_ray.store.TableShard`: codecs, servicer, server."""

from .server import SERVICE_NAME, create_server

__all__ = ["create_server", "SERVICE_NAME"]
