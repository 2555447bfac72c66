"""A served table for the agent tests: shards in this process (gRPC on loopback), a lookup
agent as a plain process (``python -m engram_ray.agent``), and what a worker needs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engram_ray import config as C
from engram_ray.config import OptimizerConfig, StoreConfig
from engram_ray.core.indexer import RowIndexer
from engram_ray.core.layout import TableLayout
from engram_ray.core.tokens import CompressedVocab
from engram_ray.rpc import create_server
from engram_ray.store import TableShard

STORE = StoreConfig(init_std=0.5, optimizer=OptimizerConfig(kind="adam", lr=0.05))


def start_shards(layout: TableLayout, n: int = 2, store: StoreConfig = STORE) -> tuple[list, list[str]]:
    servers = [create_server(TableShard.create(layout, n, i, store), "127.0.0.1", 0) for i in range(n)]
    return [s for s, _ in servers], [f"127.0.0.1:{p}" for _, p in servers]


def spawn_agent(socket_path: str, addresses: list[str], layout: TableLayout) -> subprocess.Popen:
    """``python -m engram_ray.agent`` on ``socket_path``; returns once it serves."""
    layout_file = socket_path + ".layout.json"
    Path(layout_file).write_text(json.dumps(layout.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "engram_ray.agent", "--addresses", ",".join(addresses),
                             "--layout", layout_file, "--socket", socket_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "lookup agent serving" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def slot_maps(pid: int) -> int:
    """How many slot mappings (memfd ``engram-agent-slot``) process ``pid`` holds."""
    try:
        return Path(f"/proc/{pid}/maps").read_text().count("engram-agent-slot")
    except FileNotFoundError:
        return 0


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@dataclass
class Served:
    layout: TableLayout
    indexer: RowIndexer
    addresses: list[str]
    socket: str
    agent: subprocess.Popen


@pytest.fixture
def served(tmp_path):
    mc, ec = C.model_tiny(), C.tiny()
    indexer = RowIndexer.build(ec, CompressedVocab(np.arange(mc.vocab_size) // 2))
    servers, addresses = start_shards(indexer.layout)
    path = str(tmp_path / "agent.sock")
    agent = spawn_agent(path, addresses, indexer.layout)
    s = Served(indexer.layout, indexer, addresses, path, agent)
    yield s
    stop(s.agent)
    for srv in servers:
        srv.stop(0)
