import numpy as np
import pytest

from engram_ray.config import OptimizerConfig, StoreConfig
from engram_ray.errors import CheckpointError, InvalidRequest
from engram_ray.store import TableShard
from engram_ray.store.rows import INIT_BLOCK_ROWS, init_rows


def _full(layout, **kw):
    return TableShard.create(layout, 1, 0, StoreConfig(**kw))


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_the_table_is_the_same_for_any_shard_count(tiny_layout, num_shards):
    full = _full(tiny_layout)
    parts = [TableShard.create(tiny_layout, num_shards, i) for i in range(num_shards)]
    assert np.array_equal(np.concatenate([p.values for p in parts]), full.values)
    assert parts[-1].row_stop == tiny_layout.total_rows


def test_a_row_depends_only_on_seed_and_id():
    a = init_rows(INIT_BLOCK_ROWS - 5, INIT_BLOCK_ROWS + 5, 4, seed=3, std=1.0)
    b = init_rows(0, INIT_BLOCK_ROWS + 10, 4, seed=3, std=1.0)
    assert np.array_equal(a, b[INIT_BLOCK_ROWS - 5:INIT_BLOCK_ROWS + 5])
    assert not np.array_equal(a, init_rows(INIT_BLOCK_ROWS - 5, INIT_BLOCK_ROWS + 5, 4, seed=4, std=1.0))
    c = init_rows(10, 20, 4, seed=3, std=0.5)
    assert np.allclose(c, 0.5 * b[10:20])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_storage_is_the_float32_table_rounded(tiny_layout, dtype):
    lo = _full(tiny_layout, dtype=dtype)
    hi = _full(tiny_layout)
    assert lo.values.dtype.name == dtype
    assert np.array_equal(lo.values, hi.values.astype(lo.values.dtype))
    assert lo.row_bytes == 2 * tiny_layout.row_dim


def test_gather_into_a_preallocated_buffer(tiny_layout):
    s = TableShard.create(tiny_layout, 2, 1)
    rows = np.array([s.row_start, s.row_stop - 1, s.row_start])
    out = np.empty((3, s.dim), np.float32)
    res = s.gather(rows, out=out)
    assert res is out
    assert np.array_equal(out[0], s.values[0]) and np.array_equal(out[1], s.values[-1])
    assert s.counters["rows_served"] == 3
    with pytest.raises(InvalidRequest, match="out is float32 .*expected float32 \\(2, 16\\)"):
        s.gather(rows[:2], out=out)


@pytest.mark.parametrize("rows,match", [
    (np.array([0]), r"row id 0 is outside shard 1's rows \[4107, 8214\)"),
    (np.array([8214]), "row id 8214 is outside"),
    (np.array([-3]), "row id -3 is outside"),
    (np.array([[4200]]), r"must be 1-D, got shape \(1, 1\)"),
    (np.array([4200.0]), "must be integers, got dtype float64"),
])
def test_bad_ids_are_named(tiny_layout, rows, match):
    s = TableShard.create(tiny_layout, 2, 1)
    with pytest.raises(InvalidRequest, match=match):
        s.gather(rows)


def test_sgd_step_and_duplicate_ids_are_summed(tiny_layout):
    s = _full(tiny_layout, optimizer=OptimizerConfig(kind="sgd", lr=0.5))
    before = s.values.copy()
    rows = np.array([7, 3, 7])
    g = np.arange(3 * s.dim, dtype=np.float32).reshape(3, s.dim)
    assert s.apply_gradients(rows, g) == 2
    assert np.allclose(s.values[7], before[7] - 0.5 * (g[0] + g[2]))
    assert np.allclose(s.values[3], before[3] - 0.5 * g[1])
    untouched = np.ones(len(before), bool)
    untouched[[3, 7]] = False
    assert np.array_equal(s.values[untouched], before[untouched])


def test_adam_matches_the_formula_with_per_row_steps(tiny_layout):
    cfg = OptimizerConfig(kind="adam", lr=0.01, beta1=0.8, beta2=0.95, eps=1e-6)
    s = _full(tiny_layout, optimizer=cfg)
    w0 = s.values[[5, 9]].astype(np.float64)
    rng = np.random.default_rng(0)
    g1, g2 = rng.normal(size=(2, s.dim)), rng.normal(size=(1, s.dim))
    s.apply_gradients(np.array([5, 9]), g1.astype(np.float32))
    s.apply_gradients(np.array([5]), g2.astype(np.float32))   # row 5: step 2, row 9: step 1

    def adam(w, grads):
        m = v = 0.0
        for t, g in enumerate(grads, 1):
            m = cfg.beta1 * m + (1 - cfg.beta1) * g
            v = cfg.beta2 * v + (1 - cfg.beta2) * g * g
            w = w - cfg.lr * (m / (1 - cfg.beta1 ** t)) / (np.sqrt(v / (1 - cfg.beta2 ** t)) + cfg.eps)
        return w

    assert np.allclose(s.values[5], adam(w0[0], [g1[0], g2[0]]), atol=1e-6)
    assert np.allclose(s.values[9], adam(w0[1], [g1[1]]), atol=1e-6)
    assert s.optimizer.steps[[5, 9]].tolist() == [2, 1]


@pytest.mark.parametrize("rows,grads,match", [
    (np.array([1, 2]), np.full((2, 16), np.nan, np.float32), "row id 1 is not finite"),
    (np.array([1, 2]), np.array([[0.0] * 16, [np.inf] * 16], np.float32), "row id 2 is not finite"),
    (np.array([1, 2]), np.zeros((2, 15), np.float32), r"shape \(2, 15\); expected \(2, 16\)"),
    (np.array([1, 9000]), np.zeros((2, 16), np.float32), "row id 9000 is outside"),
    (np.array([1]), np.zeros((1, 16), np.int64), "floating point"),
])
def test_a_rejected_update_changes_nothing(tiny_layout, rows, grads, match):
    s = _full(tiny_layout)
    before = s.checksum()
    with pytest.raises(InvalidRequest, match=match):
        s.apply_gradients(rows, grads)
    assert s.checksum() == before and s.optimizer.steps.sum() == 0


def test_a_table_without_optimiser_refuses_updates(tiny_layout):
    s = _full(tiny_layout, optimizer=OptimizerConfig(kind="none"))
    with pytest.raises(ValueError, match="without an optimiser"):
        s.apply_gradients(np.array([1]), np.zeros((1, 16), np.float32))


def test_checkpoint_reloads_into_another_shard_count(tiny_layout, tmp_path):
    store = StoreConfig(dtype="bfloat16", optimizer=OptimizerConfig(kind="adam", lr=0.1))
    writers = [TableShard.create(tiny_layout, 3, i, store) for i in range(3)]
    rng = np.random.default_rng(1)
    for w in writers:
        rows = rng.integers(w.row_start, w.row_stop, size=50)
        w.apply_gradients(rows, rng.normal(size=(50, w.dim)).astype(np.float32))
        w.save(tmp_path)
    readers = [TableShard.load(tmp_path, tiny_layout, 2, i, store) for i in range(2)]
    cat = lambda parts, f: np.concatenate([f(p) for p in parts])  # noqa: E731
    assert np.array_equal(cat(readers, lambda p: p.values), cat(writers, lambda p: p.values))
    for attr in ("m", "v", "steps"):
        assert np.array_equal(cat(readers, lambda p, a=attr: getattr(p.optimizer, a)),
                              cat(writers, lambda p, a=attr: getattr(p.optimizer, a)))
    # Loading into float32 widens the stored bfloat16 rows exactly.
    wide = TableShard.load(tmp_path, tiny_layout, 1, 0, StoreConfig())
    assert np.array_equal(wide.values, cat(writers, lambda p: p.values).astype(np.float32))


def test_checkpoint_errors_are_clear(tiny_layout, tmp_path):
    shards = [TableShard.create(tiny_layout, 2, i) for i in range(2)]
    with pytest.raises(CheckpointError, match="does not exist"):
        TableShard.load(tmp_path / "none", tiny_layout, 1, 0)
    shards[0].save(tmp_path)
    with pytest.raises(CheckpointError, match=r"does not cover rows \[4107, 8214\)"):
        TableShard.load(tmp_path, tiny_layout, 1, 0)
    shards[1].save(tmp_path)
    other = TableShard(fingerprint="engram-other", row_start=0, row_stop=10, dim=16)
    other_dir = tmp_path / "other"
    other.save(other_dir)
    with pytest.raises(CheckpointError, match="written for layout 'engram-other'"):
        TableShard.load(other_dir, tiny_layout, 1, 0)
    # flipped bytes in the Adam state, then in the rows: checksums catch both
    def flip(path):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))

    flip(sorted(tmp_path.glob("rows-*.adam_v.npy"))[0])
    assert TableShard.load(tmp_path, tiny_layout, 1, 0, StoreConfig(optimizer=OptimizerConfig(kind="sgd")))
    with pytest.raises(CheckpointError, match="adam_v state fails its checksum"):
        TableShard.load(tmp_path, tiny_layout, 1, 0)
    flip(sorted(tmp_path.glob("rows-*[0-9].npy"))[0])
    with pytest.raises(CheckpointError, match="fails its checksum: the file is corrupt"):
        TableShard.load(tmp_path, tiny_layout, 1, 0)


def test_a_capped_shard_maps_rows_into_its_resident_store(tiny_layout, tmp_path):
    cap = StoreConfig(resident_rows_per_shard=1000, optimizer=OptimizerConfig(kind="adam"))
    s = TableShard.create(tiny_layout, 2, 1, cap)
    full = TableShard.create(tiny_layout, 2, 1)
    assert s.capped and s.resident_rows == 1000 and s.values.shape == (1000, 16)
    assert s.num_rows == full.num_rows == 4107
    assert s.nbytes == 1000 * 16 * 4  # no optimiser state for a lookup-only table
    # resident row p holds global row row_start + p; logical row r reads resident r mod 1000
    assert np.array_equal(s.values, full.values[:1000])
    rows = np.array([s.row_start + 5, s.row_start + 1005, s.row_stop - 1])
    assert np.array_equal(s.gather(rows), full.values[[5, 5, (s.num_rows - 1) % 1000]])
    with pytest.raises(InvalidRequest, match="keeps 1000 of its 4107 rows resident"):
        s.apply_gradients(rows[:1], np.zeros((1, 16), np.float32))
    with pytest.raises(InvalidRequest, match="capped benchmark table"):
        s.save(tmp_path)
    assert s.describe()["resident_rows"] == 1000
    # a cap above the shard's rows changes nothing
    big = TableShard.create(tiny_layout, 2, 1, StoreConfig(resident_rows_per_shard=10**6))
    assert not big.capped and np.array_equal(big.values, full.values)


# Hardening (issue 11): rows are read whole, gradients of any accepted dtype, and no step
# ever stores a value that is not finite.

def test_a_gather_concurrent_with_updates_never_returns_a_torn_row():
    """Row r holds the constant k after k SGD steps of gradient -1 (lr 1): a row that mixes
    two values was read half before and half after an update."""
    import threading
    dim, n = 1 << 15, 8  # 128 KiB rows: a copy of one takes long enough to overlap a write
    s = TableShard(fingerprint="f", row_start=0, row_stop=n, dim=dim,
                   store=StoreConfig(optimizer=OptimizerConfig(kind="sgd", lr=1.0)),
                   values=np.zeros((n, dim), np.float32))
    ids, g = np.arange(n), np.full((n, dim), -1.0, np.float32)
    stop, torn, reads = threading.Event(), [], [0]

    def read():
        while not stop.is_set():
            rows = s.gather(ids)
            reads[0] += 1
            torn.extend(int(r) for r in np.flatnonzero(rows.min(axis=1) != rows.max(axis=1)))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for _ in range(300):
        s.apply_gradients(ids, g)
    stop.set()
    for t in readers:
        t.join()
    assert reads[0] > 10 and not torn, f"{len(torn)} torn rows in {reads[0]} gathers"
    assert np.all(s.values == 300)


def test_bfloat16_and_float16_gradients_are_widened_and_applied(tiny_layout):
    import ml_dtypes
    g32 = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    for dt in (ml_dtypes.bfloat16, np.float16):
        g = g32.astype(dt)
        a = _full(tiny_layout, optimizer=OptimizerConfig(kind="adam", lr=0.1))
        b = _full(tiny_layout, optimizer=OptimizerConfig(kind="adam", lr=0.1))
        assert a.apply_gradients(np.array([1, 2, 1]), g) == 2
        b.apply_gradients(np.array([1, 2, 1]), g.astype(np.float32))
        assert a.checksum() == b.checksum()


@pytest.mark.parametrize("kind,dtype,ids,grad,match", [
    # each gradient is finite, their sum is not
    ("adam", "float32", [3, 3], 3e38, "overflow float32 when its duplicates are summed"),
    # g*g overflows Adam's second moment: the row would never move again
    ("adam", "float32", [3], 1e20, "would store a value that is not finite"),
    # finite in float32, beyond float16's range once stored
    ("sgd", "float16", [3], -1e6, "not finite in float16"),
    ("sgd", "float32", [3], 3e38, "not finite in float32"),
])
def test_a_finite_gradient_that_would_store_a_non_finite_value_is_refused(tiny_layout, kind, dtype, ids, grad, match):
    s = _full(tiny_layout, dtype=dtype, optimizer=OptimizerConfig(kind=kind, lr=1.0))
    if kind == "sgd" and dtype == "float32":
        s.values[3] = -3e38  # w - lr*g = -6e38: overflows
    before = s.checksum()
    with pytest.raises(InvalidRequest, match=match) as e:
        s.apply_gradients(np.array(ids), np.full((len(ids), 16), grad, np.float32))
    assert "row id 3" in str(e.value) and "nothing was applied" in str(e.value)
    assert s.checksum() == before and s.counters["updates"] == 0
    if s.optimizer.v is not None:
        assert np.isfinite(s.optimizer.v).all() and s.optimizer.steps.sum() == 0
    # the row still trains with a sane gradient
    s.apply_gradients(np.array([3]), np.full((1, 16), 0.5, np.float32))
    assert np.isfinite(s.values[3].astype(np.float32)).all() and s.counters["updates"] == 1


def test_snapshot_and_restore_round_trip_and_restore_checks_first(tiny_layout):
    a = _full(tiny_layout, optimizer=OptimizerConfig(kind="adam", lr=0.1))
    a.apply_gradients(np.array([5, 6]), np.ones((2, 16), np.float32))
    snap = a.snapshot()
    b = _full(tiny_layout, optimizer=OptimizerConfig(kind="adam", lr=0.1))
    b.restore(snap)
    assert b.checksum() == a.checksum() and np.array_equal(b.optimizer.steps, a.optimizer.steps)
    before = b.checksum()
    for bad, match in [({"rows": snap["rows"][:-1]}, "restore: rows"),
                       ({**snap, "adam_v": snap["adam_v"][:, :3]}, "adam_v"),
                       ({"rows": snap["rows"], "adam_m": snap["adam_m"]}, "expected all of"),
                       ({**snap, "rows": np.full_like(snap["rows"], np.nan)}, "not finite")]:
        with pytest.raises(InvalidRequest, match=match):
            b.restore(bad)
        assert b.checksum() == before
