"""engram-ray analyze: linear CKA and the soft alignment index against their definitions, the
LogitLens probe on a real (tiny) model, the report's verdicts on runs built to shift, and the
command end to end on Ray."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from engram_ray import config as C
from engram_ray.experiments.analysis import summarise_analysis
from engram_ray.experiments.lens import layer_states, logit_lens
from engram_ray.experiments.similarity import cka_matrix, linear_cka, soft_alignment
from engram_ray.experiments.stats import compare, interval_text, mean_se
from engram_ray.model import EngramLM, LocalMemory

from .tiny import run_tiny


def _gram_cka(x, y):
    """The textbook form: HSIC of centred Gram matrices (N x N), normalised."""
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_))


def test_linear_cka_matches_its_definition_and_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    y = x @ rng.normal(size=(16, 8)) + 0.5 * rng.normal(size=(200, 8))
    assert linear_cka(x, y) == pytest.approx(_gram_cka(x, y), rel=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))            # orthogonal
    assert linear_cka(x @ q * 7.0 + 3.0, y) == pytest.approx(linear_cka(x, y), rel=1e-10)
    # unrelated representations of many tokens: close to 0
    assert linear_cka(rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8))) < 0.02
    assert 0.0 <= linear_cka(x.astype(np.float32), y) <= 1.0


def test_linear_cka_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="same N"):
        linear_cka(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        linear_cka(np.ones((1, 2)), np.ones((1, 2)))
    with pytest.raises(ValueError, match="constant"):
        linear_cka(np.ones((5, 2)), np.arange(10.0).reshape(5, 2))


def test_soft_alignment_is_the_weighted_mean_index_of_the_top_k_rows():
    s = np.array([[0.9, 0.1, 0.0],
                  [0.5, 0.8, 0.2],
                  [0.1, 0.6, 0.7],
                  [0.0, 0.3, 0.9]])
    a = soft_alignment(s, 2)
    assert a[0] == pytest.approx((0.9 * 0 + 0.5 * 1) / 1.4)
    assert a[1] == pytest.approx((0.8 * 1 + 0.6 * 2) / 1.4)
    assert a[2] == pytest.approx((0.9 * 3 + 0.7 * 2) / 1.6)
    assert soft_alignment(s, 99)[0] == pytest.approx((0.5 + 0.2) / 1.5)   # k clipped to the rows
    with pytest.raises(ValueError, match="k >= 1"):
        soft_alignment(s, 0)
    m = cka_matrix([s[:, :2], s], [s])
    assert m.shape == (2, 1) and m[1, 0] == pytest.approx(1.0)


def test_the_shared_statistics():
    assert mean_se([1.0, 3.0]) == (2.0, 1.0, 1)
    assert mean_se([4.0]) == (4.0, 0.0, 0)
    c = compare(1.0, 0.1, 1, 0.0, 0.0, 1)
    assert c["exceeds_noise"] is False and c["ci95"] == pytest.approx(1.2706)   # 12.7 se with 1 df
    assert compare(1.0, 0.01, 5, 0.0, 0.0, 5)["exceeds_noise"] is True
    none = compare(1.0, 0.0, 0, 0.0, 0.0, 0)
    assert none["ci95"] is None and not none["exceeds_noise"] and "no interval" in interval_text(none)
    assert interval_text(c) == "+1.0000 +- 1.2706 (within the noise)"


def test_layer_states_and_logit_lens_on_a_real_model_with_four_streams():
    from engram_ray.core.indexer import RowIndexer
    from engram_ray.core.layout import TableLayout
    from engram_ray.core.tokens import CompressedVocab

    mc, ec = dataclasses.replace(C.model_tiny(), hc_mult=4), C.tiny()     # Engram in blocks 1 and 2
    torch.manual_seed(0)
    model = EngramLM(mc, ec).eval()
    vocab = CompressedVocab(np.arange(mc.vocab_size))
    layout = TableLayout.build(ec, vocab)
    memory = LocalMemory(layout, init_std=0.5, init_seed=1)
    tokens = np.random.default_rng(0).integers(0, mc.vocab_size, size=(2, 12))
    rows = RowIndexer.build(ec, vocab, layout=layout).rows(tokens)
    x = torch.from_numpy(tokens)
    states, logits = layer_states(model, x, memory.fetch(rows, requires_grad=False))
    assert len(states) == mc.n_layers + 1 and all(s.shape == (2, 12, mc.dim) for s in states)
    assert not model.blocks[0]._forward_pre_hooks and not model.blocks[1]._forward_hooks  # hooks removed
    # every state is the block chain's stream after that many blocks, summed over its 4 streams
    with torch.no_grad():
        fetch = memory.fetch(rows, requires_grad=False)
        h = model.tok_emb(x)[:, :, None].expand(2, 12, 4, mc.dim)
        chain = [h.sum(2)]
        for block, slot in zip(model.blocks, model.fetch_slots):
            h = block(h, model.rope_cos[:12], model.rope_sin[:12], None if slot is None else fetch.rows(slot), None, 0)
            chain.append(h.sum(2))
        assert torch.equal(logits, model(x, memory.fetch(rows, requires_grad=False)))  # its own forward
    for got, want in zip(states, chain):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(states[0], 4 * model.tok_emb(x), atol=1e-6)
    # Engram off: states before block 1's Engram layer are unchanged, the ones after it are not
    model.set_engram(False)
    off, _ = layer_states(model, x, None)
    model.set_engram(True)
    assert torch.equal(off[0], states[0]) and torch.equal(off[1], states[1])
    assert not torch.allclose(off[2], states[2])
    y = torch.from_numpy(np.roll(tokens, -1, axis=1))
    kl, ce = logit_lens(model, states, logits, y)
    assert len(kl) == len(ce) == mc.n_layers + 1
    assert kl[-1] == pytest.approx(0.0, abs=1e-6) and min(kl[:-1]) > 0            # the last state is the output
    assert ce[-1] == pytest.approx(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())),
                                   rel=1e-5)
    # chunked over tokens: the same numbers as in one piece
    kl3, ce3 = logit_lens(model, states, logits, y, chunk=5)
    assert kl3 == pytest.approx(kl, rel=1e-5, abs=1e-7) and ce3 == pytest.approx(ce, rel=1e-5)


def _runs(shift: int, seeds=(0, 1, 2), engram_is_moe_of=None):
    """Synthetic probed runs: a smooth chain of states shared by every model, plus each seed's
    own perturbation; the Engram model's state j is its seed's state j + shift (clipped), so
    its alignment should move by about ``shift``. ``engram_is_moe_of``: the "Engram" model is
    really the MoE of another seed (a negative control: nothing to find)."""
    rng = np.random.default_rng(0)
    chain = [rng.normal(size=(300, 6))]
    for _ in range(5):
        chain.append(chain[-1] + 0.8 * rng.normal(size=(300, 6)))
    def model(seed, offset):
        r = np.random.default_rng(100 + seed)
        return [chain[min(j + offset, 5)] + 0.3 * r.normal(size=(300, 6)) for j in range(6)]
    runs = []
    for s in seeds:
        lens = {"kl": [3.0 - 0.5 * j for j in range(6)], "loss": [6.0] * 6, "kl_batches": [[1.0, 1.1]] * 6}
        eng = model(engram_is_moe_of(s), 0) if engram_is_moe_of else model(50 + s, shift)
        moe_lens = dict(lens, kl=[k + 0.01 * s for k in lens["kl"]])
        runs.append({"arm": "moe", "seed": s, "states": model(s, 0), "logit_lens": moe_lens})
        runs.append({"arm": "E6", "seed": s, "states": eng, "logit_lens": dict(lens, kl=[k - 0.2 - 0.01 * s
                                                                                             for k in lens["kl"]])})
    return runs


def test_the_report_finds_a_built_in_shift_and_not_one_that_is_absent():
    shifted = summarise_analysis(_runs(1), "moe", "E6", top_k=2, first_engram_state=2)
    middle = shifted["cka"]["alignment"][2]
    assert middle["shift"]["diff"] > 0.5 and middle["shift"]["exceeds_noise"]       # Engram state 2 ~ MoE state 3
    assert [r["before_engram"] for r in shifted["cka"]["alignment"]] == [True, True] + [False] * 4
    assert shifted["cka"]["pairs"] == [{"moe_rows": 0, "columns_seed": 1}, {"moe_rows": 1, "columns_seed": 2},
                                       {"moe_rows": 2, "columns_seed": 0}]
    # a negative control: the "Engram" model is another seed's MoE: no shift beyond the noise
    control = summarise_analysis(_runs(0, seeds=(0, 1, 2, 3), engram_is_moe_of=lambda s: 10 + s), "moe", "E6", 2)
    assert not any(r["shift"]["exceeds_noise"] for r in control["cka"]["alignment"])
    assert all(abs(r["shift"]["diff"]) < 0.3 for r in control["cka"]["alignment"])
    ll = shifted["logit_lens"]
    assert ll["engram"]["se_over"] == "seeds" and ll["engram"]["df"] == 2
    assert ll["engram_minus_moe"][0]["diff"] == pytest.approx(-0.22) and ll["engram_minus_moe"][0]["exceeds_noise"]
    assert ll["engram_minus_moe"][-1] is None                                        # the final state: KL 0
    assert np.asarray(shifted["cka"]["engram_vs_moe"]).shape == (6, 6)
    res = shifted["cka"]["depth_resolution"]   # a chain of distinct states: CKA tells them apart
    assert res["same_state"] > res["other_states"]
    assert res["gap"] == pytest.approx(res["same_state"] - res["other_states"])
    json.dumps(shifted)                                                              # JSON-ready: no arrays
    with pytest.raises(ValueError, match="need runs of both"):
        summarise_analysis(_runs(0), "moe", "E9", top_k=2)


def test_one_seed_gives_curves_but_no_verdict():
    one = summarise_analysis(_runs(1, seeds=(0,)), "moe", "E6", top_k=2)
    assert "shift" not in one["cka"]["alignment"][0] and one["cka"]["moe_vs_moe"] is None
    assert one["cka"]["depth_resolution"] is None
    assert "no alignment verdict" in one["cka"]["note"]
    ll = one["logit_lens"]
    assert ll["engram"]["se_over"].startswith("probe batches") and ll["engram"]["df"] == 0
    # the se over the probe batches is text sampling only: shown, but no verdict rests on it
    assert all(d is None or (d["ci95"] is None and not d["exceeds_noise"]) for d in ll["engram_minus_moe"])


@pytest.mark.ray
@pytest.mark.slow
def test_the_command_probes_both_models_on_ray_and_writes_json_and_two_plots(tmp_path):
    out = tmp_path / "an.json"
    r = run_tiny("analyze", "--experts", "3", "--seeds", "0", "1", "--cka-tokens", "64", "--out", str(out))
    rep = json.loads(out.read_text())
    a = rep["analysis"]
    assert a["states"] == 4 and a["seeds"] == [0, 1] and len(rep["runs"]) == 4
    assert all("states" not in x for x in rep["runs"])
    for key in ("moe", "engram"):
        kl = a["logit_lens"][key]["kl"]
        assert len(kl) == 4 and kl[-1] == pytest.approx(0.0, abs=1e-5) and min(kl[:-1]) > 0
    s = np.asarray(a["cka"]["engram_vs_moe"])
    assert s.shape == (4, 4) and ((s >= 0) & (s <= 1 + 1e-9)).all()
    assert all(set(row["shift"]) == {"diff", "se", "ci95", "exceeds_noise"} for row in a["cka"]["alignment"])
    assert rep["probe"]["cka_tokens"] == 64 and rep["scale"]["tokens_per_run"] == 3 * 2 * 32
    for png in ("an_logit_lens.png", "an_cka.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "LogitLens" in r.stdout and "alignment" in r.stdout


@pytest.mark.parametrize("flags, message", [
    (["--eval-batches", "2", "--probe-batches", "3"], "--probe-batches 3: expected 1..--eval-batches 2"),
    (["--probe-batches", "0"], "--probe-batches 0"),
    (["--probe-batches", "1", "--batch-size", "2", "--seq-len", "32", "--cka-tokens", "65"],
     "--cka-tokens 65: expected 2..64"),
    (["--align-top-k", "0"], "--align-top-k 0: expected 1..9"),
    (["--seeds", "0", "0"], "--seeds 0 0"),
    (["--batch-size", "0"], "--batch-size 0: expected >= 1"),
    (["--steps", "0"], "--steps 0: expected >= 1"),
    (["--engram-layers", "1", "9"], "--engram-layers 1 9: expected block indices 0..7"),
    (["--gpus-per-run", "-1"], "--gpus-per-run -1.0: expected >= 0"),
    (["--corpus", "/nonexistent/corpus"], "/nonexistent/corpus"),
])
def test_bad_flags_are_refused_before_anything_trains(flags, message):
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "analyze", *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
