"""deploy / attach / shutdown on a real local Ray (started once for this module)."""

import os
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from engram_ray import config as C  # noqa: E402
from engram_ray.config import OptimizerConfig, ServiceConfig, StoreConfig  # noqa: E402
from engram_ray.core.tokens import CompressedVocab  # noqa: E402
from engram_ray.runtime import attach, deploy, init_ray  # noqa: E402
from engram_ray.runtime.spec import NAMESPACE, ServiceSpec  # noqa: E402
from engram_ray.store import TableShard  # noqa: E402

from .test_priority import may_raise_priority  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
VOCAB = CompressedVocab(np.arange(50))


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # The custom resource marks this node as a memory node, as the cluster files do.
    # engram_memory_gib: this "node" gives shards 3 GiB (a tiny shard reserves 1 GiB, whole GiB)
    init_ray(num_cpus=2, resources={"engram_memory": 4, "engram_memory_gib": 3})
    yield
    ray.shutdown()


def test_deploy_attach_lookup_shutdown(tiny_layout):
    svc = deploy(C.tiny(), vocab=VOCAB, num_shards=2, name="t1")
    try:
        assert svc.layout == tiny_layout and len(svc.addresses) == 2
        assert all(a.startswith("127.0.0.1:") for a in svc.addresses)  # local Ray: loopback only
        same = attach("t1")
        assert same.addresses == svc.addresses and same.layout.fingerprint == tiny_layout.fingerprint
        assert same.token == svc.token and len(svc.token) >= 32  # auth is on by default
        from engram_ray.client import EngramClient
        from engram_ray.errors import AuthError
        with pytest.raises(AuthError, match="no token"):
            EngramClient(svc.addresses, svc.layout)  # a client that did not get the token
        ids = np.random.default_rng(0).integers(0, tiny_layout.total_rows, size=(3, 20))
        with same.client() as client:
            rows = client.lookup(ids)
        full = TableShard.create(tiny_layout, 1, 0)
        assert np.array_equal(rows, full.gather(ids.ravel()).reshape(rows.shape))
        desc = svc.describe()
        assert [d["shard_index"] for d in desc] == [0, 1]
        assert sum(d["counters"]["rows_served"] for d in desc) == np.unique(ids).size
        # Ray starts workers at nice 15; a shard serves at the node's normal priority where it may
        assert [svc.shard_info(i)["nice"] for i in (0, 1)] == [0 if may_raise_priority() else 15] * 2
        with pytest.raises(ValueError, match="named 't1' is already running"):
            deploy(C.tiny(), vocab=VOCAB, num_shards=2, name="t1")
    finally:
        svc.shutdown()
    with pytest.raises(ValueError, match="no memory service named 't1'"):
        attach("t1")


def test_another_process_attaches_by_name(tiny_layout):
    svc = deploy(C.tiny(), vocab=VOCAB, num_shards=2, name="shared")
    try:
        code = ("import numpy as np\n"
                "from engram_ray.runtime import attach\n"
                "svc = attach('shared', address='auto')\n"
                "with svc.client() as c:\n"
                "    print(svc.layout.fingerprint, float(c.lookup(np.array([3]))[0, 0]))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, RAY_LOG_TO_STDERR="0"))
        assert out.returncode == 0, out.stderr[-2000:]
        fp, value = out.stdout.split()[-2:]
        assert fp == tiny_layout.fingerprint
        assert float(value) == pytest.approx(float(TableShard.create(tiny_layout, 1, 0).values[3, 0]))
    finally:
        svc.shutdown()


def test_checkpoint_then_redeploy_with_another_shard_count(tiny_layout, tmp_path):
    store = StoreConfig(optimizer=OptimizerConfig(kind="adam", lr=0.1))
    svc = deploy(C.tiny(), vocab=VOCAB, num_shards=3, store=store, name="ck",
                 service=ServiceConfig(save_root=str(tmp_path)))
    ids = np.arange(0, tiny_layout.total_rows, 7)
    try:
        with svc.client() as c:
            c.push_gradients(ids, np.ones((ids.size, 16), np.float32))
            trained = c.lookup(np.arange(tiny_layout.total_rows))
        paths = svc.save("ckpt")  # below the save root
        assert len(paths) == 3 and all(p.startswith(str(tmp_path / "ckpt")) for p in paths)
    finally:
        svc.shutdown()
    again = deploy(C.tiny(), vocab=VOCAB, num_shards=2, store=store, name="ck2", checkpoint=str(tmp_path / "ckpt"))
    try:
        with again.client() as c:
            assert np.array_equal(c.lookup(np.arange(tiny_layout.total_rows)), trained)
    finally:
        again.shutdown()


def _memory_free_within(expected: float, seconds: float = 10.0) -> float:
    """The raylet frees a dead actor's resources shortly after its death: wait (bounded)."""
    import time
    deadline = time.time() + seconds
    while ray.available_resources().get("engram_memory", 0) != expected and time.time() < deadline:
        time.sleep(0.05)
    return ray.available_resources().get("engram_memory", 0)


def test_shards_go_to_memory_nodes_and_detached_services_outlive_their_handle(tiny_layout):
    free = ray.cluster_resources()["engram_memory"]
    assert _memory_free_within(free) == free  # every earlier service has shut down
    svc = deploy(C.tiny(), vocab=VOCAB, num_shards=3, name="det", detached=True)
    try:
        assert ray.available_resources().get("engram_memory", 0) == free - 3
        assert ray.available_resources().get("engram_memory_gib", 0) == 0  # packed by GiB too
        names = list(svc.shard_names)
        del svc  # a detached service does not depend on this handle
        again = attach("det")
        assert again.shard_names == names
        with again.client() as c:
            assert c.lookup(np.array([1, tiny_layout.total_rows - 1])).shape == (2, 16)
    finally:
        attach("det").shutdown()
    # once shut down, the memory nodes' capacity is free again
    assert _memory_free_within(free) == free


def test_bad_deploys_are_explained():
    # four shards: slots for four, GiB for three -- a clear error after the timeout, nothing
    # reserved or running afterwards
    with pytest.raises(TimeoutError, match=r"could not place 4 shards of 'toomany' within 10 s: each needs "
                                           r"\{'engram_memory': 1.0, 'engram_memory_gib': 1.0\}, memory nodes "
                                           r"have \[\{'engram_memory': 4.0, 'engram_memory_gib': 3.0\}\]"):
        deploy(C.tiny(), vocab=VOCAB, num_shards=4, name="toomany", timeout=10)
    free = ray.cluster_resources()["engram_memory"]
    assert _memory_free_within(free) == free
    assert ray.available_resources()["engram_memory_gib"] == 3
    with pytest.raises(ValueError, match="num_shards=0"):
        deploy(C.tiny(), vocab=VOCAB, num_shards=0, name="bad")
    with pytest.raises(ValueError, match="no memory service named 'nope'"):
        attach("nope")


def test_a_100b_table_deploys_with_a_resident_cap():
    """The real 100B layout (its primes and ids), with 64 MiB of rows resident."""
    svc = deploy(C.table_100b(), vocab=VOCAB, num_shards=2, name="big", max_resident_gib=1 / 16)
    try:
        assert 0.999e11 < svc.layout.num_params < 1.001e11
        desc = svc.describe()
        assert all(d["resident_rows"] * 2 * svc.layout.row_bytes("float32") <= 2**26 for d in desc)
        assert sum(d["row_stop"] - d["row_start"] for d in desc) == svc.layout.total_rows
        ids = np.array([0, svc.layout.total_rows // 2, svc.layout.total_rows - 1])
        with svc.client() as c:
            assert c.lookup(ids).shape == (3, svc.layout.row_dim)
    finally:
        svc.shutdown()


def test_the_directory_keeps_the_spec_attach_reads_and_never_the_peer_token():
    import pickle

    svc = deploy(C.tiny(), vocab=VOCAB, num_shards=1, name="spec", replicas=2)
    try:
        spec = ray.get(ray.get_actor("spec", namespace=NAMESPACE).spec.remote())  # through Ray: pickled
        assert isinstance(spec, ServiceSpec) and spec.copies == 2 and spec.num_shards == 1
        same = attach("spec")
        assert same.shard_names == svc.shard_names == spec.copy_names == ["spec/shard-0", "spec/shard-0/r1"]
        assert same.replicas == svc.replicas == [list(r) for r in spec.replicas]
        assert same.addresses == svc.addresses and same.token == svc.token == spec.token
        assert same.layout == svc.layout and same.store == svc.store and same.service == svc.service
        # the copies hold a peer credential of their own; the directory (what attach reads) never does
        copy = ray.get_actor(spec.copy_name(0, 1), namespace=NAMESPACE)
        peer = ray.get(copy.__ray_call__.remote(lambda self: self.host.peer_token))
        assert peer and peer != spec.token and peer.encode() not in pickle.dumps(spec)
    finally:
        svc.shutdown()


def test_a_process_is_seen_gone_on_its_own_node():
    """kill_shard's check, run where the copy's process lives: here in place, and through a
    task pinned to the node (as for a copy on another machine, where os.kill sees nothing)."""
    from engram_ray.runtime.processes import probe_on_node, wait_gone

    node = ray.get_runtime_context().get_node_id()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert wait_gone(node, proc.pid, 0.2) is False
        assert probe_on_node(node, proc.pid, 0.2) is False
    finally:
        proc.kill()
        proc.wait()
    assert wait_gone(node, proc.pid, 5) is True
    assert probe_on_node(node, proc.pid, 5) is True
    assert probe_on_node("ab" * 28, proc.pid, 5) is True  # a node that is gone took its processes along


def test_a_deployed_fp8_service_serves_an_imported_v41_style_table(tmp_path):
    # issue 14's done-when on Ray: an FP8 checkpoint made by `engram-ray import` from a
    # V4.1-layout file, deployed as an FP8 service; a worker's RemoteMemory (through the
    # service's lookup agent) gets the values torch dequantises from the file's bytes
    import torch

    from engram_ray.config import EngramConfig
    from engram_ray.core import fp8
    from engram_ray.core.layout import TableLayout
    from engram_ray.core.safetensors import SafetensorsWriter
    from engram_ray.remote_memory import RemoteMemory
    from engram_ray.store.interchange import NameMap, import_tables, plan_import

    cfg = EngramConfig(engram_vocab_size=(61, 67, 71), max_ngram_size=4, n_embed_per_ngram=512,
                       n_head_per_ngram=8, layer_ids=(1, 14), pad_id=2, seed=0, kernel_size=4)
    layout = TableLayout.build(cfg, VOCAB)
    name = "model.layers.{layer}.engram.embedding.weight"
    rng = np.random.default_rng(0)
    specs, data, want = {}, {}, []
    for lid, rows in zip(layout.layer_ids, layout.layer_rows):
        codes, scales = fp8.quantize_rows(rng.standard_normal((rows, layout.row_dim)).astype(np.float32))
        t, s = name.format(layer=lid), name.format(layer=lid)[:-6] + "weight_scale_inv"
        specs[t], specs[s] = ("F8_E4M3", codes.shape), ("F8_E8M0", scales.shape)
        data[t], data[s] = codes, scales
        want.append((torch.from_numpy(codes).view(torch.float8_e4m3fn).float().view(rows, -1, 32)
                     * torch.exp2(torch.from_numpy(scales).float() - 127)[..., None]).view(rows, -1).numpy())
    with SafetensorsWriter(tmp_path / "v41.safetensors", specs) as w:
        for k in specs:
            w.write(k, data[k])
    import_tables(plan_import([tmp_path / "v41.safetensors"], layout, NameMap(pattern=name)), layout,
                  tmp_path / "ckpt", dtype="fp8_e4m3")
    store = StoreConfig(dtype="fp8_e4m3", optimizer=OptimizerConfig(kind="none"))
    svc = deploy(cfg, vocab=VOCAB, num_shards=2, store=store, name="t-fp8", checkpoint=str(tmp_path / "ckpt"))
    try:
        assert {d["dtype"] for d in svc.describe()} == {"fp8_e4m3"}
        ids = rng.integers(0, layout.total_rows, size=(2, 2, 3, 24))
        with svc.agent_client() as agent:
            fetch = RemoteMemory(agent).fetch(ids, requires_grad=False)
            table = np.concatenate(want)
            for li in (0, 1):
                np.testing.assert_array_equal(fetch.rows(li).numpy(), table[ids[li]].reshape(2, 3, -1))
    finally:
        svc.shutdown()
