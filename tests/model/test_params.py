"""Parameter accounting: exact against the built model, and the paper's definitions of
activated, sparse and rho."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from engram_ray import config as C
from engram_ray.core.layout import TableLayout
from engram_ray.core.tokens import CompressedVocab
from engram_ray.model import EngramLM
from engram_ray.model.params import count_params


@pytest.mark.parametrize("hc_mult", [1, 2])
def test_counts_equal_the_built_model_and_the_table(hc_mult):
    mc, ec = dataclasses.replace(C.model_tiny(), hc_mult=hc_mult), C.tiny()
    pc = count_params(mc, ec)
    model = EngramLM(mc, ec)
    assert pc.total - pc.table == sum(p.numel() for p in model.parameters())
    layout = TableLayout.build(ec, CompressedVocab(np.arange(50)))
    assert pc.table == layout.num_params
    # one row per head, order and Engram layer is what a token reads
    assert pc.table_activated == len(ec.layer_ids) * (ec.max_ngram_size - 1) * ec.n_head_per_ngram * ec.row_dim
    expert = 3 * mc.dim * mc.ffn_dim                        # SwiGLU: w1, w3, w2
    moe_layers = mc.n_layers
    assert pc.routed_experts == moe_layers * mc.n_routed_experts * expert
    assert pc.routed_inactive == moe_layers * (mc.n_routed_experts - mc.top_k) * expert
    assert pc.activated == pc.total - pc.routed_inactive - (pc.table - pc.table_activated)
    assert pc.rho == pytest.approx(pc.routed_inactive / pc.sparse)


def test_rho_is_one_for_pure_moe_and_falls_as_the_table_grows():
    mc = C.model_tiny()
    assert count_params(mc, None).rho == 1.0
    small = count_params(mc, dataclasses.replace(C.tiny(), engram_vocab_size=(200, 200)))
    large = count_params(mc, C.tiny())
    assert 1.0 > small.rho > large.rho > 0
    dense = count_params(dataclasses.replace(mc, ffn="dense"), None)
    assert dense.routed_experts == 0 and dense.rho is None     # nothing sparse at all


def test_the_params_command_prints_and_writes_json():
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "params", "--preset", "tiny", "--model", "tiny",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["total"] == count_params(C.model_tiny(), C.tiny()).total and 0 < rep["rho"] < 1
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "params", "--preset", "table_100b"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "100,000,668,320" in r.stdout and "rho" in r.stdout
