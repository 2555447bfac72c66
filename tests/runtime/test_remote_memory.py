"""LocalMemory and RemoteMemory give the same logits and the same updated rows."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engram_ray import config as C
from engram_ray.client import EngramClient
from engram_ray.config import OptimizerConfig, StoreConfig
from engram_ray.core.indexer import RowIndexer
from engram_ray.core.layout import TableLayout
from engram_ray.core.tokens import CompressedVocab
from engram_ray.model import EngramLM, LocalMemory, Memory, MemoryFetch
from engram_ray.remote_memory import RemoteMemory
from engram_ray.rpc import create_server
from engram_ray.store import TableShard


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_local_and_remote_memory_agree_on_logits_and_updated_rows(kind):
    mc, ec = C.model_tiny(), C.tiny()
    vocab = CompressedVocab(np.arange(mc.vocab_size) // 2)
    indexer = RowIndexer.build(ec, vocab)
    layout = indexer.layout
    store = StoreConfig(init_std=0.5, optimizer=OptimizerConfig(kind=kind, lr=0.05))
    shards = [TableShard.create(layout, 3, i, store) for i in range(3)]
    servers = [create_server(s, "127.0.0.1", 0) for s in shards]
    client = EngramClient([f"127.0.0.1:{p}" for _, p in servers], layout)
    try:
        torch.manual_seed(0)
        model_l = EngramLM(mc, ec)
        model_r = copy.deepcopy(model_l)
        local = LocalMemory(layout, init_std=0.5, optimizer=store.optimizer)
        remote = RemoteMemory(client)
        tok = torch.randint(0, mc.vocab_size, (4, 24))
        tok[:, 10:14] = tok[:, :4]  # repeated n-grams: duplicate rows in the batch
        rows = indexer.rows(tok.numpy())
        assert isinstance(local, Memory) and isinstance(remote, Memory)
        for _ in range(2):
            f_l, f_r = local.fetch(rows), remote.fetch(rows)
            assert isinstance(f_l, MemoryFetch) and isinstance(f_r, MemoryFetch)
            logits_l, logits_r = model_l(tok, f_l), model_r(tok, f_r)
            assert torch.equal(logits_l, logits_r)
            F.cross_entropy(logits_l.flatten(0, 1), tok.flatten()).backward()
            F.cross_entropy(logits_r.flatten(0, 1), tok.flatten()).backward()
            n_l, n_r = local.update(f_l), remote.update(f_r)
            assert n_l == n_r == np.unique(rows).size
            assert local.update(f_l) == remote.update(f_r) == 0  # a fetch's gradient applies once
            assert f_r.fetch_seconds > 0 and f_r.wait_seconds >= 0
        remote_table = client.lookup(np.arange(layout.total_rows))
        assert np.array_equal(remote_table, local.table.detach().numpy())
        assert not np.array_equal(remote_table, TableShard.create(layout, 1, 0, store).values)
    finally:
        client.close()
        for srv, _ in servers:
            srv.stop(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rows_reach_the_gpu_through_pinned_buffers_on_a_side_stream():
    mc, ec = C.model_tiny(), C.tiny()
    vocab = CompressedVocab(np.arange(mc.vocab_size) // 2)
    layout = TableLayout.build(ec, vocab)
    shard = TableShard.create(layout, 1, 0, StoreConfig(dtype="bfloat16"))
    server, port = create_server(shard, "127.0.0.1", 0)
    client = EngramClient([f"127.0.0.1:{port}"], layout)
    try:
        remote = RemoteMemory(client, device="cuda")
        rows = np.arange(2 * 3 * 5 * ec.heads_per_layer).reshape(2, 3, 5, ec.heads_per_layer)
        f = remote.fetch(rows)
        t = f.rows(1)
        assert t.is_cuda and t.shape == (3, 5, ec.heads_per_layer * layout.row_dim)
        want = torch.from_numpy(shard.values[rows[1]].astype(np.float32)).flatten(-2)
        assert torch.equal(t.cpu(), want)
    finally:
        client.close()
        server.stop(0)


def test_on_demand_fetch_reads_the_same_rows_later():
    ec = C.tiny()
    layout = TableLayout.build(ec, CompressedVocab(np.arange(50)))
    shard = TableShard.create(layout, 1, 0)
    server, port = create_server(shard, "127.0.0.1", 0)
    client = EngramClient([f"127.0.0.1:{port}"], layout)
    try:
        rows = np.random.default_rng(0).integers(0, layout.total_rows, size=(2, 2, 5, ec.heads_per_layer))
        lazy = RemoteMemory(client, prefetch=False).fetch(rows, requires_grad=False)
        assert lazy.pending == [None, None] and client.stats()["lookups"] == 0  # nothing sent yet
        eager = RemoteMemory(client).fetch(rows, requires_grad=False)
        assert client.stats()["lookups"] == 2
        for li in range(2):
            assert torch.equal(lazy.rows(li), eager.rows(li))
        assert client.stats()["lookups"] == 4
    finally:
        client.close()
        server.stop(0)


def test_a_memory_updates_only_its_own_fetches():
    ec = C.tiny()
    layout = TableLayout.build(ec, CompressedVocab(np.arange(50)))
    shard = TableShard.create(layout, 1, 0)
    server, port = create_server(shard, "127.0.0.1", 0)
    client = EngramClient([f"127.0.0.1:{port}"], layout)
    try:
        remote, local = RemoteMemory(client), LocalMemory(layout)
        rows = np.zeros((2, 1, 1, ec.heads_per_layer), np.int64)
        with pytest.raises(ValueError, match="RemoteMemory.update: pass a fetch of this memory"):
            remote.update(local.fetch(rows))
        with pytest.raises(ValueError, match="LocalMemory.update: pass a fetch of this memory"):
            local.update(RemoteMemory(client).fetch(rows))
    finally:
        client.close()
        server.stop(0)
