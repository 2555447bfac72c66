"""ShardHost (the server the Ray actor wraps) in-process, and ``engram-ray shard`` as plain
processes with ray hidden: an EngramClient looks up and pushes through them exactly as an
in-process TableShard computes."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engram_ray import config as C
from engram_ray.client import EngramClient
from engram_ray.config import OptimizerConfig, ServiceConfig, StoreConfig
from engram_ray.core.layout import TableLayout
from engram_ray.errors import AuthError
from engram_ray.rpc.host import ShardHost
from engram_ray.store import TableShard

#: Runs the CLI in a fresh interpreter where ``import ray`` fails, as on a machine without Ray.
NO_RAY = "import sys; sys.modules['ray'] = None; from engram_ray.cli import main; sys.exit(main(sys.argv[1:]))"
STORE = StoreConfig(optimizer=OptimizerConfig(kind="sgd", lr=0.5))


def _check_against_local(client: EngramClient, layout: TableLayout, store: StoreConfig) -> None:
    """Lookups equal a whole in-process table's; a push moves the same rows the same way."""
    local = TableShard.create(layout, 1, 0, store)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, layout.total_rows, size=(3, 40))
    np.testing.assert_array_equal(client.lookup(ids), local.gather(ids.ravel()).reshape(*ids.shape, -1))
    grads = rng.standard_normal((*ids.shape, layout.row_dim)).astype(np.float32)
    client.push_gradients(ids, grads)
    flat, g = ids.reshape(-1), grads.reshape(-1, layout.row_dim)
    uniq, inv = np.unique(flat, return_inverse=True)  # the client sums duplicates before pushing
    summed = np.zeros((uniq.size, layout.row_dim), np.float32)
    np.add.at(summed, inv, g)
    local.apply_gradients(uniq, summed)
    np.testing.assert_allclose(client.lookup(ids), local.gather(flat).reshape(*ids.shape, -1), rtol=1e-6, atol=1e-6)


def test_host_serves_its_shard_without_ray(tiny_layout):
    hosts = [ShardHost(tiny_layout, STORE, ServiceConfig(), 2, i, token="t0k") for i in range(2)]
    client = EngramClient([h.address() for h in hosts], tiny_layout, token="t0k")
    try:
        _check_against_local(client, tiny_layout, STORE)
        info = hosts[1].info()
        assert info["state"] == "serving" and info["source"] == "init" and info["pid"] == os.getpid()
        assert (info["row_start"], info["row_stop"]) == (hosts[1].shard.row_start, hosts[1].shard.row_stop)
    finally:
        client.close()
        for h in hosts:
            h.stop(0)


def test_host_reloads_its_newest_recovery_checkpoint(tmp_path, tiny_layout):
    svc = ServiceConfig(checkpoint_dir=str(tmp_path))
    host = ShardHost(tiny_layout, STORE, svc, 1, 0, recovery_dir=tmp_path / "s0")
    host.shard.apply_gradients(np.array([3, 5]), np.ones((2, tiny_layout.row_dim), np.float32))
    want = host.shard.gather(np.array([3, 5]))
    host.save_recovery()
    host.stop(0)
    again = ShardHost(tiny_layout, STORE, svc, 1, 0, recovery_dir=tmp_path / "s0")
    try:
        assert again.servicer.rows_from.startswith(str(tmp_path / "s0"))
        np.testing.assert_array_equal(again.shard.gather(np.array([3, 5])), want)
    finally:
        again.stop(0)


def _start_shards(tmp_path: Path, n: int, extra: list[str]) -> tuple[list[subprocess.Popen], list[str]]:
    procs, ready = [], [tmp_path / f"ready-{i}" for i in range(n)]
    for i in range(n):
        cmd = [sys.executable, "-c", NO_RAY, "shard", "--preset", "tiny", "--shards", str(n), "--index", str(i),
               "--ready-file", str(ready[i]), *extra]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            out = [p.communicate(timeout=10) for p in procs]
            pytest.fail(f"shards did not come up: {out}")
        time.sleep(0.1)
    return procs, [r.read_text().strip() for r in ready]


@pytest.mark.slow
def test_engram_ray_shard_serves_without_ray_and_stops_on_sigterm(tmp_path):
    from engram_ray.data import default_vocab, load_tokenizer

    (tmp_path / "token").write_text("s3cret\n")
    procs, addresses = _start_shards(tmp_path, 2, ["--token-file", str(tmp_path / "token"),
                                                   "--optimizer", "sgd", "--lr", "0.5"])
    try:
        assert all(a.startswith("127.0.0.1:") for a in addresses)
        layout = TableLayout.build(C.tiny(), default_vocab(load_tokenizer("gpt2")))
        with EngramClient(addresses, layout, token="s3cret") as client:
            _check_against_local(client, layout, STORE)
        with pytest.raises(AuthError):  # the token file's secret, and no other, is accepted
            EngramClient(addresses, layout, token="wrong", retries=0)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("stopped" in err for _, err in outs), outs
    assert not any((tmp_path / f"ready-{i}").exists() for i in range(2))  # no stale address left


def test_engram_ray_shard_refuses_a_missing_token(tmp_path):
    r = subprocess.run([sys.executable, "-c", NO_RAY, "shard", "--preset", "tiny", "--index", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--token-file" in r.stderr


def test_the_cli_imports_no_ray_torch_or_runtime():
    code = ("import sys; sys.modules['ray'] = None; from engram_ray.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'grpc') "
            "or m.startswith('engram_ray.runtime')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"



@pytest.mark.slow
def test_engram_ray_shard_caps_resident_rows_as_bench_deploys(tmp_path):
    # --max-resident-gib: the plain-process twin of deploy(max_resident_gib=...), so the GPU
    # check's bench serves the 100B layout from a small machine, as the CPU bench does.
    from engram_ray.core.plan import resident_rows_per_shard
    from engram_ray.data import default_vocab, load_tokenizer

    layout = TableLayout.build(C.tiny(), default_vocab(load_tokenizer("gpt2")))
    gib = layout.total_rows // 8 * layout.row_bytes("float32") / 2**30  # an eighth of the rows
    cap = resident_rows_per_shard(layout, "float32", 2, gib)
    assert 0 < cap < layout.total_rows // 2
    procs, addresses = _start_shards(tmp_path, 2, ["--no-auth", "--max-resident-gib", repr(gib)])
    try:
        with EngramClient(addresses, layout) as client:
            capped = TableShard.create(layout, 2, 0, dataclasses.replace(StoreConfig(), resident_rows_per_shard=cap))
            ids = np.array([0, 1, cap, cap + 1, 2 * cap + 3])  # shard 0's rows, wrapped by the cap
            rows = client.lookup(ids)
            np.testing.assert_array_equal(rows, capped.gather(ids))
            np.testing.assert_array_equal(rows[2:4], rows[0:2])
            with pytest.raises(ValueError, match="resident"):  # a benchmark table takes no pushes
                client.push_gradients(ids[:1], np.ones((1, layout.row_dim), np.float32))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=30) for p in procs]
    assert "resident)" in outs[0][0], outs[0]


@pytest.mark.slow
def test_an_mmap_shard_killed_and_restarted_serves_identical_rows(tmp_path):
    # issue 14: rows in a memory-mapped file on the node's disk; an update is in the file (the
    # page cache outlives the process), and a restart reopens it without a copy
    from engram_ray.data import default_vocab, load_tokenizer

    layout = TableLayout.build(C.tiny(), default_vocab(load_tokenizer("gpt2")))
    extra = ["--no-auth", "--storage", "mmap", "--data-dir", str(tmp_path / "data"), "--optimizer", "sgd",
             "--lr", "0.5"]
    ids = np.arange(0, layout.total_rows, 5)
    procs, addresses = _start_shards(tmp_path, 1, extra)
    try:
        with EngramClient(addresses, layout) as client:
            client.push_gradients(ids[:20], np.ones((20, layout.row_dim), np.float32))
            want = client.lookup(ids)
            (d,) = client.describe()
            assert d["storage"] == "mmap" and d["mapped_bytes"] == layout.total_rows * layout.row_dim * 4
    finally:
        procs[0].kill()  # no clean stop: the rows must already be in the file
        procs[0].communicate(timeout=30)
    (tmp_path / "ready-0").unlink(missing_ok=True)
    procs, addresses = _start_shards(tmp_path, 1, extra)
    try:
        with EngramClient(addresses, layout) as client:
            np.testing.assert_array_equal(client.lookup(ids), want)
    finally:
        procs[0].send_signal(signal.SIGTERM)
        procs[0].communicate(timeout=30)
