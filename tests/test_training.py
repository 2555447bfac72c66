"""The Trainer against a LocalMemory: it indexes batches on the host, before they move to the
device, and runs on an accelerator where one exists."""

import numpy as np
import pytest
import torch

from engram_ray import config as C
from engram_ray.config import OptimizerConfig, TrainConfig
from engram_ray.core.indexer import RowIndexer
from engram_ray.core.layout import TableLayout
from engram_ray.core.tokens import CompressedVocab
from engram_ray.model import LocalMemory
from engram_ray.training import Trainer


def _trainer(device="cpu", **kw):
    mc, ec = C.model_tiny(), C.tiny()
    vocab = CompressedVocab(np.arange(mc.vocab_size) // 2)
    rng = np.random.default_rng(1)
    phrases = rng.integers(0, mc.vocab_size, size=(6, 8))
    seq = np.concatenate([phrases[i] for i in rng.integers(0, 6, size=300)])
    memory = LocalMemory(TableLayout.build(ec, vocab), init_std=0.5,
                         optimizer=OptimizerConfig(kind="adam", lr=0.05)).to(device)
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=32, warmup_steps=2, eval_batches=2)
    return Trainer(mc, ec, vocab, memory, seq[:2000], seq[2000:], cfg, device=device, **kw)


class _OnDevice(torch.Tensor):
    """A CPU tensor that behaves like one on an accelerator where it matters here: it has no
    ``.numpy()`` (nor ``__array__``), and ``.cpu()`` copies it back to a plain host tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert a device tensor to numpy: copy it to the host first")
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_trainer_indexes_host_batches_before_they_move(monkeypatch):
    """Every token tensor the trainer moves to its device comes back without ``.numpy()``: a
    trainer that hashed a moved batch (as ``tokens.numpy()`` did on a GPU worker) fails here."""
    tr = _trainer()
    real_to = torch.Tensor.to
    moved = []

    def to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.dtype == torch.int64:  # token batches (the model's weights are floats)
            moved.append(out.shape)
            return out.as_subclass(_OnDevice)
        return out

    seen = []
    real_rows, real_step = tr.indexer.rows, tr.indexer.step
    monkeypatch.setattr(tr.indexer, "rows", lambda t: seen.append(type(t)) or real_rows(t))
    monkeypatch.setattr(tr.indexer, "step", lambda h, t: seen.append(type(t)) or real_step(h, t))
    monkeypatch.setattr(torch.Tensor, "to", to)
    step = tr.train_step()
    val = tr.evaluate()
    out = tr.generate([1, 2, 3], max_new_tokens=4)
    assert np.isfinite(step["loss"]) and np.isfinite(val) and len(out) == 4
    assert step["rows_updated"] > 0
    # one train batch, two eval batches, the prompt and three sampled tokens moved ...
    assert moved[:3] == [(4, 33)] * 3 and moved[3] == (1, 3) and len(moved) == 7
    # ... and every batch was indexed from its host array
    assert seen == [np.ndarray] * 7


def test_the_trainer_fetches_the_rows_of_the_batch_it_trains_on(monkeypatch):
    tr = _trainer()
    fetched = []
    real_fetch = tr.memory.fetch
    monkeypatch.setattr(tr.memory, "fetch", lambda rows, requires_grad=True:
                        fetched.append(rows) or real_fetch(rows, requires_grad))
    want_batch = tr.batch("train", np.random.default_rng(0))   # the trainer's first batch
    step = tr.train_step()
    indexer = RowIndexer.build(C.tiny(), tr.vocab)
    assert np.array_equal(fetched[0], indexer.rows(want_batch[:, :-1]))
    assert step["rows_updated"] == np.unique(fetched[0]).size


def test_a_trainer_refuses_a_memory_with_another_table():
    other = TableLayout.build(C.tiny(), CompressedVocab(np.arange(C.model_tiny().vocab_size)))
    differ = r"RowIndexer: table layout .* \(compressed_vocab_size, vocab_digest differ\)"
    with pytest.raises(ValueError, match=differ):
        _trainer_with_memory(LocalMemory(other))
    with pytest.raises(ValueError, match="needs a memory"):
        _trainer_with_memory(None)


def _trainer_with_memory(memory):
    mc = C.model_tiny()
    vocab = CompressedVocab(np.arange(mc.vocab_size) // 2)
    seq = np.arange(400) % mc.vocab_size
    return Trainer(mc, C.tiny(), vocab, memory, seq, seq, TrainConfig(seq_len=16))


def test_training_without_engram_needs_no_memory():
    mc = C.model_tiny()
    seq = np.arange(400) % mc.vocab_size
    tr = Trainer(mc, None, CompressedVocab(np.arange(mc.vocab_size)), None, seq, seq,
                 TrainConfig(seq_len=16, batch_size=2, eval_batches=1))
    step = tr.train_step()
    assert tr.indexer is None and step["rows_updated"] == 0 and step["fetch_seconds"] == 0.0
    assert np.isfinite(tr.evaluate()) and len(tr.generate([1, 2], max_new_tokens=3)) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_trainer_runs_on_cuda_and_matches_the_cpu():
    cpu, gpu = _trainer("cpu"), _trainer("cuda")
    assert gpu.memory.table.is_cuda and next(gpu.model.parameters()).is_cuda
    for _ in range(3):
        a, b = cpu.train_step(), gpu.train_step()
        assert a["rows_updated"] == b["rows_updated"] > 0
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    assert gpu.evaluate() == pytest.approx(cpu.evaluate(), rel=1e-3)
    assert len(gpu.generate([1, 2, 3], max_new_tokens=5)) == 5
