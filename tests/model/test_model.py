import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engram_ray import config as C
from engram_ray.config import OptimizerConfig
from engram_ray.core.indexer import RowIndexer
from engram_ray.core.tokens import CompressedVocab
from engram_ray.model import EngramLM, LocalMemory
from engram_ray.model.engram import EngramLayer
from engram_ray.model.hyper import HyperConnection
from engram_ray.model.moe import MoE

torch.manual_seed(0)


class Setup:
    def __init__(self, hc_mult=1, ffn="moe"):
        self.mc = dataclasses.replace(C.model_tiny(), hc_mult=hc_mult, ffn=ffn)
        self.ec = C.tiny()  # Engram at layers 1 and 2
        self.vocab = CompressedVocab(np.arange(self.mc.vocab_size) // 2)
        self.indexer = RowIndexer.build(self.ec, self.vocab)
        torch.manual_seed(0)
        self.model = EngramLM(self.mc, self.ec)
        self.memory = LocalMemory(self.indexer.layout, init_std=0.5,
                                  optimizer=OptimizerConfig(kind="adam", lr=3e-2))

    def logits(self, tokens, fetch=None):
        return self.model(tokens, fetch or self.memory.fetch(self.indexer.rows(tokens.numpy())))


@pytest.mark.parametrize("hc_mult,ffn", [(1, "moe"), (4, "moe"), (1, "dense")])
def test_shapes_and_causality(hc_mult, ffn):
    s = Setup(hc_mult, ffn)
    tok = torch.randint(0, s.mc.vocab_size, (2, 20))
    a = s.logits(tok)
    assert a.shape == (2, 20, s.mc.vocab_size) and torch.isfinite(a).all()
    changed = tok.clone()
    changed[:, 12] = (changed[:, 12] + 1) % s.mc.vocab_size
    b = s.logits(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)   # nothing before the change moves
    assert not torch.allclose(a[:, 12:], b[:, 12:])          # something after it does


def test_engram_rows_reach_the_logits():
    s = Setup()
    tok = torch.randint(0, s.mc.vocab_size, (1, 10))
    before = s.logits(tok)
    with torch.no_grad():
        s.memory.table.mul_(3.0)
    assert not torch.allclose(before, s.logits(tok))


def test_moe_routing_weights_and_balance_term():
    cfg = C.model_tiny()
    moe = MoE(cfg)
    x = torch.randn(50, cfg.dim)
    probs, w, idx = moe.route(x)
    assert torch.allclose(w.sum(-1), torch.ones(50))
    assert (idx[:, 0] != idx[:, 1]).all() and w.min() > 0
    assert torch.allclose(probs.sum(-1), torch.ones(50))
    # the output is shared(x) + the weighted top-k experts, token by token
    y = moe(x)
    i = 7
    want = moe.shared(x[i]) + sum(w[i, k] * moe.experts[int(idx[i, k])](x[i]) for k in range(cfg.top_k))
    assert torch.allclose(y[i], want, atol=1e-5)
    # uniform router probabilities: the balance term is exactly 1, whatever the tie-break
    torch.nn.init.zeros_(moe.router.weight)
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0)
    # a router that sends everything to one expert is penalised
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 5.0
    moe(torch.ones(50, cfg.dim))
    assert moe.aux_loss.item() > 1.5


def test_engram_gates_stay_inside_zero_one_with_finite_gradients():
    ec = C.tiny()
    layer = EngramLayer(1, ec, dim=32, n=4, eps=1e-5)
    h = torch.randn(2, 9, 4, 32) * 1e3
    e = (torch.randn(2, 9, ec.memory_dim) * 1e3).requires_grad_()
    g = layer.gates(h, e)
    assert g.shape == (2, 9, 4, 1) and (g > 0).all() and (g < 1).all()
    # After RMSNorm both vectors have norm sqrt(D): |<k,q>|/sqrt(D) <= sqrt(D), and the signed
    # square root leaves |score| <= D**0.25 (norm weights are 1 at init).
    bound = torch.tensor(32 ** 0.25)
    assert (g >= torch.sigmoid(-bound) - 1e-6).all() and (g <= torch.sigmoid(bound) + 1e-6).all()
    zero = layer.gates(torch.zeros(1, 1, 4, 32), torch.zeros(1, 1, ec.memory_dim, requires_grad=True))
    assert torch.allclose(zero, torch.full_like(zero, 0.5), atol=0.01)
    out, _ = layer(h, e)
    out.sum().backward()
    assert torch.isfinite(e.grad).all()


def test_hyper_connections_one_is_the_plain_residual_and_four_learns():
    hc1 = HyperConnection(1, 0)
    h, y = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 8)
    assert torch.equal(hc1.read(h), h[:, :, 0]) and torch.equal(hc1.write(h, y), h + y[:, :, None])
    assert not list(hc1.parameters())
    hc4 = HyperConnection(4, 5)
    h4 = torch.randn(2, 3, 4, 8)
    assert torch.equal(hc4.read(h4), h4[:, :, 1])               # sublayer 5 reads stream 5 mod 4
    assert torch.allclose(hc4.write(h4, y), h4 + y[:, :, None])  # init: mix = I, beta = 1
    s = Setup(hc_mult=4)
    tok = torch.randint(0, s.mc.vocab_size, (2, 8))
    F.cross_entropy(s.logits(tok).flatten(0, 1), tok.flatten()).backward()
    hc = s.model.blocks[0].hc_attn
    assert hc.alpha.grad is not None and hc.mix.grad is not None and hc.beta.grad.abs().sum() > 0


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_incremental_decoding_equals_the_full_forward(hc_mult):
    s = Setup(hc_mult)
    s.model.eval()
    tok = torch.randint(0, s.mc.vocab_size, (3, 14))
    full = s.logits(tok)
    cache = s.model.new_cache(3)
    hist = s.indexer.new_history(3)
    steps = []
    pos = 0
    for n in (5, 1, 1, 4, 3):  # a prompt, then single tokens, then chunks
        rows, hist = s.indexer.step(hist, tok[:, pos:pos + n].numpy())
        steps.append(s.model(tok[:, pos:pos + n], s.memory.fetch(rows), cache=cache, start_pos=pos))
        pos += n
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_rows_at_their_own_positions_decode_as_each_sequence_alone(hc_mult):
    """A serving batch: two sequences of different lengths, prefilled alone, then decoded
    together with per-row positions (``start_pos`` a tensor), give each one's solo logits."""
    s = Setup(hc_mult)
    s.model.eval()
    lens, steps = (6, 3), 4
    tok = [torch.randint(0, s.mc.vocab_size, (1, n + steps)) for n in lens]

    def alone(t, n):  # prefill n tokens then decode one at a time, batch 1
        cache, hist = s.model.new_cache(1), s.indexer.new_history(1)
        out = []
        for a, b in [(0, n)] + [(p, p + 1) for p in range(n, n + steps)]:
            rows, hist = s.indexer.step(hist, t[:, a:b].numpy())
            out.append(s.model(t[:, a:b], s.memory.fetch(rows), cache=cache, start_pos=a)[:, -1])
        return torch.cat(out), cache, hist

    solo = [alone(t, n) for t, n in zip(tok, lens)]
    cache = s.model.new_cache(2)
    hist = s.indexer.new_history(2)
    for i, (t, n) in enumerate(zip(tok, lens)):  # each row's prefill state, copied in
        c1, h1 = _prefill_only(s, t, n)
        for layer in range(s.mc.n_layers):
            cache.k[layer][i] = c1.k[layer][0]
            cache.v[layer][i] = c1.v[layer][0]
        for key, st in c1.extra.items():
            cache.extra.setdefault(key, torch.zeros(2, *st.shape[1:]))[i] = st[0]
        hist[i] = h1[0]
    pos = torch.tensor(lens)
    for k in range(steps):
        new = torch.cat([t[:, n + k:n + k + 1] for t, n in zip(tok, lens)])
        rows, hist = s.indexer.step(hist, new.numpy())
        got = s.model(new, s.memory.fetch(rows), cache=cache, start_pos=pos + k)[:, -1]
        for i in range(2):
            assert torch.allclose(got[i], solo[i][0][k + 1], atol=1e-5)


def _prefill_only(s, t, n):
    cache, hist = s.model.new_cache(1), s.indexer.new_history(1)
    rows, hist = s.indexer.step(hist, t[:, :n].numpy())
    s.model(t[:, :n], s.memory.fetch(rows), cache=cache, start_pos=0)
    return cache, hist


def test_a_short_training_run_lowers_the_loss():
    s = Setup()
    rng = np.random.default_rng(0)
    # a corpus with structure to learn: repeated random phrases
    phrases = rng.integers(0, s.mc.vocab_size, size=(6, 8))
    seq = np.concatenate([phrases[i] for i in rng.integers(0, 6, size=200)])
    dense = torch.optim.AdamW(s.model.parameters(), lr=3e-3)
    losses, updated = [], []
    for _ in range(40):
        starts = rng.integers(0, seq.size - 33, size=8)
        batch = np.stack([seq[a:a + 33] for a in starts])
        rows = s.indexer.rows(batch[:, :-1])
        fetch = s.memory.fetch(rows)
        x, y = torch.as_tensor(batch[:, :-1]), torch.as_tensor(batch[:, 1:])
        loss = F.cross_entropy(s.logits(x, fetch).flatten(0, 1), y.flatten())
        (loss + s.model.aux_loss()).backward()
        dense.step()
        dense.zero_grad()
        # the sparse Adam step on exactly the rows this batch read
        updated.append((s.memory.update(fetch), np.unique(rows).size))
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert all(got == want for got, want in updated), updated


def test_bad_model_configs_and_calls():
    with pytest.raises(ValueError, match="layer_ids=.*must be < ModelConfig.n_layers=2"):
        EngramLM(dataclasses.replace(C.model_tiny(), n_layers=2), C.tiny())
    with pytest.raises(ValueError, match="ModelConfig.dim=30"):
        dataclasses.replace(C.model_tiny(), dim=30)
    with pytest.raises(ValueError, match="top_k=5"):
        dataclasses.replace(C.model_tiny(), top_k=5)
    s = Setup()
    with pytest.raises(ValueError, match="pass the fetch"):
        s.model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed max_seq_len=64"):
        s.model(torch.zeros(1, 65, dtype=torch.long), fetch=None)
