"""Where shard copies run: the memory nodes' custom resources, and the placement groups that
reserve them for a service before any copy starts.

A memory node declares :data:`MEMORY_RESOURCE` (one unit per shard slot) and, where it
counts them, :data:`MEMORY_GIB_RESOURCE` (the GiB it gives shards); each copy reserves one
slot and its :func:`~engram_ray.core.plan.shard_gib`. On a cluster with no memory nodes
(a laptop, a plain local Ray) nothing is reserved and copies go anywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..core.plan import MEMORY_GIB_RESOURCE, MEMORY_RESOURCE, shard_gib
from .spec import ServiceSpec, shard_name

__all__ = ["MEMORY_GIB_RESOURCE", "MEMORY_RESOURCE", "Placement", "release", "reserve", "shard_bundle"]

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """The reservation of a service's copies: one bundle per copy, in placement groups."""

    #: What each copy reserves; empty when nothing is (no memory nodes).
    bundle: dict[str, float]
    #: One group holding one bundle per shard, or (``per_shard``) one group per shard
    #: holding a bundle per copy.
    groups: list[PlacementGroup] = field(default_factory=list)
    per_shard: bool = False

    def options(self, shard: int, replica: int) -> dict[str, Any]:
        """Ray actor options that put copy ``replica`` of ``shard`` in its bundle."""
        if not self.groups:
            return {}
        group, index = (self.groups[shard], replica) if self.per_shard else (self.groups[0], shard)
        return {"resources": dict(self.bundle), "scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=index)}

    def release(self) -> None:
        """Free the reservation (the copies' memory-node slots and GiB)."""
        release(self.groups)


def release(groups: list[PlacementGroup]) -> None:
    for group in groups:
        remove_placement_group(group)


def shard_bundle(spec: ServiceSpec) -> dict[str, float]:
    """What each copy reserves: a slot on a memory node and, where nodes count their GiB, its
    share of them; empty on a cluster with no memory nodes (then copies go anywhere)."""
    total = ray.cluster_resources()
    if total.get(MEMORY_RESOURCE, 0) <= 0:
        return {}
    bundle = {MEMORY_RESOURCE: 1.0}
    if total.get(MEMORY_GIB_RESOURCE, 0) > 0:
        bundle[MEMORY_GIB_RESOURCE] = float(shard_gib(spec.layout, spec.store, spec.num_shards))
    return bundle


def _memory_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get(MEMORY_RESOURCE, 0) > 0]


def reserve(spec: ServiceSpec, *, detached: bool, timeout: float) -> Placement:
    """Reserve memory-node capacity for every copy of ``spec``'s shards: one group of one
    bundle per shard (SPREAD), or with replicas one group per shard whose copies go to
    different nodes (STRICT_SPREAD) when there are enough memory nodes. Waited for together
    and all removed if any cannot be placed, so a service never starts half-placed, and an
    autoscaler sees the whole demand at once."""
    bundle = shard_bundle(spec)
    if not bundle:
        return Placement(bundle)
    life = "detached" if detached else None
    n, copies = spec.num_shards, spec.copies
    if copies == 1:
        groups = [placement_group([dict(bundle) for _ in range(n)], strategy="SPREAD",
                                  name=f"{spec.name}/shards", lifetime=life)]
    else:
        nodes = len(_memory_nodes())
        strategy = "STRICT_SPREAD" if nodes >= copies else "SPREAD"
        if strategy == "SPREAD":
            log.warning("service %s: %d memory nodes for %d copies of each shard: some copies share a node",
                        spec.name, nodes, copies)
        groups = [placement_group([dict(bundle) for _ in range(copies)], strategy=strategy,
                                  name=shard_name(spec.name, i), lifetime=life) for i in range(n)]
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=timeout)
    if len(ready) < len(groups):
        release(groups)
        have = [{k: node["Resources"][k] for k in (MEMORY_RESOURCE, MEMORY_GIB_RESOURCE) if k in node["Resources"]}
                for node in ray.nodes() if node.get("Alive")]
        raise TimeoutError(
            f"could not place {n} shards of {spec.name!r} within {timeout:.0f} s: each needs "
            f"{bundle}, memory nodes have {[r for r in have if r] or 'none'}. Add memory nodes "
            "(or let the autoscaler: raise max_workers of the memory node type), or use more, "
            "smaller shards (engram-ray plan tells how many)")
    return Placement(bundle, groups, per_shard=copies > 1)
