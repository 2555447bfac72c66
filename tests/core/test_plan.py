"""Capacity planning from a TableLayout: nodes, shards, GiB and bytes per token."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_ray import config as C
from engram_ray.core.layout import TableLayout
from engram_ray.core.plan import optimizer_state_bytes_per_row, plan_capacity

GIB = 2**30


@pytest.fixture(scope="module")
def table_100b(gpt2_vocab):
    return TableLayout.build(C.with_table_params(C.paper_27b(), 100e9), gpt2_vocab)


def test_a_100b_table_in_bf16_fits_one_512_gib_node(table_100b):
    p = plan_capacity(table_100b, dtype="bf16", node_ram_gib=512)
    assert 100e9 <= p.table_params < 100.01e9  # primes just above the even split
    assert p.table_bytes == table_100b.total_rows * 80 * 2 and p.resident_bytes == p.table_bytes
    assert (p.memory_nodes, p.shards, p.shards_per_node) == (1, 4, 4)
    assert p.usable_gib_per_node == pytest.approx(512 * 0.8)
    assert p.gib_per_node == pytest.approx(4 * math.ceil(table_100b.total_rows / 4) * 160 / GIB)
    # per token: 2 layers x 16 heads, 8 B of id out and 160 B of row back each
    assert p.ids_per_token == 32 and p.lookup_bytes_per_token == 32 * 168
    assert p.lookup_gbit_per_s == pytest.approx(32 * 168 * 10_000 * 8 / 1e9)
    assert p.ray_resources() == {"engram_memory": 4, "engram_memory_gib": 409}


def test_training_state_and_replicas_add_nodes(table_100b):
    p = plan_capacity(table_100b, dtype="bfloat16", node_ram_gib=512, optimizer="adam", replicas=2,
                      dedup_ratio=0.5, tokens_per_s=1000)
    per_row = 160 + optimizer_state_bytes_per_row("adam", 80)
    assert optimizer_state_bytes_per_row("adam", 80) == 2 * 4 * 80 + 8
    assert p.resident_bytes == 2 * table_100b.total_rows * per_row
    assert p.memory_nodes >= 2 and p.gib_per_node <= p.usable_gib_per_node
    assert p.memory_nodes * p.shards_per_node >= p.shards * p.replicas
    assert p.push_bytes_per_token == 16 * (8 + 80 * 4)
    assert p.train_gbit_per_s > p.lookup_gbit_per_s


def test_a_fixed_shard_count_sets_the_nodes(table_100b):
    p = plan_capacity(table_100b, dtype="float32", node_ram_gib=128, shards=16, shards_per_node=8)
    assert p.shards == 16 and p.shard_gib * p.shards_per_node <= p.usable_gib_per_node
    assert p.memory_nodes == math.ceil(16 / p.shards_per_node)


@pytest.mark.parametrize("kw, match", [
    (dict(dtype="int8"), "storage dtype 'int8'"),
    (dict(node_ram_gib=0), "node_ram_gib=0"),
    (dict(headroom=1.0), "headroom=1.0"),
    (dict(replicas=0), "replicas=0"),
    (dict(shards=0), "shards=0"),
    (dict(dedup_ratio=0), "dedup_ratio=0"),
    (dict(optimizer="lion"), "optimizer 'lion'"),
    (dict(node_ram_gib=1, shards=1), "one shard needs .* GiB but a node gives shards 0.8 GiB"),
])
def test_bad_inputs_are_named(table_100b, kw, match):
    with pytest.raises(ValueError, match=match):
        plan_capacity(table_100b, **kw)


def test_resizing_keeps_the_geometry():
    cfg = C.with_table_params(C.paper_27b(), 100e9)
    assert cfg.layer_ids == C.paper_27b().layer_ids and cfg.row_dim == 80
    assert cfg.engram_vocab_size == (39_062_500, 39_062_500) == C.table_100b().engram_vocab_size
    with pytest.raises(ValueError, match="table_params=10: too small"):
        C.with_table_params(C.paper_27b(), 10)


@settings(max_examples=60, deadline=None)
@given(ram=st.floats(8, 4096), headroom=st.floats(0, 0.9), replicas=st.integers(1, 3),
       spn=st.integers(1, 16), opt=st.sampled_from(["none", "sgd", "adam"]))
def test_every_plan_fits_its_nodes(table_100b, ram, headroom, replicas, spn, opt):
    try:
        p = plan_capacity(table_100b, node_ram_gib=ram, headroom=headroom, replicas=replicas,
                          shards_per_node=spn, optimizer=opt)
    except ValueError as e:
        assert "one shard needs" in str(e)
        return
    assert p.gib_per_node <= p.usable_gib_per_node + 1e-9
    assert p.memory_nodes >= replicas and p.memory_nodes * p.shards_per_node >= p.shards * replicas
    assert p.shards * p.shard_gib * GIB >= table_100b.total_rows * (p.resident_bytes / replicas / table_100b.total_rows)


def test_one_shard_formula_for_the_plan_and_the_deploy_reservation(table_100b):
    from engram_ray.config import OptimizerConfig, StoreConfig
    from engram_ray.core.plan import bytes_per_row, shard_bytes, shard_gib

    assert bytes_per_row(80, "bf16", "adam") == 160 + 2 * 4 * 80 + 8
    assert bytes_per_row(80, "float32", "none") == 320
    p = plan_capacity(table_100b, dtype="bf16", node_ram_gib=512, optimizer="adam", shards=8)
    one = shard_bytes(table_100b, 8, dtype="bfloat16", optimizer="adam")
    assert one == math.ceil(table_100b.total_rows / 8) * bytes_per_row(80, "bf16", "adam")
    assert p.shard_gib == one / GIB
    store = StoreConfig(dtype="bfloat16", optimizer=OptimizerConfig(kind="adam"))
    assert shard_gib(table_100b, store, 8) == math.ceil(p.shard_gib)  # what deploy reserves
    # a resident cap bounds the rows a shard holds, and so what it reserves (at least 1 GiB)
    capped = StoreConfig(resident_rows_per_shard=1000)
    assert shard_bytes(table_100b, 8, dtype="float32", optimizer="adam", resident_rows_per_shard=1000) == \
        1000 * bytes_per_row(80, "float32", "adam")
    assert shard_gib(table_100b, capped, 8) == 1


def test_a_resident_cap_splits_evenly_or_is_not_needed(table_100b):
    from engram_ray.core.plan import resident_rows_per_shard

    per_shard = resident_rows_per_shard(table_100b, "float32", 2, 1 / 16)
    assert per_shard == 2**26 // 320 // 2 and per_shard * 2 * 320 <= 2**26
    assert resident_rows_per_shard(table_100b, "float32", 2, 1e6) == 0  # every row fits: no cap
    with pytest.raises(ValueError, match="max_resident_gib=0"):
        resident_rows_per_shard(table_100b, "float32", 2, 0)


def test_the_memory_resource_names_are_the_ones_the_cluster_files_declare():
    from engram_ray.core.plan import MEMORY_GIB_RESOURCE, MEMORY_RESOURCE

    # users type these into their cluster files: renaming them breaks every deployed cluster
    assert (MEMORY_RESOURCE, MEMORY_GIB_RESOURCE) == ("engram_memory", "engram_memory_gib")
