"""engram_ray: DeepSeek's Engram conditional memory, with its tables served from the host RAM
of memory nodes by Ray actors over gRPC.

Layers (imports only point down): ``config`` -> ``core`` (numpy) -> ``store`` -> ``rpc`` ->
``client`` -> ``runtime`` (ray); ``model`` (torch) sits beside ``rpc``/``client`` on ``core``.
"""

__version__ = "0.1.0"
