"""The gRPC face of a :class:`~engram_ray.store.TableShard`: codecs, servicer, server, and
:mod:`.wire`, what a shard and its clients agree on beside the proto.

Importing this package loads no server: a client imports :mod:`.codec`, :mod:`.wire` and the
generated code, never the servicer, the store or grpc_health. ``create_server`` and
``SERVICE_NAME`` load :mod:`.server` when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import SERVICE_NAME, create_server

__all__ = ["create_server", "SERVICE_NAME"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import server
        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
