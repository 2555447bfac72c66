"""Plain ``nn.Module``s: attention, MoE, hyper-connections, the Engram layer and the language
model, plus the memory interface. Nothing here knows of Ray or gRPC."""

from .attention import KVCache
from .engram import EngramLayer
from .memory import LocalMemory, Memory, MemoryFetch
from .transformer import EngramLM

__all__ = ["EngramLM", "EngramLayer", "KVCache", "LocalMemory", "Memory", "MemoryFetch"]
