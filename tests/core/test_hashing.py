import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sympy import isprime

from engram_ray import config as C
from engram_ray.config import EngramConfig
from engram_ray.core.hashing import NgramHasher


def _wrap64(v: int) -> int:
    return (v + 2**63) % 2**64 - 2**63


def _spec_hash(ids_bt, mults, primes_by_order, pad):
    """The spec, token by token, in Python integers: left pad, wrapping products, XOR, then
    floor-mod (Python's % has numpy's sign rule for a positive modulus)."""
    out = []
    for row in ids_bt:
        seq = [int(x) for x in row]
        toks = []
        for t in range(len(seq)):
            heads = []
            for n_idx, primes in enumerate(primes_by_order):
                n = n_idx + 2
                mix = 0
                for k in range(n):
                    x = seq[t - k] if t - k >= 0 else pad
                    mix ^= _wrap64(x * int(mults[k]))
                heads.extend(mix % p for p in primes)
            toks.append(heads)
        out.append(toks)
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("name", ["tiny", "reference_demo", "paper_27b", "table_100b", "odd_n4", "one_head"])
def test_bit_exact_with_the_reference(name, reference_hashes, gpt2_vocab):
    case = reference_hashes["configs"][name]
    cfg = EngramConfig.from_dict(case["config"])
    hasher = NgramHasher.from_vocab(cfg, gpt2_vocab)
    assert hasher.compressed_pad_id == case["compressed_pad_id"]
    comp = gpt2_vocab(np.array(reference_hashes["token_ids"]))
    got = hasher.hash(comp)
    assert list(got) == list(cfg.layer_ids)
    for layer in cfg.layer_ids:
        assert hasher.multipliers(layer).tolist() == case["multipliers"][str(layer)]
        assert hasher.table_sizes(layer) == case["table_sizes"][str(layer)]
        assert got[layer].dtype == np.int64
        assert got[layer].tolist() == case["hash_ids"][str(layer)]


def test_large_batches_take_the_fast_path_and_agree(reference_hashes, gpt2_vocab):
    """Above the small-batch cutoff each head is computed as x - (x // p) * p; check it
    against the spec on a tiled copy of the reference input (4,000 tokens)."""
    cfg = C.paper_27b()
    hasher = NgramHasher.from_vocab(cfg, gpt2_vocab)
    comp = gpt2_vocab(np.tile(np.array(reference_hashes["token_ids"]), (50, 2)))  # [100, 40]
    got = hasher.hash(comp)
    small = reference_hashes["configs"]["paper_27b"]["hash_ids"]
    for layer in cfg.layer_ids:
        assert got[layer][:2, :20].tolist() == small[str(layer)]
        want = _spec_hash(comp[:3], hasher.multipliers(layer), hasher.table_sizes(layer),
                          hasher.compressed_pad_id)
        assert np.array_equal(got[layer][:3], want)


def test_hand_derived_tiny_case():
    """Compressed vocab of 10, pad 0, N=2, one head of size 5 (prime 5): by hand from the spec."""
    cfg = EngramConfig(engram_vocab_size=(5,), max_ngram_size=2, n_embed_per_ngram=4,
                       n_head_per_ngram=1, layer_ids=(0,), pad_id=0, seed=7)
    h = NgramHasher(cfg, compressed_vocab_size=10, compressed_pad_id=0)
    assert h.table_sizes(0) == [[5]]  # smallest prime > 5 - 1
    m0, m1 = (int(v) for v in h.multipliers(0))
    assert m0 % 2 == 1 and m1 % 2 == 1 and m0 < 2**63 // 10
    rng = np.random.default_rng(7 + 10007 * 0)
    r = rng.integers(0, (2**63 - 1) // 10 // 2, size=2, dtype=np.int64)
    assert [m0, m1] == [int(2 * r[0] + 1), int(2 * r[1] + 1)]
    x = [3, 9, 0]
    want = [_wrap64(3 * m0) ^ _wrap64(0 * m1), _wrap64(9 * m0) ^ _wrap64(3 * m1),
            _wrap64(0 * m0) ^ _wrap64(9 * m1)]
    assert h.hash(np.array([x]))[0][0, :, 0].tolist() == [v % 5 for v in want]


def test_primes_come_in_hashing_order_and_are_unique():
    cfg = C.reference_demo()
    h = NgramHasher(cfg, 32962, 2)
    seen = []
    for layer in cfg.layer_ids:
        for n, primes in zip(cfg.orders, h.table_sizes(layer)):
            assert len(primes) == cfg.n_head_per_ngram
            assert primes[0] >= cfg.engram_vocab_size[n - 2]
            assert primes == sorted(primes) and all(isprime(p) for p in primes)
            seen.extend(primes)
    assert len(seen) == len(set(seen))
    # layer 15 continues above layer 1's primes: never reuses one
    assert h.table_sizes(15)[0][0] > h.table_sizes(1)[0][-1]


def _random_case(draw_seed: int, cfg: EngramConfig, vocab: int, B: int, T: int):
    rng = np.random.default_rng(draw_seed)
    return rng.integers(0, vocab, size=(B, T))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), B=st.integers(1, 3), T=st.integers(1, 40),
       n=st.integers(2, 5), K=st.integers(1, 3), vocab=st.integers(2, 5000))
def test_matches_the_spec_and_stays_in_range(seed, B, T, n, K, vocab):
    cfg = EngramConfig(engram_vocab_size=tuple([97] * (n - 1)), max_ngram_size=n,
                       n_embed_per_ngram=K, n_head_per_ngram=K, layer_ids=(0, 3), pad_id=0, seed=seed % 1000)
    h = NgramHasher(cfg, vocab, vocab - 1)
    x = _random_case(seed, cfg, vocab, B, T)
    got = h.hash(x)
    for layer in cfg.layer_ids:
        primes = h.table_sizes(layer)
        assert np.array_equal(got[layer], _spec_hash(x, h.multipliers(layer), primes, vocab - 1))
        bound = np.array([p for order in primes for p in order])
        assert (got[layer] >= 0).all() and (got[layer] < bound).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), cuts=st.lists(st.integers(1, 30), min_size=1, max_size=6),
       n=st.integers(2, 4), big=st.booleans())
def test_incremental_decoding_equals_hashing_the_whole_sequence(seed, cuts, n, big):
    cfg = EngramConfig(engram_vocab_size=tuple([1000] * (n - 1)), max_ngram_size=n,
                       n_embed_per_ngram=4, n_head_per_ngram=2, layer_ids=(1, 2), pad_id=0)
    h = NgramHasher(cfg, 500, 7)
    B = 120 if big else 2  # 120 x 30 tokens crosses the small-batch cutoff
    x = np.random.default_rng(seed).integers(0, 500, size=(B, sum(cuts)))
    full = h.hash(x)
    hist = h.new_history(B)
    pieces: dict[int, list] = {layer: [] for layer in cfg.layer_ids}
    start = 0
    for c in cuts:
        step, hist = h.hash_step(hist, x[:, start:start + c])
        for layer in cfg.layer_ids:
            pieces[layer].append(step[layer])
        start += c
        assert hist.tolist() == np.concatenate([np.full((B, n - 1), 7), x[:, :start]], 1)[:, -(n - 1):].tolist()
    for layer in cfg.layer_ids:
        assert np.array_equal(np.concatenate(pieces[layer], axis=1), full[layer])


def test_hash_stacked_equals_hash():
    cfg = C.tiny()
    h = NgramHasher(cfg, 300, 0)
    x = np.random.default_rng(0).integers(0, 300, size=(4, 33))
    stacked = h.hash_stacked(x)
    per = h.hash(x)
    assert stacked.shape == (2, 4, 33, cfg.heads_per_layer)
    for i, layer in enumerate(cfg.layer_ids):
        assert np.array_equal(stacked[i], per[layer])


_DIGEST_SNIPPET = """
import hashlib, numpy as np
from engram_ray import config as C
from engram_ray.core.hashing import NgramHasher
h = NgramHasher(C.paper_27b(), 32962, 2)
x = np.random.default_rng(1).integers(0, 32962, size=(8, 300))
print(hashlib.sha256(h.hash_stacked(x).tobytes()).hexdigest())
"""


def test_deterministic_across_processes_and_hash_seeds():
    digests = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", _DIGEST_SNIPPET], env=env, check=True,
                             capture_output=True, text=True)
        digests.add(out.stdout.strip())
    h = NgramHasher(C.paper_27b(), 32962, 2)
    x = np.random.default_rng(1).integers(0, 32962, size=(8, 300))
    digests.add(hashlib.sha256(h.hash_stacked(x).tobytes()).hexdigest())
    assert len(digests) == 1


def test_bad_inputs_are_refused_with_the_value():
    h = NgramHasher(C.tiny(), 100, 0)
    with pytest.raises(ValueError, match=r"\[batch, time\], got shape \(5,\)"):
        h.hash(np.arange(5))
    with pytest.raises(ValueError, match="must be integers, got dtype float32"):
        h.hash(np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="id 100 >= compressed vocabulary size 100"):
        h.hash(np.array([[1, 100]]))
    with pytest.raises(ValueError, match="layer_id=9 is not an Engram layer"):
        h.multipliers(9)
    with pytest.raises(ValueError, match=r"history shape \(1, 2\); expected \(2, 2\)"):
        h.hash_step(np.zeros((1, 2), np.int64), np.zeros((2, 1), np.int64))
    with pytest.raises(ValueError, match="compressed_pad_id=100"):
        NgramHasher(C.tiny(), 100, 100)
    with pytest.raises(ValueError, match="compressed_vocab_size=0"):
        NgramHasher(C.tiny(), 0, 0)


def test_negative_ids_hash_like_the_reference():
    # The reference leaves negative (sentinel) ids uncompressed and hashes them as they are.
    h = NgramHasher(C.tiny(), 100, 0)
    x = np.array([[-1, 5, -7]])
    want = _spec_hash(x, h.multipliers(1), h.table_sizes(1), 0)
    assert np.array_equal(h.hash(x)[1], want)
