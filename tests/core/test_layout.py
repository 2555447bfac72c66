import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_ray import config as C
from engram_ray.core.hashing import NgramHasher
from engram_ray.core.layout import ShardPlan, TableLayout, dtype_bytes
from engram_ray.core.tokens import CompressedVocab


@pytest.fixture(scope="module")
def small_vocab():
    return CompressedVocab(np.array([0, 1, 1, 2, 3, 0, 4], dtype=np.int64))


def test_paper_27b_sizes(gpt2_vocab):
    layout = TableLayout.build(C.paper_27b(), gpt2_vocab)
    assert layout.num_heads == 16 and layout.row_dim == 80
    # 32 heads, each a prime just above 2,262,400
    assert all(2_262_400 <= p < 2_262_400 + 2000 for hs in layout.head_sizes for p in hs)
    assert layout.total_rows == sum(sum(h) for h in layout.head_sizes)
    assert 5.78e9 < layout.num_params < 5.80e9
    assert layout.nbytes("bf16") == layout.num_params * 2 == layout.nbytes("float32") // 2


def test_100b_preset_is_a_100b_table(gpt2_vocab):
    layout = TableLayout.build(C.table_100b(), gpt2_vocab)
    assert 0.999e11 < layout.num_params < 1.001e11


def test_offsets_are_hashing_order_cumsum(small_vocab):
    cfg = C.tiny()
    layout = TableLayout.build(cfg, small_vocab)
    flat = [p for hs in layout.head_sizes for p in hs]
    assert layout.offsets.ravel().tolist() == [sum(flat[:i]) for i in range(len(flat))]
    assert layout.offsets.shape == (2, cfg.heads_per_layer)
    assert not layout.offsets.flags.writeable
    hasher = NgramHasher.from_vocab(cfg, small_vocab)
    assert layout.head_sizes[0] == tuple(p for o in hasher.table_sizes(1) for p in o)


def test_row_ids_cover_the_global_space_without_overlap(small_vocab):
    cfg = C.tiny()
    layout = TableLayout.build(cfg, small_vocab)
    hasher = NgramHasher.from_vocab(cfg, small_vocab)
    x = np.random.default_rng(0).integers(0, small_vocab.size, size=(3, 50))
    stacked = layout.row_ids_stacked(hasher.hash_stacked(x))
    for i, layer in enumerate(cfg.layer_ids):
        per = layout.row_ids(layer, hasher.hash(x)[layer])
        assert np.array_equal(stacked[i], per)
        # head j's rows fall inside head j's range
        lo = layout.offsets[i]
        hi = lo + np.array(layout.head_sizes[i])
        assert ((per >= lo) & (per < hi)).all()
    assert stacked.min() >= 0 and stacked.max() < layout.total_rows


def test_fingerprint_changes_with_anything_that_moves_an_id(small_vocab):
    base = TableLayout.build(C.tiny(), small_vocab)
    fp = base.fingerprint
    assert fp.startswith("engram-") and len(fp) == len("engram-") + 16
    assert TableLayout.build(C.tiny(), small_vocab).fingerprint == fp
    changes = [
        dataclasses.replace(C.tiny(), seed=1),
        dataclasses.replace(C.tiny(), pad_id=1),
        dataclasses.replace(C.tiny(), layer_ids=(2, 1)),
        dataclasses.replace(C.tiny(), engram_vocab_size=(1000, 1020)),
        dataclasses.replace(C.tiny(), n_embed_per_ngram=64),
        dataclasses.replace(C.tiny(), n_head_per_ngram=4),
    ]
    fps = {TableLayout.build(c, small_vocab).fingerprint for c in changes}
    assert fp not in fps and len(fps) == len(changes)
    other_vocab = CompressedVocab(np.array([0, 1, 1, 2, 3, 4, 0], dtype=np.int64))  # same size
    assert TableLayout.build(C.tiny(), other_vocab).fingerprint != fp
    # 1001 hashes exactly like 1000 (the same primes follow 1000 and 1001): no id moves
    assert TableLayout.build(dataclasses.replace(C.tiny(), engram_vocab_size=(1000, 1001)),
                             small_vocab).fingerprint == fp
    # kernel_size is a model setting, not a table one
    assert TableLayout.build(dataclasses.replace(C.tiny(), kernel_size=2), small_vocab).fingerprint == fp


def test_fingerprint_is_the_same_in_another_process(small_vocab):
    code = ("import numpy as np; from engram_ray import config as C; "
            "from engram_ray.core.layout import TableLayout; from engram_ray.core.tokens import CompressedVocab; "
            "print(TableLayout.build(C.tiny(), CompressedVocab(np.array([0,1,1,2,3,0,4]))).fingerprint)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "99", "PATH": ""})
    assert out.stdout.strip() == TableLayout.build(C.tiny(), small_vocab).fingerprint


def test_layout_dict_round_trip(small_vocab):
    layout = TableLayout.build(C.tiny(), small_vocab)
    again = TableLayout.from_dict(layout.to_dict())
    assert again == layout and again.fingerprint == layout.fingerprint
    with pytest.raises(ValueError, match="unknown key.*'extra'"):
        TableLayout.from_dict({**layout.to_dict(), "extra": 1})
    d = layout.to_dict()
    d.pop("seed")
    with pytest.raises(ValueError, match="missing key.*'seed'"):
        TableLayout.from_dict(d)


def test_dtype_names():
    assert dtype_bytes("bf16") == ("bfloat16", 2)
    assert dtype_bytes("float32") == ("float32", 4)
    with pytest.raises(ValueError, match="storage dtype 'int8'"):
        dtype_bytes("int8")
    with pytest.raises(ValueError, match="layer_id=4 is not an Engram layer"):
        TableLayout.build(C.tiny(), CompressedVocab(np.arange(5))).layer_index(4)


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 10_000), shards=st.integers(1, 64), seed=st.integers(0, 1000))
def test_shard_plan_round_trip(total, shards, seed):
    shards = min(shards, total)
    plan = ShardPlan(total, shards)
    b = plan.bounds
    assert b[0] == 0 and b[-1] == total and (np.diff(b) >= 1).all()
    sizes = np.diff(b)
    assert sizes.max() - sizes.min() <= 1
    rows = np.random.default_rng(seed).integers(0, total, size=200)
    shard, local = plan.locate(rows)
    assert np.array_equal(b[shard] + local, rows)
    assert ((local >= 0) & (local < sizes[shard])).all()
    # brute force owner
    for r, s in zip(rows[:20], shard[:20]):
        lo, hi = plan.shard_range(int(s))
        assert lo <= r < hi
    parts = plan.partition(rows)
    assert len(parts) == shards
    assert sorted(np.concatenate(parts).tolist()) == list(range(rows.size))
    for s, pos in enumerate(parts):
        assert (shard[pos] == s).all()


def test_shard_plan_on_a_100b_table_does_not_overflow(gpt2_vocab):
    layout = TableLayout.build(C.table_100b(), gpt2_vocab)
    plan = ShardPlan(layout.total_rows, 7)
    last = plan.shard_range(6)
    assert last[1] == layout.total_rows
    shard, local = plan.locate(np.array([0, layout.total_rows - 1]))
    assert shard.tolist() == [0, 6] and local[1] == last[1] - last[0] - 1


def test_shard_plan_errors():
    with pytest.raises(ValueError, match="num_shards=5: expected between 1 and the table's 4 rows"):
        ShardPlan(4, 5)
    with pytest.raises(ValueError, match="total_rows=0"):
        ShardPlan(0, 1)
    plan = ShardPlan(10, 2)
    with pytest.raises(ValueError, match="row id 10 is outside the table's 10 rows"):
        plan.locate(np.array([3, 10]))
    with pytest.raises(ValueError, match="row id -1"):
        plan.locate(np.array([-1]))
    with pytest.raises(ValueError, match="shard=2: expected 0..1"):
        plan.shard_range(2)
    with pytest.raises(ValueError, match="must be integers"):
        plan.locate(np.array([1.5]))
