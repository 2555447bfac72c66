"""What a memory service is, in one frozen record, and the names of its parts.

:class:`ServiceSpec` is made by ``deploy`` (first without addresses, then with them once its
shard copies serve), kept by the service's directory actor, and read back by ``attach``:
one type for all three, so none of them builds or parses an ad-hoc dict. It is metadata
only (a few KiB: layout, configs, addresses) and travels through Ray by pickle.

It holds the clients' token, which ``attach`` hands to its clients: anyone who can reach
the Ray cluster can read it (the cluster is the trust boundary). It never holds the copies'
peer token: that goes to the shard actors only, so no client can act as a replica.

Names: copy ``r`` of shard ``i`` of service ``s`` is the actor ``s/shard-i`` (replica 0) or
``s/shard-i/r<r>``; :func:`copy_name` is the only place that spells it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ServiceConfig, StoreConfig
from ..core.layout import TableLayout
from ..store.recovery import recovery_dir_name

__all__ = ["NAMESPACE", "ServiceSpec", "copy_name", "shard_name"]

#: Ray namespace of every actor of engram_ray (shards, service directories, workers).
NAMESPACE = "engram_ray"


def shard_name(service: str, shard: int) -> str:
    """``<service>/shard-<i>``: shard ``i`` of a service (its replica 0's actor, and the
    placement group of its copies)."""
    return f"{service}/shard-{shard}"


def copy_name(service: str, shard: int, replica: int = 0) -> str:
    """The Ray actor name of copy ``replica`` of shard ``shard``: replica 0 is
    ``<service>/shard-<i>``, replica r > 0 is ``<service>/shard-<i>/r<r>``."""
    return shard_name(service, shard) + (f"/r{replica}" if replica else "")


@dataclass(frozen=True)
class ServiceSpec:
    """A memory service: its name, table, configs and where its shard copies serve."""

    name: str
    layout: TableLayout
    store: StoreConfig
    #: Auth, TLS, limits, recovery; ``service.replicas`` copies of each shard.
    service: ServiceConfig
    num_shards: int
    #: Per shard, the addresses of its copies (replica 0 first); empty until they serve.
    replicas: tuple[tuple[str, ...], ...] = ()
    #: The clients' secret (None without auth). Never the peer token.
    token: str | None = field(default=None, repr=False)
    #: PEM of the CA the clients trust, for a TLS service.
    tls_ca: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "replicas", tuple(tuple(row) for row in self.replicas))
        if self.replicas and (len(self.replicas) != self.num_shards
                              or any(len(row) != self.copies for row in self.replicas)):
            raise ValueError(f"ServiceSpec {self.name!r}: replicas must hold {self.copies} addresses for "
                             f"each of {self.num_shards} shards, got {[len(r) for r in self.replicas]}")

    @property
    def copies(self) -> int:
        """Copies of each shard."""
        return self.service.replicas

    @property
    def addresses(self) -> list[str]:
        """Replica 0's address of every shard."""
        return [row[0] for row in self.replicas]

    def copy_name(self, shard: int, replica: int = 0) -> str:
        return copy_name(self.name, shard, replica)

    @property
    def copy_names(self) -> list[str]:
        """Every copy's actor name, shard by shard, replica 0 first."""
        return [self.copy_name(i, r) for i in range(self.num_shards) for r in range(self.copies)]

    def with_replicas(self, replicas: list[list[str]]) -> ServiceSpec:
        """This spec with every copy's address (``replicas[i][r]``)."""
        return dataclasses.replace(self, replicas=tuple(tuple(row) for row in replicas))

    def with_address(self, shard: int, replica: int, address: str) -> ServiceSpec:
        """This spec after a restarted copy announced where it serves now."""
        rows = [list(row) for row in self.replicas]
        rows[shard][replica] = address
        return self.with_replicas(rows)

    def recovery_dir(self, shard: int, replica: int = 0) -> Path | None:
        """Where copy ``replica`` of ``shard`` keeps its recovery checkpoints (None without
        ``service.checkpoint_dir``): ``<dir>/<service>/shard-<iiii>-of-<nnnn>[-r<r>]``."""
        if not self.service.checkpoint_dir:
            return None
        return Path(self.service.checkpoint_dir) / self.name / recovery_dir_name(
            shard, self.num_shards, replica if self.copies > 1 else None)
