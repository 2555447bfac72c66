"""The paper's training recipe: ShortConv zero-initialised, weight decay only on the backbone's
matrices, and the rows' learning rate at 5x the backbone's schedule, sent with every push and
applied by the shards (and by LocalMemory) -- refused when it is not a sane rate."""

import dataclasses

import numpy as np
import pytest
import torch

from engram_ray import config as C
from engram_ray.client import EngramClient
from engram_ray.config import OptimizerConfig, StoreConfig, TrainConfig
from engram_ray.core.optim import SparseOptimizer
from engram_ray.core.tokens import CompressedVocab
from engram_ray.errors import InvalidRequest
from engram_ray.model import EngramLM, LocalMemory
from engram_ray.model.engram import EngramLayer, ShortConv
from engram_ray.model.hyper import HyperConnection
from engram_ray.training import Trainer, decay_groups

from .test_client import Cluster


def test_short_conv_starts_at_zero_as_the_paper_says_and_as_the_reference_on_request():
    mc = dataclasses.replace(C.model_tiny(), hc_mult=2)
    paper = EngramLM(mc, C.tiny())
    convs = [m.conv.weight for m in paper.modules() if isinstance(m, ShortConv)]
    assert convs and all(torch.count_nonzero(w) == 0 for w in convs)
    ref = EngramLM(mc, dataclasses.replace(C.tiny(), short_conv_init="default"))
    assert all(torch.count_nonzero(m.conv.weight) > 0 for m in ref.modules() if isinstance(m, ShortConv))
    assert C.reference_demo().short_conv_init == "default"
    with pytest.raises(ValueError, match="short_conv_init"):
        dataclasses.replace(C.tiny(), short_conv_init="xavier")


def test_weight_decay_only_on_the_backbones_matrices():
    model = EngramLM(dataclasses.replace(C.model_tiny(), hc_mult=2), C.tiny())
    decay, no_decay = decay_groups(model)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    decayed = {id(p) for p in decay}
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, (EngramLayer, ShortConv, HyperConnection)) or p.dim() < 2:
                assert id(p) not in decayed, (type(m).__name__, name)
    engram = next(m for m in model.modules() if isinstance(m, EngramLayer))
    assert engram.norm_k.dim() == 2 and id(engram.norm_k) not in decayed      # [n, D]: a gain
    assert id(engram.key_proj.weight) in decayed                              # a matrix
    assert id(next(m for m in model.modules() if isinstance(m, HyperConnection)).mix) not in decayed


def test_the_optimiser_steps_at_the_rate_it_is_given():
    opt = SparseOptimizer(OptimizerConfig(kind="sgd", lr=0.1), 4, 2)
    w, g = np.ones((1, 2), np.float32), np.ones((1, 2), np.float32)
    assert np.allclose(opt.step(w, np.array([0]), g), 0.9)
    assert np.allclose(opt.step(w, np.array([0]), g, lr=0.5), 0.5)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 50, size=4000), rng.integers(0, 50, size=1000)


def test_the_rows_follow_five_times_the_backbones_schedule(data, tiny_layout):
    """A trainer pushes at table_lr_mult x its scheduled rate: warmup, then decay."""
    store = StoreConfig(init_std=0.02, optimizer=OptimizerConfig(kind="sgd", lr=1.0))
    mem = LocalMemory(tiny_layout, init_std=0.02, optimizer=store.optimizer)
    seen = []
    update = mem.update
    mem.update = lambda fetch, lr=None: seen.append(lr) or update(fetch, lr)   # records each push's rate
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=3, table_lr_mult=5.0)
    mc, vocab = dataclasses.replace(C.model_tiny(), vocab_size=50), CompressedVocab(np.arange(50))
    t = Trainer(mc, C.tiny(), vocab, mem, *data, cfg=cfg)
    lrs = []
    for _ in range(cfg.steps):
        lrs.append(t._lr())
        t.train_step()
    assert seen == pytest.approx([5 * x for x in lrs])
    assert seen[0] < seen[2] and seen[-1] < seen[3]          # warmup, then decay
    off = Trainer(mc, C.tiny(), vocab, mem, *data, cfg=dataclasses.replace(cfg, table_lr_mult=0.0))
    assert off.table_lr() is None                             # the table's own rate
    with pytest.raises(ValueError, match="table_lr_mult"):
        TrainConfig(lr=1.0, table_lr_mult=20.0)              # 20 x 1.0 is past any sane rate
    edge = Trainer(mc, C.tiny(), vocab, mem, *data, cfg=dataclasses.replace(cfg, lr=3e-3, table_lr_mult=10 / 3e-3))
    edge.step_count = cfg.warmup_steps                       # the schedule's peak: 10.000000000000002 unclamped
    assert edge.table_lr() == 10.0


def test_a_push_carries_its_rate_to_the_shards_and_bad_rates_are_refused(tiny_layout):
    store = StoreConfig(init_std=0.5, optimizer=OptimizerConfig(kind="sgd", lr=1.0))
    c = Cluster(tiny_layout, 2, store=store)
    try:
        with EngramClient(c.addresses, tiny_layout) as client:
            ids, g = np.array([3, tiny_layout.total_rows - 2]), np.ones((2, 16), np.float32)
            before = client.lookup(ids)
            client.push_gradients(ids, g, lr=0.25)
            assert np.allclose(client.lookup(ids), before - 0.25)
            client.push_gradients(ids, g)                          # the shards' own: 1.0
            assert np.allclose(client.lookup(ids), before - 1.25)
            for bad in (0.0, -1.0, float("nan"), float("inf"), 11.0, 5e-324, 1e-40, True):
                with pytest.raises(ValueError, match="learning rate"):
                    client.push_gradients(ids, g, lr=bad)
            assert np.allclose(client.lookup(ids), before - 1.25)  # nothing applied
        # a raw request past the client's checks: the shard refuses it, rows untouched
        with pytest.raises(InvalidRequest, match="learning rate"):
            c.shards[0].apply_gradients(np.array([3]), np.ones((1, 16), np.float32), lr=float("nan"))
        with pytest.raises(InvalidRequest, match="learning rate"):   # rounds to 0 in float32
            c.shards[0].apply_gradients(np.array([3]), np.ones((1, 16), np.float32), lr=1e-46)
    finally:
        c.stop()
