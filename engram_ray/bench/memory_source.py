"""Where ``bench offload``'s remote modes get their memory: the seam.

Two sources of shards:

* :class:`DeployedShards`: a memory service deployed on a local (or connected) Ray for the run
  and shut down after it -- today's default;
* :class:`RunningShards`: shards that already run (``--memory-at HOST:PORT,...``), e.g. started
  as plain processes by ``engram-ray shard`` on a GPU box without Ray. No Ray is imported.

and two ways to reach them (``--via``): ``client``, an :class:`~engram_ray.client.EngramClient`
in the model's process; ``agent``, the node-local lookup agent (the model's process hands it
ids and reads rows from shared memory). :func:`memory_client` is the one place that picks; the
modes build their :class:`RemoteMemory` on what it returns.

Nothing here imports ray at module import time: the bench must run where Ray is absent.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..client.cache import DEFAULT_POLICY
from ..config import EngramConfig, ServiceConfig, StoreConfig
from ..rpc.wire import read_token_file

__all__ = ["DeployedShards", "RunningShards", "memory_client", "remote_memory", "parse_addresses"]

VIAS = ("client", "agent")


def parse_addresses(text: str) -> list[str]:
    """``"h1:p1,h2:p2"`` -> one address per shard, in shard order; refuses a missing port."""
    out = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in out if not a.rpartition(":")[2].isdigit()]
    if not out or bad:
        raise ValueError(f"--memory-at {text!r}: expected HOST:PORT[,HOST:PORT...] (one per shard, "
                         f"in shard order){'; bad: ' + ', '.join(bad) if bad else ''}")
    return out


class DeployedShards:
    """A memory service on Ray for the length of the run (``with``: deploy ... shutdown)."""

    kind = "ray"

    def __init__(self, config: EngramConfig, vocab: Any, *, shards: int, store: StoreConfig,
                 max_resident_gib: float | None, name: str = "bench-offload",
                 service: ServiceConfig = ServiceConfig()):
        self.config, self.vocab, self.shards, self.store = config, vocab, shards, store
        self.service = service
        self.max_resident_gib, self.name = max_resident_gib, name
        self._stack = contextlib.ExitStack()
        self.svc: Any = None

    def __enter__(self) -> DeployedShards:
        from ..runtime import deploy, ray_session  # Ray only on this path
        self._stack.enter_context(ray_session())
        try:
            self.svc = deploy(self.config, vocab=self.vocab, num_shards=self.shards, store=self.store,
                              name=self.name, max_resident_gib=self.max_resident_gib, service=self.service)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.svc is not None:
                self.svc.shutdown()
        finally:
            self._stack.close()

    @property
    def layout(self) -> Any:
        return self.svc.layout

    def client(self) -> Any:
        return self.svc.client()

    def agent_client(self, cache_bytes: int = 0, cache_policy: str = DEFAULT_POLICY, **kwargs: Any) -> Any:
        """``kwargs``: the worker's AgentClient's (e.g. ``spin_s``)."""
        return self.svc.agent_client(cache_bytes=cache_bytes, cache_policy=cache_policy, **kwargs)

    def describe(self) -> list[dict[str, Any]]:
        return self.svc.describe()


class RunningShards:
    """Shards that already serve at ``addresses`` (one per shard, in order), reached with
    ``token`` (read from ``token_file``); the layout is ours, checked by every shard."""

    kind = "running"

    def __init__(self, addresses: list[str], layout: Any, *, token_file: str | None = None):
        self.addresses, self._layout, self.token_file = addresses, layout, token_file
        self.token = read_token_file(token_file) if token_file else None
        self._agent: Any = None  # the plain-process lookup agent, once --via agent asks for it

    def __enter__(self) -> RunningShards:
        # fails here, clearly, if a shard is down or serves another table; closed at once: an
        # idle client's asyncio loop and gRPC poller would sit in the model's process all run
        self.client().close()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._agent is not None:
            self._agent.terminate()
            try:
                self._agent.wait(10)
            except Exception:  # noqa: BLE001 - it had its chance to stop
                self._agent.kill()

    @property
    def layout(self) -> Any:
        return self._layout

    def client(self) -> Any:
        from ..client import EngramClient
        return EngramClient(self.addresses, self._layout, token=self.token)

    def agent_client(self, cache_bytes: int = 0, cache_policy: str = DEFAULT_POLICY, **kwargs: Any) -> Any:
        """A worker's client of a lookup agent for these shards (with a hot-row cache of
        ``cache_bytes``): a plain process started now (it inherits this process's cores: the
        memory side's, when isolated). ``kwargs``: the AgentClient's (e.g. ``spin_s``)."""
        import os

        from ..agent import AgentClient
        from ..agent.process import default_socket_path, spawn
        path = default_socket_path(f"bench-{os.getpid()}")

        def start() -> None:  # when no agent answers: the first connect, or after one died
            if self._agent is not None and self._agent.poll() is None:
                return  # still coming up
            self._agent = spawn(path, self.addresses, self._layout, token_file=self.token_file,
                                cache_gib=cache_bytes / 2**30, cache_policy=cache_policy)
        return AgentClient(path, self._layout, start=start, **kwargs)

    def describe(self) -> list[dict[str, Any]]:
        with self.client() as c:
            return c.describe()


def memory_client(source: Any, via: str, cache_bytes: int = 0, cache_policy: str = DEFAULT_POLICY,
                  spin_s: float | None = None) -> Any:
    """The seam: what the remote modes read rows through (``via``: client or agent), with a
    hot-row cache of ``cache_bytes`` in the agent (0: none; the agent's only); ``spin_s``: how
    long the worker polls for rows before it sleeps (the agent's client; None: its default)."""
    if via not in VIAS:
        raise ValueError(f"--via {via!r}: choose one of {', '.join(VIAS)}")
    if cache_bytes and via != "agent":
        raise ValueError("--cache-gib: the hot-row cache lives in the lookup agent; use --via agent")
    if via == "client":
        return source.client()
    return source.agent_client(cache_bytes, cache_policy, **({} if spin_s is None else {"spin_s": spin_s}))


def remote_memory(client: Any, *, device: torch.device, dtype: torch.dtype, prefetch: bool) -> Any:
    """A :class:`RemoteMemory` on ``client`` (prefetch: every layer's rows issued at once)."""
    from ..remote_memory import RemoteMemory  # Ray-free: takes an EngramClient or an AgentClient
    return RemoteMemory(client, device=device, dtype=dtype, prefetch=prefetch)
