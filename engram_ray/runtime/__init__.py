"""Ray actors and the service lifecycle: the only package that imports ray."""

from .service import MemoryService, attach, deploy, ray_session

__all__ = ["MemoryService", "attach", "deploy", "ray_session"]
