"""``BackboneWorker``: the Ray actor that runs the Engram-MoE (one GPU where the cluster has
them, CPUs otherwise), taking its Engram rows from the memory service by name. Several
workers can share one service; only metrics, text and paths pass through Ray."""

from __future__ import annotations

import logging
from typing import Any

import ray

from ..config import EngramConfig, ModelConfig, TrainConfig
from ..core.layout import TableLayout
from ..remote_memory import RemoteMemory
from ..training import Trainer
from .service import NAMESPACE, attach

__all__ = ["BackboneWorker", "WorkerHandle", "start_worker"]

log = logging.getLogger(__name__)


class BackboneWorker:
    """Holds the model, its trainer and its way to the rows of service ``service_name``: this
    node's lookup agent (``agent=True``: no gRPC in the model's process) or an EngramClient."""

    def __init__(self, service_name: str, model_cfg: dict, engram_cfg: dict, train_cfg: dict,
                 tokenizer: str = "gpt2", corpus: str = "stdlib", agent: bool = True):
        import torch

        from ..data import default_vocab, load_corpus, load_tokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        svc = attach(service_name, address=None)
        self.tokenizer = load_tokenizer(tokenizer)
        vocab = default_vocab(self.tokenizer)
        ecfg = EngramConfig.from_dict(engram_cfg)
        mine = TableLayout.build(ecfg, vocab)
        if mine.fingerprint != svc.layout.fingerprint:
            raise ValueError(f"worker's table layout {mine.fingerprint} (tokenizer {tokenizer!r}) differs "
                             f"from service {service_name!r}'s {svc.layout.fingerprint}")
        data = load_corpus(corpus, self.tokenizer)
        self._agent = None
        if agent:
            from .agent import agent_client, start_agent
            self._agent = start_agent(service_name)
            self.client: Any = agent_client(svc)
        else:
            self.client = svc.client()
        self.memory = RemoteMemory(self.client, device=device)
        self.trainer = Trainer(ModelConfig.from_dict(model_cfg), ecfg, vocab, self.memory,
                               data.train, data.val, TrainConfig.from_dict(train_cfg), device=device)
        self.device = device
        log.info("worker on %s: %d params, service %s", device,
                 sum(p.numel() for p in self.trainer.model.parameters()), service_name)

    def info(self) -> dict[str, Any]:
        import torch
        return {"device": self.device, "threads": torch.get_num_threads(),
                "params": sum(p.numel() for p in self.trainer.model.parameters())}

    def train(self, steps: int) -> list[dict[str, float]]:
        """Run ``steps`` optimiser steps; returns each step's metrics."""
        return [self.trainer.train_step() for _ in range(steps)]

    def evaluate(self) -> float:
        return self.trainer.evaluate()

    def generate(self, prompt: str, max_new_tokens: int = 40, temperature: float = 0.8) -> str:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        out = self.trainer.generate(ids, max_new_tokens, temperature=temperature)
        return self.tokenizer.decode(out)

    def stats(self) -> dict[str, Any]:
        """The EngramClient's counters (the node agent's, shared by its workers): lookups, ids,
        unique ids, bytes, latency."""
        if self._agent is not None:
            return ray.get(self._agent.info.remote())["client"]
        return self.client.stats()

    def save(self, path: str) -> str:
        """Write the dense weights (the Engram rows are saved by the shards)."""
        import torch
        torch.save({"model": self.trainer.model.state_dict(), "step": self.trainer.step_count}, path)
        return path


class WorkerHandle:
    """Public handle on a :class:`BackboneWorker` actor: plain methods, one Ray call each."""

    def __init__(self, actor):
        self.actor = actor

    def info(self) -> dict[str, Any]:
        return ray.get(self.actor.info.remote())

    def train(self, steps: int) -> list[dict[str, float]]:
        return ray.get(self.actor.train.remote(steps))

    def evaluate(self) -> float:
        return ray.get(self.actor.evaluate.remote())

    def generate(self, prompt: str, max_new_tokens: int = 40, temperature: float = 0.8) -> str:
        return ray.get(self.actor.generate.remote(prompt, max_new_tokens, temperature))

    def stats(self) -> dict[str, Any]:
        return ray.get(self.actor.stats.remote())

    def save(self, path: str) -> str:
        return ray.get(self.actor.save.remote(path))

    def shutdown(self) -> None:
        ray.kill(self.actor)


def start_worker(service_name: str, model_cfg: ModelConfig, engram_cfg: EngramConfig,
                 train_cfg: TrainConfig, *, tokenizer: str = "gpt2", corpus: str = "stdlib",
                 num_cpus: float | None = None, name: str | None = None, agent: bool = True):
    """Start a :class:`BackboneWorker` actor: on a GPU node with one GPU where the cluster
    has GPUs (and ``num_cpus``, default 1), else with ``num_cpus`` CPUs (default: the free
    CPUs of a one-node Ray, used as torch threads; 1 on a multi-node cluster). ``agent``: read
    rows through the node's lookup agent (started if none serves the service there).
    Returns its :class:`WorkerHandle` once the worker is ready (errors raise here)."""
    opts: dict[str, Any] = {"namespace": NAMESPACE}
    one_node = sum(1 for n in ray.nodes() if n.get("Alive")) == 1
    if ray.cluster_resources().get("GPU", 0) >= 1:
        opts["num_gpus"] = 1  # Ray places it on a GPU node: memory nodes declare no GPUs
        default_cpus = 1
    else:
        default_cpus = max(1, int(ray.available_resources().get("CPU", 1))) if one_node else 1
    opts["num_cpus"] = num_cpus if num_cpus is not None else default_cpus
    if name:
        opts["name"] = name
    actor = ray.remote(BackboneWorker).options(**opts).remote(
        service_name, model_cfg.to_dict(), engram_cfg.to_dict(), train_cfg.to_dict(),
        tokenizer=tokenizer, corpus=corpus, agent=agent)
    handle = WorkerHandle(actor)
    handle.info()  # surfaces a failed constructor here, with its message
    return handle
