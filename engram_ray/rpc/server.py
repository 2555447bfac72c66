"""``create_server``: a started, non-blocking gRPC server for one shard."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..store import TableShard
from .generated import engram_pb2_grpc as pb_grpc
from .auth import TokenAuth
from .servicer import ShardServicer

__all__ = ["create_server", "SERVICE_NAME", "DEFAULT_MAX_MESSAGE_BYTES"]

SERVICE_NAME = "engram.v1.EngramMemory"
#: 64 MiB: a 4096-token batch of the paper layout (2 layers x 16 heads x 80 x bf16) is 21 MB.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def create_server(shard: TableShard, host: str = "127.0.0.1", port: int = 0, *,
                  max_workers: int = 8, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                  max_ids_per_request: int = 1 << 20, max_concurrent_rpcs: int | None = None,
                  token: str | None = None, tls: tuple[bytes, bytes] | None = None,
                  servicer: ShardServicer | None = None) -> tuple[grpc.Server, int]:
    """Serve ``shard`` on ``host:port`` (port 0 picks a free one); returns ``(server, port)``.

    The server is started and does not block; stop it with ``server.stop(grace)``. Limits:
    messages above ``max_message_bytes`` are refused with RESOURCE_EXHAUSTED by gRPC itself
    (requests) or by the servicer (responses, with a message that says how to split), as are
    requests of more than ``max_ids_per_request`` ids and calls beyond ``max_concurrent_rpcs``
    at once. ``token``: every EngramMemory call must carry it (UNAUTHENTICATED otherwise).
    ``tls``: ``(certificate chain PEM, private key PEM)``; without it the port is plaintext.
    ``servicer``: a prepared :class:`ShardServicer` (e.g. with an observer) for ``shard``.
    """
    opts = [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0)]
    if servicer is None:
        servicer = ShardServicer(shard, max_message_bytes, max_ids_per_request=max_ids_per_request)
    interceptors = [TokenAuth(token, servicer.count_rejected)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix=f"shard{shard.shard_index}"),
                         options=opts, interceptors=interceptors,
                         maximum_concurrent_rpcs=max_concurrent_rpcs)
    pb_grpc.add_EngramMemoryServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
        bound = server.add_secure_port(f"{host}:{port}", creds)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind a gRPC server on {host}:{port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
