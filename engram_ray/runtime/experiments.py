"""Experiment arms as Ray tasks: every (arm, seed) trains side by side wherever the cluster
has room (a GPU worker takes a GPU task where there is one), on the corpus each task loads
from its node's cache (tokens never travel through Ray; a probe's result carries its layer
states on a few thousand held-out tokens, a few MB)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ray

from ..config import TrainConfig
from ..experiments.allocation import Arm
from ..experiments.run import train_arm

__all__ = ["run_arms"]


def run_arms(arms: list[Arm], seeds: list[int], *, train: TrainConfig, gpus_per_run: float | None = None,
             progress: bool = False, fn: Callable[..., dict[str, Any]] = train_arm, **kwargs: Any
             ) -> list[dict[str, Any]]:
    """Run ``fn(arm, train=<train with the seed>, **kwargs)`` (default :func:`train_arm`) for
    every arm and seed as one Ray task each (1 CPU, ``gpus_per_run`` GPUs: None is one where
    the cluster has GPUs, else none); the results in (arm, seed) order."""
    if gpus_per_run is None:
        gpus_per_run = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    if gpus_per_run < 0:
        raise ValueError(f"gpus_per_run={gpus_per_run}: expected >= 0")
    task: Any = ray.remote(fn).options(num_cpus=1, num_gpus=gpus_per_run)
    refs = [task.remote(arm, train=dataclasses.replace(train, seed=s), **kwargs) for arm in arms for s in seeds]
    if not progress:
        return ray.get(refs)
    from tqdm import tqdm
    done: dict[Any, Any] = {}
    pending = list(refs)
    with tqdm(total=len(refs), desc="experiment", unit="run") as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ready:
                done[r] = ray.get(r)
                bar.update(1)
    return [done[r] for r in refs]
