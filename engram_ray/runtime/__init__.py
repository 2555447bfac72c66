"""Ray actors and the service lifecycle: the only package that imports ray."""

from .remote_memory import RemoteMemory
from .service import MemoryService, attach, deploy, ray_session
from .worker import BackboneWorker, start_worker

__all__ = ["BackboneWorker", "MemoryService", "RemoteMemory", "attach", "deploy", "ray_session",
           "start_worker"]
