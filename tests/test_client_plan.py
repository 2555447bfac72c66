"""engram_ray.client.plan without any server: ids split by shard and message size, rows
scattered back into the caller's shape, and message sizes that real messages fit."""

import ast
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_ray.client import plan
from engram_ray.core.layout import ShardPlan
from engram_ray.errors import InvalidRequest


@st.composite
def ids_and_shards(draw):
    total = draw(st.integers(1, 5000))
    shards = draw(st.integers(1, min(total, 9)))
    n = draw(st.integers(0, 400))
    ids = np.array(draw(st.lists(st.integers(0, total - 1), min_size=n, max_size=n)), dtype=np.int64)
    return ids, ShardPlan(total, shards), draw(st.integers(1, 50))


@settings(max_examples=200, deadline=None)
@given(ids_and_shards())
def test_split_tiles_the_ids_in_order_within_one_shard_and_the_step(case):
    ids, shard_plan, step = case
    uniq, _ = plan.dedup(ids)
    parts = plan.split(uniq, shard_plan.bounds, step)
    at = 0
    for s, a, b in parts:
        assert a == at and 0 < b - a <= step  # in order, no gap, none empty, none too long
        lo, hi = shard_plan.shard_range(s)
        assert lo <= uniq[a] and uniq[b - 1] < hi  # all of one shard's
        at = b
    assert at == uniq.size
    # each shard's ids in as few messages as the step allows
    per_shard = np.bincount(shard_plan.locate(uniq)[0], minlength=shard_plan.num_shards)
    assert len(parts) == sum(-(-int(n) // step) for n in per_shard)


@settings(max_examples=200, deadline=None)
@given(ids_and_shards(), st.sampled_from([(-1,), (2, -1), (1, 2, -1)]))
def test_dedup_then_scatter_gives_every_id_its_row_in_the_callers_shape(case, shape):
    ids, _, _ = case
    if len(shape) > 1 and ids.size % int(np.prod(shape[:-1])):
        ids = ids[: ids.size - ids.size % int(np.prod(shape[:-1]))]
    ids_shaped = ids.reshape(shape) if ids.size else ids.reshape((0,) * (len(shape) - 1) + (0,))
    _, flat = plan.flat_ids(ids_shaped, 5000)
    uniq, inverse = plan.dedup(flat)
    want_uniq, want_inverse = np.unique(flat, return_inverse=True)  # what dedup does, faster
    assert np.array_equal(want_uniq, uniq) and uniq.dtype == np.int64
    assert inverse is None or (np.array_equal(want_inverse.reshape(-1), inverse) and inverse.dtype == np.intp)
    rows_of = lambda x: np.stack([x, -x, x * 2], axis=-1).astype(np.float32)  # noqa: E731 - a row per id
    out = plan.scatter(rows_of(uniq), inverse, ids_shaped.shape)
    assert out.shape == ids_shaped.shape + (3,) and np.array_equal(out, rows_of(ids_shaped))


def test_sorted_unique_ids_are_used_as_they_are():
    flat = np.array([1, 5, 9], dtype=np.int64)
    uniq, inverse = plan.dedup(flat)
    assert uniq is flat and inverse is None
    for few in (np.array([], np.int64), np.array([7])):
        assert plan.dedup(few)[1] is None
    uniq, inverse = plan.dedup(np.array([5, 1, 5]))
    assert uniq.tolist() == [1, 5] and inverse.tolist() == [1, 0, 1]


def test_flat_ids_are_checked_and_copied_on_request():
    src = np.arange(6, dtype=np.int64).reshape(2, 3)
    ids, flat = plan.flat_ids(src, 6, copy=True)
    assert ids.shape == (2, 3) and flat.tolist() == list(range(6)) and not np.shares_memory(flat, src)
    assert np.shares_memory(plan.flat_ids(src, 6)[1], src)  # no copy unless asked
    assert plan.flat_ids(np.arange(3, dtype=np.uint8), 6)[1].dtype == np.int64
    for bad, match in [(np.array([0.0]), "must be integers"), (np.array([6]), "row id 6 is outside"),
                       (np.array([-1, 2]), "row id -1 is outside"), (["a"], "must be integers"),
                       (np.array([2**64 - 1], np.uint64), f"row id {2**64 - 1} is outside")]:  # not wrapped to -1
        with pytest.raises(InvalidRequest, match=match):
            plan.flat_ids(bad, 6)


def test_gradients_are_checked_before_anything_is_sent():
    g = plan.check_grads((2, 3), np.ones((2, 3, 4), np.float16), 4)
    assert g.shape == (6, 4) and g.dtype == np.float32
    with pytest.raises(InvalidRequest, match=r"expected \(2, 3, 4\)"):
        plan.check_grads((2, 3), np.ones((6, 4)), 4)
    with pytest.raises(InvalidRequest, match="NaN or Inf"):
        plan.check_grads((1,), np.array([[0.0, np.inf]]), 2)


def test_split_refuses_a_step_below_one():
    with pytest.raises(ValueError, match="step=0"):
        plan.split(np.arange(3), np.array([0, 3]), 0)


@settings(max_examples=150, deadline=None)
@given(client_limit=st.integers(1 << 16, 1 << 27), chunk=st.integers(1, 1 << 22),
       shard_limits=st.lists(st.integers(8192, 1 << 27), min_size=1, max_size=4),
       max_ids=st.lists(st.integers(1, 1 << 20), min_size=1, max_size=4),
       dim=st.integers(1, 1024), itemsize=st.sampled_from([2, 4]))
def test_messages_of_the_planned_sizes_fit_every_limit(client_limit, chunk, shard_limits, max_ids, dim, itemsize):
    """Real messages of ``lookup_rows`` rows and ``push_rows`` ids and float32 gradients fit
    the client's limit, each shard's (with the shard's own margins: 1 KiB on an answer, 64 B
    for a primary to wrap a push) and each shard's id limit."""
    from engram_ray.rpc import codec
    from engram_ray.rpc.generated import engram_pb2 as pb
    from engram_ray.rpc.servicer import FORWARD_OVERHEAD
    sizes = plan.MessageSizes.fit(max_message_bytes=client_limit, chunk_bytes=chunk, shard_message_bytes=shard_limits,
                                  shard_max_ids=max_ids, row_dim=dim, row_itemsize=itemsize)
    tightest = min([client_limit, *shard_limits])
    assert sizes.limit <= tightest and 1 <= sizes.push_rows <= sizes.lookup_rows <= min(max_ids)
    if dim * itemsize + plan.HEADROOM > sizes.limit:
        return  # a row wider than a message: one row per message is all there is
    n = sizes.lookup_rows
    answer = pb.LookupResponse(rows=codec.encode(np.zeros((n, dim), np.float16 if itemsize == 2 else np.float32)))
    assert answer.ByteSize() <= sizes.limit and n * dim * itemsize + 1024 <= tightest
    n = sizes.push_rows
    push = pb.ApplyGradientsRequest(fingerprint="engram-" + "f" * 16, row_ids=codec.encode(np.arange(n)),
                                    grads=codec.encode(np.zeros((n, dim), np.float32)), request_id="c" * 12 + "-" * 12)
    assert push.ByteSize() + FORWARD_OVERHEAD <= sizes.limit


def test_planning_needs_no_grpc():
    source = (Path(__file__).resolve().parents[1] / "engram_ray" / "client" / "plan.py").read_text()
    imported = {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert not [m for m in imported if "grpc" in m or "rpc" in m], imported
