"""The allocation sweep: arms that hold the parameter budget and the activated compute while
rho falls, the summary's noise verdicts, and the command end to end on Ray (tiny)."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest

from engram_ray import config as C
from engram_ray.cli.experiment import ablation, paper_scale, scale, summarise
from engram_ray.experiments.allocation import allocation_arms
from engram_ray.experiments.stats import t95

from .tiny import run_tiny


def _moe():
    return dataclasses.replace(C.model_tiny(), n_routed_experts=6, top_k=2, n_layers=3)


def test_arms_hold_the_budget_and_the_activated_compute_while_rho_falls():
    arms = allocation_arms(_moe(), C.tiny(), [4, 2])
    moe, e4, e2 = arms
    assert moe.engram is None and moe.params.rho == 1.0
    for a in (e4, e2):
        assert moe.params.total * 0.99 <= a.params.total <= moe.params.total   # the same budget
        # the same expert compute per token: top-k experts; only the Engram layers and rows add,
        # and the router shrinks with the experts (dim x removed experts per layer)
        extra = a.params.engram_layers + a.params.table_activated
        router = _moe().dim * (_moe().n_routed_experts - a.routed_experts) * _moe().n_layers
        assert moe.params.backbone - a.params.backbone == router
        assert a.params.activated - extra == moe.params.activated - router
    assert 1.0 > e4.params.rho > e2.params.rho == 0.0                        # E' = top_k: no inactive expert
    assert e2.engram.engram_vocab_size[0] > e4.engram.engram_vocab_size[0]   # more memory as experts go
    assert (e4.engram.layer_ids, e4.engram.n_head_per_ngram) == (C.tiny().layer_ids, C.tiny().n_head_per_ngram)


def test_bad_sweeps_are_refused():
    with pytest.raises(ValueError, match="expert counts \\[1, 6\\]"):
        allocation_arms(_moe(), C.tiny(), [1, 6])
    with pytest.raises(ValueError, match="MoE backbone"):
        allocation_arms(dataclasses.replace(_moe(), ffn="dense"), C.tiny(), [2])


def test_the_summary_says_whether_a_difference_exceeds_its_noise():
    arms = [SimpleNamespace(name=n, routed_experts=e, params=SimpleNamespace(rho=r, to_dict=dict))
            for n, e, r in (("moe", 6, 1.0), ("E4", 4, 0.5), ("E2", 2, 0.0))]
    runs = [{"arm": a, "seed": s, "val_loss": v, "val_loss_se": 0.01, "tokens": 10, "flops": 1.0, "train_seconds": 1}
            for a, s, v in (("moe", 0, 5.00), ("moe", 1, 5.02), ("E4", 0, 4.80), ("E4", 1, 4.82),
                            ("E2", 0, 5.00), ("E2", 1, 5.04))]
    rows = summarise(arms, runs)
    assert rows[0]["val_loss"] == pytest.approx(5.01) and rows[0]["se_over"] == "seeds" and rows[0]["df"] == 1
    # 2 seeds: 1 degree of freedom, t = 12.7: a difference of -0.2 with se 0.014 is beyond +- 0.18
    assert rows[1]["vs_moe"]["ci95"] == pytest.approx(12.706 * rows[1]["vs_moe"]["se"])
    assert rows[1]["vs_moe"]["exceeds_noise"] and rows[1]["vs_moe"]["diff"] == pytest.approx(-0.2)
    assert not rows[2]["vs_moe"]["exceeds_noise"]
    assert t95(1) == 12.706 and t95(11) == 2.228 and t95(1000) == 1.98 and t95(0) == float("inf")


@pytest.mark.ray
@pytest.mark.slow
def test_the_command_trains_every_arm_on_ray_and_writes_json_and_a_plot(tmp_path):
    out = tmp_path / "alloc.json"
    r = run_tiny("experiment allocation", "--experts", "3", "2", "--seeds", "0", "1", "--out", str(out))
    rep = json.loads(out.read_text())
    assert [a["name"] for a in rep["arms"]] == ["moe", "E3", "E2"] and len(rep["runs"]) == 6
    assert {(x["arm"], x["seed"]) for x in rep["runs"]} == {(a, s) for a in ("moe", "E3", "E2") for s in (0, 1)}
    for row in rep["summary"]:
        assert len(row["val_losses"]) == 2 and row["se_over"] == "seeds" and row["val_loss"] > 0
        assert set(row["vs_moe"]) == {"diff", "se", "ci95", "exceeds_noise"}
    assert rep["scale"]["tokens_per_run"] == 3 * 2 * 32 and rep["summary"][0]["rho"] == 1.0
    assert (tmp_path / "alloc.png").stat().st_size > 1000 and "vs MoE" in r.stdout


def test_engram_off_skips_the_engram_layers_and_reads_no_rows():
    import torch

    from engram_ray.core.indexer import RowIndexer
    from engram_ray.core.tokens import CompressedVocab
    from engram_ray.model import EngramLM, LocalMemory

    mc = dataclasses.replace(C.model_tiny(), vocab_size=50)
    ec = dataclasses.replace(C.tiny(), short_conv_init="default")
    torch.manual_seed(0)
    model = EngramLM(mc, ec).eval()
    plain = EngramLM(mc, None).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".engram." not in k})
    idx = RowIndexer.build(ec, CompressedVocab(np.arange(50)))
    tok = torch.randint(0, 50, (2, 12))
    fetch = LocalMemory(idx.layout, init_std=0.5).fetch(idx.rows(tok.numpy()), requires_grad=False)
    with torch.no_grad():
        on = model(tok, fetch)
        model.set_engram(False)
        off = model(tok, None)                       # no fetch needed: no rows are read
        model.set_engram(True)
        assert torch.equal(off, plain(tok)) and not torch.equal(on, off)
        with pytest.raises(ValueError, match="pass the fetch"):
            model(tok, None)


def test_the_ablation_reports_the_share_of_the_gain_that_remains():
    runs = [{"arm": "moe", "seed": 0, "val_loss": 5.0}, {"arm": "E4", "seed": 0, "val_loss": 4.8,
                                                         "val_loss_engram_off": 4.9},
            {"arm": "moe", "seed": 1, "val_loss": 5.1}, {"arm": "E4", "seed": 1, "val_loss": 4.9,
                                                         "val_loss_engram_off": 5.3}]
    ab = ablation(runs, "moe", "E4")
    assert [p["gain_remaining"] for p in ab["per_seed"]] == pytest.approx([0.5, -1.0])
    assert ab["engram_off_val_loss"] == pytest.approx(5.1)


@pytest.mark.ray
@pytest.mark.slow
def test_the_iso_command_trains_the_pair_and_ablates_it(tmp_path):
    out = tmp_path / "iso.json"
    r = run_tiny("experiment iso", "--experts", "2", "--seeds", "0", "--out", str(out))
    rep = json.loads(out.read_text())
    assert rep["experiment"] == "iso" and [a["name"] for a in rep["arms"]] == ["moe", "E2"]
    (p,) = rep["ablation"]["per_seed"]
    assert p["engram_off"] > 0 and p["engram"] == rep["summary"][1]["val_loss"]
    assert "Engram off at inference" in r.stdout


def test_the_scale_is_stated_against_the_papers():
    paper = paper_scale()
    assert paper["flops"] == pytest.approx(6 * 3.8e9 * 262e9)
    sc = scale(10_000_000, 8_000_000, 100_000, 6.0 * 8e6 * 1e5)
    assert sc["vs_paper"]["flops"] == pytest.approx(4.8e12 / paper["flops"])
    assert sc["vs_paper"]["total_params"] == pytest.approx(1e7 / 26.7e9)
    assert "of the paper's parameters" in sc["note"] and "finding, not a failure" in sc["note"]
