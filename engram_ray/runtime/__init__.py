"""Ray actors and the service lifecycle: the only package that imports ray.

The worker side (``BackboneWorker``, ``RemoteMemory``: torch; the per-node lookup agent) is
imported on first use, so a memory node's shard processes never load torch. ``RemoteMemory``
itself lives in :mod:`engram_ray.remote_memory` (no Ray); the name here is an alias.
"""

from __future__ import annotations

import importlib
from typing import Any

from .service import MemoryService, attach, deploy, init_ray, ray_session
from .spec import ServiceSpec

__all__ = ["BackboneWorker", "MemoryService", "RemoteMemory", "ServiceSpec", "WorkerHandle", "agent_client", "attach",
           "deploy", "init_ray", "ray_session", "start_agent", "start_worker"]

_LAZY = {"BackboneWorker": ".worker", "WorkerHandle": ".worker", "start_worker": ".worker",
         "RemoteMemory": ".remote_memory", "agent_client": ".agent", "start_agent": ".agent"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
