"""Shard requests reach Ray's Prometheus endpoint through ray.util.metrics."""

import socket
import time
import urllib.request

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from engram_ray import config as C  # noqa: E402
from engram_ray.core.tokens import CompressedVocab  # noqa: E402
from engram_ray.runtime import deploy, init_ray  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def metrics_port():
    """A local Ray exporting its metrics on a free loopback port; shut down after the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(num_cpus=2, _metrics_export_port=port)
    try:
        yield port
    finally:
        ray.shutdown()


def test_requests_show_on_the_prometheus_endpoint(metrics_port):
    port = metrics_port
    svc = deploy(C.tiny(), vocab=CompressedVocab(np.arange(50)), num_shards=1, name="metrics")
    try:
        with svc.client() as c:
            for _ in range(5):
                c.lookup(np.arange(100))
            c.push_gradients([1, 2], np.ones((2, 16), np.float32))
        found, deadline = {}, time.time() + 60  # Ray exports every few seconds
        while time.time() < deadline and len(found) < 3:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            for line in body.splitlines():
                if line.startswith("ray_engram_") and 'service="metrics"' in line:
                    name = line.split("{")[0]
                    if name in ("ray_engram_requests_total", "ray_engram_rows_total",
                                "ray_engram_resident_bytes") and 'method="ApplyGradients"' not in line:
                        found[name] = float(line.rsplit(" ", 1)[1])
            time.sleep(1)
        assert found.get("ray_engram_requests_total") == 5, found
        assert found.get("ray_engram_rows_total") == 500 and found.get("ray_engram_resident_bytes", 0) > 0
    finally:
        svc.shutdown()


def test_cache_and_table_use_show_on_the_prometheus_endpoint(metrics_port):
    """Lookups through a node's agent with a row cache: the cache's hit rate (agent) and the
    tables' utilisation and read skew (shards) reach Prometheus."""
    port = metrics_port
    svc = deploy(C.tiny(), vocab=CompressedVocab(np.arange(50)), num_shards=1, name="usage")
    try:
        ids = np.arange(0, 400, 3)
        with svc.agent_client(cache_bytes=1 << 20) as agent:
            for _ in range(4):   # the first misses, the rest hit
                f = agent.prefetch_unique(ids)
                f.result(30)
                f.release()
        want = {"ray_engram_cache_hit_rate", "ray_engram_table_utilisation", "ray_engram_rows_touched",
                "ray_engram_reads_top_share"}
        found: dict[str, list[float]] = {}
        deadline = time.time() + 60  # exported every 5 s, scraped every few
        while time.time() < deadline and not want <= set(found):
            # one more lookup (through a client: the agent holds every row now) lets the
            # shard's throttled usage export run again
            with svc.client() as c:
                c.lookup(ids[:2])
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            found = {}
            for line in body.splitlines():
                if line.startswith("ray_engram_") and 'service="usage"' in line:
                    found.setdefault(line.split("{")[0], []).append(float(line.rsplit(" ", 1)[1]))
            time.sleep(1)
        assert want <= set(found), sorted(found)
        assert found["ray_engram_cache_hit_rate"][0] == pytest.approx(0.75)
        assert all(0 <= u <= 1 for u in found["ray_engram_table_utilisation"])
        assert max(found["ray_engram_table_utilisation"]) > 0
        assert sum(found["ray_engram_rows_touched"]) == pytest.approx(ids.size, rel=0.05)
    finally:
        svc.shutdown()
