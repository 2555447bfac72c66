"""RowIndexer: tokens -> global row ids in one call, the reference's ids plus the layout's
offsets, the same rows whether decoded step by step or hashed whole; host numpy only."""

import dataclasses

import numpy as np
import pytest
import torch

from engram_ray import config as C
from engram_ray.config import EngramConfig
from engram_ray.core.hashing import NgramHasher
from engram_ray.core.indexer import RowIndexer
from engram_ray.core.layout import TableLayout
from engram_ray.core.tokens import CompressedVocab


@pytest.fixture(scope="module")
def vocab():
    return CompressedVocab(np.arange(97) // 2)  # 97 token ids -> 49 compressed ids


def test_rows_are_the_reference_ids_plus_the_layout_offsets(reference_hashes, gpt2_vocab):
    case = reference_hashes["configs"]["paper_27b"]
    cfg = EngramConfig.from_dict(case["config"])
    indexer = RowIndexer.build(cfg, gpt2_vocab)
    tokens_bt = np.array(reference_hashes["token_ids"])
    rows = indexer.rows(tokens_bt)
    assert rows.dtype == np.int64
    assert rows.shape == (len(cfg.layer_ids), *tokens_bt.shape, cfg.heads_per_layer)
    for li, layer in enumerate(cfg.layer_ids):
        want = np.array(case["hash_ids"][str(layer)]) + indexer.layout.offsets[li]
        assert np.array_equal(rows[li], want)


def test_rows_equal_the_pipeline_written_out(vocab):
    cfg = C.tiny()
    indexer = RowIndexer.build(cfg, vocab)
    layout, hasher = TableLayout.build(cfg, vocab), NgramHasher.from_vocab(cfg, vocab)
    assert indexer.layout == layout and indexer.layer_ids == cfg.layer_ids
    tokens_bt = np.random.default_rng(0).integers(0, 97, size=(3, 40))
    heads = hasher.hash(vocab(tokens_bt))
    want = np.stack([layout.row_ids(layer, heads[layer]) for layer in cfg.layer_ids])
    assert np.array_equal(indexer.rows(tokens_bt), want)
    assert 0 <= want.min() and want.max() < layout.total_rows


@pytest.mark.parametrize("cuts", [(1,) * 12, (5, 1, 1, 4, 1), (12,)])
def test_decoding_step_by_step_reads_the_rows_of_the_whole_sequence(vocab, cuts):
    indexer = RowIndexer.build(C.tiny(), vocab)
    tokens_bt = np.random.default_rng(1).integers(0, 97, size=(3, sum(cuts)))
    hist = indexer.new_history(3)
    assert hist.shape == (3, C.tiny().max_ngram_size - 1)
    pieces, start = [], 0
    for n in cuts:
        rows, hist = indexer.step(hist, tokens_bt[:, start:start + n])
        assert rows.shape == (2, 3, n, indexer.num_heads)
        pieces.append(rows)
        start += n
    assert np.array_equal(np.concatenate(pieces, axis=2), indexer.rows(tokens_bt))


def test_torch_tensors_are_refused_even_on_the_cpu(vocab):
    """Callers index a batch before it moves to a device; a tensor here means they did not."""
    indexer = RowIndexer.build(C.tiny(), vocab)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(TypeError, match=r"RowIndexer.rows: tokens_bt must be a numpy array in host "
                                        r"memory, got torch.Tensor; index a batch before it moves"):
        indexer.rows(tokens)
    with pytest.raises(TypeError, match="RowIndexer.step: new_bt must be a numpy array"):
        indexer.step(indexer.new_history(2), tokens)
    with pytest.raises(TypeError, match="RowIndexer.step: history_bn must be a numpy array"):
        indexer.step(torch.zeros(2, 2, dtype=torch.long), tokens.numpy())
    with pytest.raises(TypeError, match="got builtins.list"):
        indexer.rows([[1, 2, 3]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_tensors_are_refused(vocab):
    indexer = RowIndexer.build(C.tiny(), vocab)
    with pytest.raises(TypeError, match="numpy array in host memory"):
        indexer.rows(torch.zeros(2, 5, dtype=torch.long, device="cuda"))


def test_bad_shapes_and_ids(vocab):
    indexer = RowIndexer.build(C.tiny(), vocab)
    with pytest.raises(ValueError, match=r"tokens_bt must be \[batch, time\], got shape \(5,\)"):
        indexer.rows(np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="outside the tokenizer vocabulary of 97"):
        indexer.rows(np.full((1, 3), 97))
    with pytest.raises(ValueError, match="history shape"):
        indexer.step(indexer.new_history(1), np.zeros((2, 1), np.int64))


def test_a_layout_of_another_config_or_vocabulary_is_refused(vocab):
    cfg = C.tiny()
    with pytest.raises(ValueError, match=r"\(compressed_vocab_size, vocab_digest differ\)"):
        RowIndexer.build(cfg, vocab, layout=TableLayout.build(cfg, CompressedVocab(np.arange(97))))
    other = dataclasses.replace(cfg, seed=1)
    with pytest.raises(ValueError, match=r"\(seed differ\)"):
        RowIndexer.build(cfg, vocab, layout=TableLayout.build(other, vocab))
    with pytest.raises(ValueError, match="hasher was built for 10"):
        RowIndexer(vocab, NgramHasher(cfg, 10, 0), TableLayout.build(cfg, vocab))
