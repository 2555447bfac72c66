"""Deploy, attach to and shut down a memory service on a Ray cluster.

``deploy`` reads as its steps: **plan** (the table's layout and the :class:`ServiceSpec`),
**reserve** (memory-node capacity for every shard copy, :mod:`.placement`), **start** (one
:class:`ShardServer` actor per copy), **wire** (their gRPC addresses, each copy's peers) and
**register** (the spec in a small directory actor named after the service). ``attach(name)``
reads that spec back from any process or job on the cluster, so GPU workers and user
scripts share one service. Only metadata passes through Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray

from ..client import EngramClient
from ..config import EngramConfig, ServiceConfig, StoreConfig
from ..core.layout import ShardPlan, TableLayout
from ..core.plan import resident_rows_per_shard, shard_gib
from .placement import MEMORY_GIB_RESOURCE, MEMORY_RESOURCE, Placement, release, reserve
from .processes import wait_gone
from .shard_server import ShardServer
from .spec import NAMESPACE, ServiceSpec, copy_name

__all__ = ["MemoryService", "deploy", "attach", "init_ray", "ray_session", "NAMESPACE", "MEMORY_RESOURCE",
           "MEMORY_GIB_RESOURCE", "ServiceSpec", "shard_gib"]

log = logging.getLogger(__name__)


class ServiceDirectory:
    """Named actor that remembers a service: its :class:`ServiceSpec` (kept current as
    restarted copies announce new addresses) and the placement groups that reserve it."""

    def __init__(self, spec: ServiceSpec, placement_groups: list[Any]):
        self._spec, self._groups = spec, list(placement_groups)

    def spec(self) -> ServiceSpec:
        return self._spec

    def placement_groups(self) -> list[Any]:
        return list(self._groups)

    def set_address(self, index: int, address: str, replica: int = 0) -> None:
        """A restarted shard copy announces where it serves now."""
        self._spec = self._spec.with_address(index, replica, address)


@dataclass
class MemoryService:
    """Handle on a running memory service (cheap to pass around: metadata only)."""

    name: str
    layout: TableLayout
    store: StoreConfig
    addresses: list[str]
    shard_names: list[str] = field(default_factory=list)
    #: Actor handles: a non-detached named actor lives only while a handle to it does.
    handles: list[Any] = field(default_factory=list, repr=False, compare=False)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    #: The shards' secret (None without auth); anyone who can reach the Ray cluster can
    #: attach and read it: the cluster is the trust boundary, the token keeps others out.
    token: str | None = field(default=None, repr=False)
    #: PEM of the CA the clients trust, for a TLS service.
    tls_ca: bytes | None = field(default=None, repr=False)
    #: Per shard, the addresses of its copies (``addresses`` holds replica 0's).
    replicas: list[list[str]] = field(default_factory=list)

    @classmethod
    def from_spec(cls, spec: ServiceSpec, handles: list[Any]) -> MemoryService:
        return cls(spec.name, spec.layout, spec.store, spec.addresses, spec.copy_names, handles=list(handles),
                   service=spec.service, token=spec.token, tls_ca=spec.tls_ca,
                   replicas=[list(row) for row in spec.replicas])

    @property
    def num_shards(self) -> int:
        return len(self.addresses)

    def client(self, **kwargs: Any) -> EngramClient:
        """A new :class:`EngramClient` on this service (``timeout``, ``retries``, ...), with
        its token and TLS settings."""
        kwargs.setdefault("max_message_bytes", self.service.max_message_bytes)
        kwargs.setdefault("resolver", self._resolve)
        return EngramClient(self.replicas or self.addresses, self.layout, token=self.token,
                            tls_ca=self.tls_ca, **kwargs)

    def agent_client(self, **kwargs: Any) -> Any:
        """An :class:`~engram_ray.agent.AgentClient` on this node's lookup agent (started if
        none serves this service here): how workers read rows without gRPC in their process."""
        from .agent import agent_client
        return agent_client(self, **kwargs)

    def _resolve(self) -> list[list[str]]:
        """The shard copies' addresses now (a restarted copy may serve elsewhere): asked of the
        service's directory actor, so clients follow restarts without user action."""
        spec = ray.get(_directory(self.name).spec.remote())
        self.addresses, self.replicas = spec.addresses, [list(row) for row in spec.replicas]
        return self.replicas

    def _copy(self, shard: int, replica: int) -> Any:
        return ray.get_actor(copy_name(self.name, shard, replica), namespace=NAMESPACE)

    def shard_info(self, shard: int, replica: int = 0, timeout: float = 120.0) -> dict[str, Any]:
        """Where a shard copy runs and what it holds (pid, node, address, where its rows came
        from), waiting up to ``timeout`` seconds while it restarts."""
        deadline = time.time() + timeout
        while True:
            try:
                return ray.get(self._copy(shard, replica).info.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - unavailable while restarting
                if time.time() > deadline:
                    raise
                time.sleep(0.02)

    def kill_shard(self, shard: int, replica: int = 0, timeout: float = 30.0) -> int:
        """Kill a shard copy's process, as a crash would (Ray restarts it); returns once the
        process is gone, with its pid. For drills and tests of recovery.

        "Gone" is seen on the copy's own node (:func:`.processes.wait_gone`): a pid means
        nothing on another machine, and the copy may run on any memory node."""
        info = self.shard_info(shard, replica)
        ray.kill(self._copy(shard, replica), no_restart=False)
        if not wait_gone(info["node_id"], info["pid"], timeout):
            raise TimeoutError(f"shard {shard} copy {replica} (pid {info['pid']}) still alive after {timeout} s")
        return info["pid"]

    def recover(self, shard: int, replica: int = 0, source: str = "init") -> dict[str, Any]:
        """Operator's override for a shard copy that refuses to serve because none of its
        recovery checkpoints loads: serve ``source`` ("init": the initial rows, or a checkpoint
        directory on its node) from now on. Returns the copy's :meth:`shard_info`."""
        return ray.get(self._copy(shard, replica).recover.remote(source))

    def checkpoint(self) -> list[str]:
        """Every shard writes a recovery checkpoint now (needs ``checkpoint_dir``); returns
        their directories once written. What it covers: every update acknowledged before."""
        with self.client() as c:
            return c.save("")

    def describe(self) -> list[dict[str, Any]]:
        """Every shard's Describe (counters, rows, bytes), over gRPC."""
        with self.client() as c:
            return c.describe()

    def save(self, directory: str) -> list[str]:
        """Checkpoint every shard into ``directory`` (a path every memory node can write)."""
        with self.client() as c:
            return c.save(directory)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the shards' servers and remove every actor of the service; returns once the
        actors are gone (their resources free for the next deploy)."""
        shards, directory = _live(self.shard_names), _live([self.name])
        groups = []
        if directory:
            try:
                groups = ray.get(directory[0].placement_groups.remote(), timeout=timeout)
            except Exception as e:  # noqa: BLE001
                log.warning("service %s: reading its directory: %s", self.name, e)
        try:
            ray.get([h.stop.remote() for h in shards], timeout=timeout)
        except Exception as e:  # noqa: BLE001 - a dead shard must not stop the shutdown
            log.warning("service %s: stopping shards: %s", self.name, e)
        handles = shards + directory
        for h in handles:
            ray.kill(h)
        # A call to a killed actor fails once it is dead: wait for all of them at once.
        pings = [h.__ray_ready__.remote() for h in handles]
        ray.wait(pings, num_returns=len(pings), timeout=timeout)
        release(groups)  # frees the shards' memory-node reservations
        self.handles.clear()


def _live(names: list[str]) -> list[Any]:
    """Handles of the named actors that still exist."""
    out = []
    for n in names:
        try:
            out.append(ray.get_actor(n, namespace=NAMESPACE))
        except ValueError:  # already gone
            pass
    return out


def _directory(name: str) -> Any:
    return ray.get_actor(name, namespace=NAMESPACE)


#: How Ray says a local start timed out: the raylet never registered, or the GCS server never
#: wrote its port file (seen once in a CI run of the suite on 2 cores).
_START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """``ray.init`` in this project's namespace, quiet; a local start that fails is retried once.

    Why the retry: on a loaded machine a freshly started local raylet now and then exits before
    registering (it was seen once in ~20 runs of the test suite, with no raylet log at all), or
    the GCS server does not write its port file in time, and Ray then gives up. A second start
    in a fresh session succeeds.
    """
    opts: dict[str, Any] = dict(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
                                configure_logging=False)
    opts.update(kwargs)
    try:
        ray.init(address=address, **opts)
    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
        if address is not None or not any(m in str(e) for m in _START_TIMEOUTS):
            raise
        log.warning("local Ray did not start (%s); starting it once more", e)
        ray.shutdown()
        ray.init(address=None, **opts)


def _ensure_ray(address: str | None) -> None:
    if not ray.is_initialized():
        init_ray(address)


@contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Use the connected Ray, or connect (``address``) / start a local one for the block;
    only a Ray started here is shut down at the end."""
    started = not ray.is_initialized()
    _ensure_ray(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _service_exists(name: str) -> bool:
    return bool(_live([name]))


# deploy: plan -> reserve -> start -> wire -> register ----------------------------------------

def _plan(config: EngramConfig, vocab: Any, num_shards: int, store: StoreConfig, name: str,
          service: ServiceConfig, replicas: int | None, max_resident_gib: float | None) -> ServiceSpec:
    """The service to start, checked before anything is reserved: its layout, the resident
    cap turned into rows per shard, its copies, a fresh client token (with auth). No
    addresses yet."""
    if vocab is None:
        from ..data import default_vocab
        vocab = default_vocab()
    layout = TableLayout.build(config, vocab)
    ShardPlan(layout.total_rows, num_shards)  # validates num_shards early, with its message
    if max_resident_gib is not None:
        cap = resident_rows_per_shard(layout, store.dtype, num_shards, max_resident_gib)
        if cap:
            store = dataclasses.replace(store, resident_rows_per_shard=cap)
            log.info("service %s: %d of %d rows resident (%.2f GiB cap)", name, cap * num_shards,
                     layout.total_rows, max_resident_gib)
    if _service_exists(name):
        raise ValueError(f"a memory service named {name!r} is already running; attach({name!r}) "
                         "to use it, or shut it down first")
    if replicas is not None:
        service = dataclasses.replace(service, replicas=replicas)
    token = secrets.token_urlsafe(32) if service.auth else None
    return ServiceSpec(name, layout, store, service, num_shards, token=token)


def _bind_host(host: str | None) -> str | None:
    """The address shards bind to: as given; loopback on a one-node (local) Ray; else None,
    each memory node's own address."""
    if host is None and len([n for n in ray.nodes() if n.get("Alive")]) == 1:
        return "127.0.0.1"
    return host


@dataclass
class _Started:
    """The shard copies of a deploy in progress (``actors[i][r]``) and their reservation."""

    placement: Placement
    actors: list[list[Any]] = field(default_factory=list)
    undone: bool = False

    @property
    def flat(self) -> list[Any]:
        return [a for row in self.actors for a in row]

    def undo(self) -> None:
        """Kill every copy and free the reservation: a failed deploy leaves nothing behind."""
        if not self.undone:
            self.undone = True
            for a in self.flat:
                ray.kill(a)
            self.placement.release()


def _start(spec: ServiceSpec, started: _Started, *, host: str | None, detached: bool,
           checkpoint: str | None, peer_token: str) -> None:
    """One :class:`ShardServer` actor per copy, in its reserved bundle, under its name, into
    ``started``. The peer token goes to the copies here and nowhere else."""
    # Shards are packed by memory, not CPU: without num_cpus=0, Ray would hold a CPU per
    # shard once custom resources are named, and a 2-CPU memory node would take 2 shards.
    opts: dict[str, Any] = {"namespace": NAMESPACE, "max_concurrency": 4, "num_cpus": 0,
                            "max_restarts": spec.service.max_restarts}  # a dead shard comes back (and reloads)
    if detached:
        opts["lifetime"] = "detached"
    remote = ray.remote(ShardServer)
    for i in range(spec.num_shards):
        started.actors.append([])
        for r in range(spec.copies):
            started.actors[i].append(remote.options(name=spec.copy_name(i, r), **opts,
                                                    **started.placement.options(i, r)).remote(
                spec, i, r, host=host, peer_token=peer_token, checkpoint=checkpoint))


def _wire(spec: ServiceSpec, started: _Started, timeout: float) -> ServiceSpec:
    """Wait for every copy's address; with copies, tell each its peers (replica 0 starts as
    the primary). Returns ``spec`` with the addresses and, for TLS, the CA clients trust."""
    flat = started.flat
    refs = [a.address.remote() for a in flat]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        started.undo()
        raise TimeoutError(
            f"{len(pending)} of {len(refs)} shard copies of {spec.name!r} did not start within {timeout:.0f} s "
            f"(up to {shard_gib(spec.layout, spec.store, spec.num_shards)} GiB of rows and optimiser state each). "
            f"Cluster now: {ray.available_resources()}")
    got = iter(ray.get(refs))
    replicas = [[next(got) for _ in range(spec.copies)] for _ in range(spec.num_shards)]
    if spec.copies > 1:
        ray.get([a.set_peers.remote(replicas[i]) for i, row in enumerate(started.actors) for a in row])
    tls_ca = ray.get(flat[0].tls_ca.remote()) if spec.service.tls_cert else None
    return dataclasses.replace(spec.with_replicas(replicas), tls_ca=tls_ca)


def _register(spec: ServiceSpec, placement: Placement, *, detached: bool) -> Any:
    """The service's directory actor, named after it: what :func:`attach` reads."""
    opts: dict[str, Any] = {"name": spec.name, "namespace": NAMESPACE, "num_cpus": 0}
    if detached:
        opts["lifetime"] = "detached"
    directory: Any = ray.remote(ServiceDirectory).options(**opts).remote(spec, placement.groups)
    try:
        ray.get(directory.spec.remote())
    except BaseException:
        ray.kill(directory)  # a detached one would keep the name, and the next deploy would clash
        raise
    return directory


def deploy(config: EngramConfig, *, vocab: Any = None, num_shards: int = 2,
           store: StoreConfig = StoreConfig(), name: str = "engram", detached: bool = False,
           checkpoint: str | None = None, host: str | None = None,
           service: ServiceConfig = ServiceConfig(), replicas: int | None = None,
           address: str | None = None,
           timeout: float = 600.0, max_resident_gib: float | None = None) -> MemoryService:
    """Start a memory service for ``config`` hashed over ``vocab`` (default: GPT-2).

    ``host``: the address servers bind to; by default loopback on a one-node (local) Ray,
    and each memory node's own address on a real cluster. ``detached`` keeps the service up
    after this driver exits (use with ``address="auto"`` on a cluster). ``checkpoint``:
    load the rows from a checkpoint directory, written with any shard count. ``service``:
    auth, TLS, limits and recovery (:class:`ServiceConfig`); with ``auth`` a fresh secret
    token guards the shards, and handles from :func:`attach` hand it to their clients.
    ``max_resident_gib`` (benchmarks): cap the RAM of the whole table's rows; each shard keeps
    its share resident and maps its rows into it (see ``StoreConfig.resident_rows_per_shard``).
    """
    _ensure_ray(address)
    spec = _plan(config, vocab, num_shards, store, name, service, replicas, max_resident_gib)
    host = _bind_host(host)
    started = _Started(reserve(spec, detached=detached, timeout=timeout))
    # The copies' own credential, for the calls between them (forwards, snapshots). It goes to
    # the shard actors only, never into the spec that attach() reads: no client holds it,
    # so no client can act as a replica -- with auth off too.
    peer_token = secrets.token_urlsafe(32)
    try:
        _start(spec, started, host=host, detached=detached, checkpoint=checkpoint, peer_token=peer_token)
        spec = _wire(spec, started, timeout)
        directory = _register(spec, started.placement, detached=detached)
    except BaseException:
        started.undo()  # nothing half-started stays behind
        raise
    log.info("memory service %s: %d shards x %d copies at %s", name, spec.num_shards, spec.copies,
             ", ".join(spec.addresses))
    return MemoryService.from_spec(spec, handles=[*started.flat, directory])


def attach(name: str = "engram", *, address: str | None = "auto") -> MemoryService:
    """The running service called ``name``, from any process connected to the cluster."""
    _ensure_ray(address)
    try:
        directory = _directory(name)
    except ValueError:
        raise ValueError(f"no memory service named {name!r} is running on this Ray cluster "
                         "(deploy one with engram-ray serve)") from None
    return MemoryService.from_spec(ray.get(directory.spec.remote()), handles=[directory])
