"""``create_server``: a started, non-blocking gRPC server for one shard."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc

from ..store import TableShard
from .auth import CallGate
from .generated import engram_pb2_grpc as pb_grpc
from .peer import PeerServicer
from .servicer import ShardServicer
from .wire import DEFAULT_MAX_IDS_PER_REQUEST, DEFAULT_MAX_LOOKUP_STREAMS, DEFAULT_MAX_MESSAGE_BYTES

__all__ = ["create_server", "SERVICE_NAME", "DEFAULT_MAX_MESSAGE_BYTES"]

SERVICE_NAME = "engram.v1.EngramMemory"
#: Threads that answer health checks and refuse calls without reading them (microseconds each).
OPEN_THREADS = 2
#: Threads for calls between the copies of a shard (forwards, snapshot streams).
PEER_THREADS = 4


def create_server(shard: TableShard, host: str = "127.0.0.1", port: int = 0, *,
                  max_workers: int = 8, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                  max_ids_per_request: int = DEFAULT_MAX_IDS_PER_REQUEST, max_concurrent_rpcs: int | None = None,
                  max_lookup_streams: int = DEFAULT_MAX_LOOKUP_STREAMS,
                  token: str | None = None, peer_token: str | None = None,
                  tls: tuple[bytes, bytes] | None = None, save_root: str = "",
                  servicer: ShardServicer | None = None) -> tuple[grpc.Server, int]:
    """Serve ``shard`` on ``host:port`` (port 0 picks a free one); returns ``(server, port)``.

    The server is started and does not block; stop it with ``server.stop(grace)``. Limits:
    messages above ``max_message_bytes`` are refused with RESOURCE_EXHAUSTED by gRPC itself
    (requests) or by the servicer (responses, with a message that says how to split), as are
    requests of more than ``max_ids_per_request`` ids and authenticated calls beyond
    ``max_concurrent_rpcs`` at once, and lookup streams beyond ``max_lookup_streams`` (each on
    a thread of its own; 0: none). ``token``: every EngramMemory call must carry it
    (UNAUTHENTICATED otherwise); ``peer_token``: the credential of the shard's other copies,
    the only one EngramPeer accepts (None: EngramPeer refuses every call). Both are checked
    before a request's body is read (:class:`~.auth.CallGate`). ``tls``: ``(certificate chain
    PEM, private key PEM)``; without it the port is plaintext. ``save_root``: where Save may
    write portable checkpoints. ``servicer``: a prepared :class:`ShardServicer` for ``shard``.
    """
    # A fixed 1 MiB receive window per stream instead of gRPC's BDP probing, which grows the
    # windows to many MiB: what a call may send before the shard reads (or refuses) it is what
    # the shard buffers. Measured here (tests/rpc/test_gate.py: 48 unauthenticated 8 MiB
    # bodies at once) the shard grew by up to 105 MiB with BDP probing, 8 MiB without, while a
    # 25.6 MB push ran at the same 0.22-0.25 GB/s either way (interleaved runs, loopback).
    opts = [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1 << 20),
            ("grpc.so_reuseport", 0)]
    if servicer is None:
        servicer = ShardServicer(shard, max_message_bytes, max_ids_per_request=max_ids_per_request,
                                 save_root=save_root)
    tag = f"shard{shard.shard_index}"
    open_pool = futures.ThreadPoolExecutor(OPEN_THREADS, thread_name_prefix=f"{tag}-open")
    peer_pool = futures.ThreadPoolExecutor(PEER_THREADS, thread_name_prefix=f"{tag}-peer")
    stream_pool = (futures.ThreadPoolExecutor(max_lookup_streams, thread_name_prefix=f"{tag}-stream")
                   if max_lookup_streams > 0 else None)
    gate = CallGate(token=token, peer_token=peer_token, max_concurrent=max_concurrent_rpcs,
                    open_pool=open_pool, peer_pool=peer_pool, serving=lambda: servicer.serving,
                    on_reject=servicer.count_rejected, stream_pool=stream_pool, max_streams=max_lookup_streams)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=tag),
                         options=opts, interceptors=[gate])
    pb_grpc.add_EngramMemoryServicer_to_server(servicer, server)
    pb_grpc.add_EngramPeerServicer_to_server(PeerServicer(servicer), server)
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
        bound = server.add_secure_port(f"{host}:{port}", creds)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind a gRPC server on {host}:{port}")
    # stop() counts an open stream as a call in flight: a lookup agent keeps one open, so every
    # stop would last its whole grace. Open streams are cancelled first (their clients fall back
    # to Lookup), then the server stops as before.
    grpc_stop = server.stop

    def stop(grace: float | None) -> threading.Event:
        gate.end_streams()
        return grpc_stop(grace)
    setattr(server, "stop", stop)  # noqa: B010 - this one server's stop, not grpc's class
    server.start()
    return server, bound
