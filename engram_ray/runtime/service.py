"""Deploy, attach to and shut down a memory service on a Ray cluster.

``deploy`` starts one :class:`ShardServer` actor per shard, on nodes with the
``engram_memory`` resource when the cluster has them (spread over nodes), anywhere otherwise,
waits for their gRPC addresses, and registers the service under a name in a small directory
actor. ``attach(name)`` finds it from any process or job on the cluster, so GPU workers and
user scripts share one service. Only metadata passes through Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..client import EngramClient
from ..config import EngramConfig, ServiceConfig, StoreConfig
from ..core.layout import ShardPlan, TableLayout
from ..core.plan import optimizer_state_bytes_per_row
from .shard_server import NAMESPACE, ShardServer

__all__ = ["MemoryService", "deploy", "attach", "init_ray", "ray_session", "NAMESPACE", "MEMORY_RESOURCE",
           "MEMORY_GIB_RESOURCE", "shard_gib"]

log = logging.getLogger(__name__)

#: Custom resource that marks memory nodes in the cluster files: one unit per shard slot.
MEMORY_RESOURCE = "engram_memory"
#: Custom resource counting the GiB a memory node gives shards: shards are packed by memory.
MEMORY_GIB_RESOURCE = "engram_memory_gib"


class ServiceDirectory:
    """Named actor that remembers a service: its layout, store config and shard addresses."""

    def __init__(self, spec: dict[str, Any], shard_names: list[str]):
        self.spec, self.shard_names = spec, shard_names

    def info(self) -> dict[str, Any]:
        return dict(self.spec, shard_names=list(self.shard_names))

    def set_address(self, index: int, address: str, replica: int = 0) -> None:
        """A restarted shard copy announces where it serves now."""
        self.spec["replicas"][index][replica] = address
        if replica == 0:
            self.spec["addresses"][index] = address


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

    def _resolve(self) -> list[list[str]]:
        """The shard copies' addresses now (a restarted copy may serve elsewhere): asked of the
        service's directory actor, so clients follow restarts without user action."""
        info = ray.get(ray.get_actor(self.name, namespace=NAMESPACE).info.remote())
        self.addresses, self.replicas = list(info["addresses"]), [list(r) for r in info["replicas"]]
        return self.replicas

    def _copy_name(self, shard: int, replica: int) -> str:
        return f"{self.name}/shard-{shard}" + (f"/r{replica}" if replica else "")

    def shard_info(self, shard: int, replica: int = 0, timeout: float = 120.0) -> dict[str, Any]:
        """Where a shard copy runs and what it holds (pid, node, address, where its rows came
        from), waiting up to ``timeout`` seconds while it restarts."""
        deadline = time.time() + timeout
        while True:
            try:
                actor = ray.get_actor(self._copy_name(shard, replica), namespace=NAMESPACE)
                return ray.get(actor.info.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - unavailable while restarting
                if time.time() > deadline:
                    raise
                time.sleep(0.02)

    def kill_shard(self, shard: int, replica: int = 0, timeout: float = 30.0) -> int:
        """Kill a shard copy's process, as a crash would (Ray restarts it); returns once the
        process is gone, with its pid. For drills and tests of recovery."""
        pid = self.shard_info(shard, replica)["pid"]
        ray.kill(ray.get_actor(self._copy_name(shard, replica), namespace=NAMESPACE), no_restart=False)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return pid
            time.sleep(0.005)
        raise TimeoutError(f"shard {shard} copy {replica} (pid {pid}) still alive after {timeout} s")

    def recover(self, shard: int, replica: int = 0, source: str = "init") -> dict[str, Any]:
        """Operator's override for a shard copy that refuses to serve because none of its
        recovery checkpoints loads: serve ``source`` ("init": the initial rows, or a checkpoint
        directory on its node) from now on. Returns the copy's :meth:`shard_info`."""
        actor = ray.get_actor(self._copy_name(shard, replica), namespace=NAMESPACE)
        return ray.get(actor.recover.remote(source))

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
        def live(names: list[str]) -> list[Any]:
            out = []
            for n in names:
                try:
                    out.append(ray.get_actor(n, namespace=NAMESPACE))
                except ValueError:  # already gone
                    pass
            return out

        shards, directory = live(self.shard_names), live([self.name])
        pgs = []
        if directory:
            try:
                pgs = ray.get(directory[0].info.remote(), timeout=timeout).get("placement_groups") or []
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
        for pg in pgs:  # frees the shards' memory-node reservations
            remove_placement_group(pg)
        self.handles.clear()


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """``ray.init`` in this project's namespace, quiet; a local start that fails is retried once.

    Why the retry: on a loaded machine a freshly started local raylet now and then exits before
    registering (it was seen once in ~20 runs of the test suite, with no raylet log at all), and
    Ray then gives up after 30 s. A second start in a fresh session succeeds.
    """
    opts = dict(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False, configure_logging=False)
    opts.update(kwargs)
    try:
        ray.init(address=address, **opts)
    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
        if address is not None or "timed out during startup" not in str(e):
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
    try:
        ray.get_actor(name, namespace=NAMESPACE)
        return True
    except ValueError:
        return False


def shard_gib(layout: TableLayout, store: StoreConfig, num_shards: int) -> int:
    """Whole GiB one shard reserves of a node's ``engram_memory_gib``: its resident rows and
    the optimiser state beside them, rounded up (at least 1)."""
    rows = -(-layout.total_rows // num_shards)
    if store.resident_rows_per_shard:
        rows = min(rows, store.resident_rows_per_shard)
    per_row = layout.row_bytes(store.dtype) + optimizer_state_bytes_per_row(store.optimizer.kind, layout.row_dim)
    return max(1, -(-rows * per_row // 2**30))


def _shard_bundle(layout: TableLayout, store: StoreConfig, num_shards: int) -> dict[str, float]:
    """What each shard reserves: a slot on a memory node and, where nodes count their GiB,
    its share of them; empty on a cluster with no memory nodes (then shards go anywhere)."""
    total = ray.cluster_resources()
    if total.get(MEMORY_RESOURCE, 0) <= 0:
        return {}
    bundle = {MEMORY_RESOURCE: 1.0}
    if total.get(MEMORY_GIB_RESOURCE, 0) > 0:
        bundle[MEMORY_GIB_RESOURCE] = float(shard_gib(layout, store, num_shards))
    return bundle


def _reserve(name: str, bundle: dict[str, float], num_shards: int, replicas: int, detached: bool,
             timeout: float) -> list:
    """Placement groups for the shards: one bundle per shard (SPREAD), or with replicas one
    group per shard whose copies go to different nodes (STRICT_SPREAD) when there are enough
    memory nodes. Waited for together and all removed if any cannot be placed, so a service
    never starts half-placed, and an autoscaler sees the whole demand at once."""
    life = "detached" if detached else None
    if replicas == 1:
        pgs = [placement_group([dict(bundle) for _ in range(num_shards)], strategy="SPREAD",
                               name=f"{name}/shards", lifetime=life)]
    else:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get(MEMORY_RESOURCE, 0) > 0)
        strategy = "STRICT_SPREAD" if nodes >= replicas else "SPREAD"
        if strategy == "SPREAD":
            log.warning("service %s: %d memory nodes for %d copies of each shard: some copies share a node",
                        name, nodes, replicas)
        pgs = [placement_group([dict(bundle) for _ in range(replicas)], strategy=strategy,
                               name=f"{name}/shard-{i}", lifetime=life) for i in range(num_shards)]
    ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=len(pgs), timeout=timeout)
    if len(ready) < len(pgs):
        for pg in pgs:
            remove_placement_group(pg)
        nodes = [(n["NodeManagerAddress"], {k: n["Resources"][k] for k in (MEMORY_RESOURCE, MEMORY_GIB_RESOURCE)
                                            if k in n["Resources"]})
                 for n in ray.nodes() if n.get("Alive")]
        raise TimeoutError(
            f"could not place {num_shards} shards of {name!r} within {timeout:.0f} s: each needs "
            f"{bundle}, memory nodes have {[r for _, r in nodes if r] or 'none'}. Add memory nodes "
            "(or let the autoscaler: raise max_workers of the memory node type), or use more, "
            "smaller shards (engram-ray plan tells how many)")
    return pgs


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
    if vocab is None:
        from ..data import default_vocab
        vocab = default_vocab()
    layout = TableLayout.build(config, vocab)
    ShardPlan(layout.total_rows, num_shards)  # validates num_shards early, with its message
    if max_resident_gib is not None:
        if max_resident_gib <= 0:
            raise ValueError(f"max_resident_gib={max_resident_gib}: expected a positive size in GiB")
        row_bytes = layout.row_bytes(store.dtype)
        per_shard = max(1, int(max_resident_gib * 2**30 // row_bytes // num_shards))
        if per_shard * num_shards < layout.total_rows:
            store = dataclasses.replace(store, resident_rows_per_shard=per_shard)
            log.info("service %s: %d of %d rows resident (%.2f GiB cap)", name,
                     per_shard * num_shards, layout.total_rows, max_resident_gib)
    if _service_exists(name):
        raise ValueError(f"a memory service named {name!r} is already running; attach({name!r}) "
                         "to use it, or shut it down first")
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if host is None and len(alive) == 1:
        host = "127.0.0.1"
    # Shards are packed by memory, not CPU: without num_cpus=0, Ray would hold a CPU per
    # shard once custom resources are named, and a 2-CPU memory node would take 2 shards.
    opts: dict[str, Any] = {"namespace": NAMESPACE, "max_concurrency": 4, "num_cpus": 0}
    shard_opts = {"max_restarts": service.max_restarts}  # a dead shard comes back (and reloads)
    if detached:
        opts["lifetime"] = "detached"
    if replicas is not None:
        service = dataclasses.replace(service, replicas=replicas)
    token = secrets.token_urlsafe(32) if service.auth else None
    # The copies' own credential, for the calls between them (forwards, snapshots). It goes to
    # the shard actors only, never into the directory that attach() reads: no client holds it,
    # so no client can act as a replica -- with auth off too.
    peer_token = secrets.token_urlsafe(32)
    R = service.replicas
    bundle = _shard_bundle(layout, store, num_shards)
    pgs = _reserve(name, bundle, num_shards, R, detached, timeout) if bundle else []
    remote = ray.remote(ShardServer)
    # replica 0 of shard i is "<name>/shard-<i>"; replica r > 0 is "<name>/shard-<i>/r<r>"
    names = [[f"{name}/shard-{i}" + (f"/r{r}" if r else "") for r in range(R)] for i in range(num_shards)]
    actors: list[list[Any]] = []
    for i in range(num_shards):
        row = []
        for r in range(R):
            place = {}
            if pgs:
                pg, k = (pgs[0], i) if R == 1 else (pgs[i], r)
                place = {"resources": bundle, "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=k)}
            row.append(remote.options(name=names[i][r], **opts, **shard_opts, **place).remote(
                layout.to_dict(), num_shards, i, store.to_dict(), host=host, service=service.to_dict(),
                token=token, peer_token=peer_token, checkpoint=checkpoint, name=name, replica=r))
        actors.append(row)
    flat = [a for row in actors for a in row]
    refs = [a.address.remote() for a in flat]

    def undo() -> None:
        for a in flat:
            ray.kill(a)
        for pg in pgs:
            remove_placement_group(pg)

    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        undo()
        raise TimeoutError(
            f"{len(pending)} of {len(refs)} shard copies of {name!r} did not start within {timeout:.0f} s "
            f"({layout.nbytes(store.dtype) / num_shards / 2**30:.2f} GiB of rows each). "
            f"Cluster now: {ray.available_resources()}")
    try:
        got = iter(ray.get(refs))
        replicas = [[next(got) for _ in range(R)] for _ in range(num_shards)]
        if R > 1:  # every copy learns its peers; replica 0 starts as the primary
            ray.get([actors[i][r].set_peers.remote(replicas[i]) for i in range(num_shards) for r in range(R)])
    except Exception:
        undo()
        raise
    addresses = [row[0] for row in replicas]
    tls_ca = ray.get(flat[0].tls_ca.remote()) if service.tls_cert else None
    spec = {"name": name, "layout": layout.to_dict(), "store": store.to_dict(), "addresses": addresses,
            "replicas": replicas, "placement_groups": pgs, "service": service.to_dict(), "token": token,
            "tls_ca": tls_ca}
    dir_opts = {k: v for k, v in opts.items() if k in ("namespace", "lifetime")}
    shard_names = [n for row in names for n in row]
    directory = ray.remote(ServiceDirectory).options(name=name, num_cpus=0, **dir_opts).remote(spec, shard_names)
    ray.get(directory.info.remote())
    log.info("memory service %s: %d shards x %d copies at %s", name, num_shards, R, ", ".join(addresses))
    return MemoryService(name, layout, store, addresses, shard_names, handles=[*flat, directory],
                         service=service, token=token, tls_ca=tls_ca, replicas=replicas)


def attach(name: str = "engram", *, address: str | None = "auto") -> MemoryService:
    """The running service called ``name``, from any process connected to the cluster."""
    _ensure_ray(address)
    try:
        directory = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"no memory service named {name!r} is running on this Ray cluster "
                         "(deploy one with engram-ray serve)") from None
    info = ray.get(directory.info.remote())
    return MemoryService(info["name"], TableLayout.from_dict(info["layout"]),
                         StoreConfig.from_dict(info["store"]), list(info["addresses"]),
                         list(info["shard_names"]), handles=[directory],
                         service=ServiceConfig.from_dict(info["service"]), token=info["token"],
                         tls_ca=info["tls_ca"], replicas=[list(r) for r in info["replicas"]])
