"""Training one arm: the run record, and the device a Ray task given a GPU trains on."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from engram_ray import config as C
from engram_ray.experiments.allocation import allocation_arms
from engram_ray.experiments.run import train_arm


def _arm():
    model = dataclasses.replace(C.model_tiny(), vocab_size=50257, max_seq_len=32)
    return allocation_arms(model, C.tiny(), [3])[1]


#: A small real corpus on every machine (the json package's sources): quick to tokenise anywhere.
CORPUS = os.path.dirname(json.__file__)


def _train():
    return C.TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1, eval_every=3)


def test_an_arm_trains_and_reports_where_and_how_much():
    rec = train_arm(_arm(), corpus=CORPUS, train=_train(), eval_batches=2, ablate=True)
    assert rec["device"] == "cpu" and rec["arm"] == "E3" and rec["seed"] == 0
    assert len(rec["train_loss"]) == 3 and np.isfinite(rec["val_loss"]) and rec["val_batches"] == 2
    assert rec["tokens"] == 3 * 2 * 16 and rec["flops"] == 6.0 * _arm().params.activated * rec["tokens"]
    assert rec["val_loss_engram_off"] is not None and rec["val_loss_engram_off"] != rec["val_loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_arm_trains_on_the_gpu_it_is_given():
    gpu = train_arm(_arm(), corpus=CORPUS, train=_train(), eval_batches=2)
    cpu = train_arm(_arm(), corpus=CORPUS, train=_train(), eval_batches=2, device="cpu")
    assert gpu["device"].startswith("cuda")
    assert gpu["val_loss"] == pytest.approx(cpu["val_loss"], abs=2e-2)
