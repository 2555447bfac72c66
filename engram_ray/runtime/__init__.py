"""Ray actors and the service lifecycle: the only package that imports ray."""

from .remote_memory import RemoteMemory
from .service import MemoryService, attach, deploy, ray_session

__all__ = ["MemoryService", "RemoteMemory", "attach", "deploy", "ray_session"]
