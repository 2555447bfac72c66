import hashlib

import numpy as np
import pytest

from engram_ray.core import tokens as T
from engram_ray.core.tokens import CompressedVocab, reference_normalizer


def _word_level(tokens: list[str]):
    from tokenizers import Tokenizer, models
    return Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))


def _reference_style_lookup(tok) -> np.ndarray:
    """The reference's loop, written plainly: decode each id alone through the object's own
    decode(), key by raw token on U+FFFD, else by normalised text; first-seen numbering."""
    norm = reference_normalizer()
    key2new, out = {}, []
    for tid in range(len(tok)):
        text = tok.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tok.convert_ids_to_tokens(tid)
        else:
            key = norm.normalize_str(text) or text
        out.append(key2new.setdefault(key, len(key2new)))
    return np.array(out, dtype=np.int64)


def test_gpt2_compression_equals_the_reference(gpt2_vocab, reference_hashes):
    # Measured reduction: 50,257 GPT-2 tokens -> 32,962 compressed ids (34.4 % fewer).
    assert gpt2_vocab.num_tokens == 50257
    assert gpt2_vocab.size == reference_hashes["compressed_vocab_size"] == 32962
    digest = hashlib.sha256(gpt2_vocab.lookup.astype("<i8").tobytes()).hexdigest()
    assert digest == reference_hashes["compressed_lookup_sha256"]
    ids = np.array(reference_hashes["token_ids"])
    assert gpt2_vocab(ids).tolist() == reference_hashes["compressed_token_ids"]
    assert 0.60 < gpt2_vocab.ratio < 0.70


def test_hand_derived_compression():
    toks = ["The", "the", "THE", "café", "cafe", "  ", "\n", "Straße", "ΟΔΟΣ", "οδοσ",
            "X\t\tY", "ＡＢＣ", "abc", "\ufffd", "Ⅻ"]
    vocab = CompressedVocab.from_tokenizer(_word_level(toks), use_cache=False)
    # the | cafe (accent stripped) | " " (whitespace-only keeps one space) | straße |
    # οδοσ (per-char lowercase, no final sigma) | "x y" | abc (NFKC folds full width) |
    # raw "\ufffd" | xii (NFKC of the Roman numeral twelve)
    assert vocab.lookup.tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 8]
    assert vocab.size == 9
    assert vocab.lookup.tolist() == _reference_style_lookup(_Wrapped(_word_level(toks))).tolist()


class _Wrapped:
    """Plain-loop access to a tokenizers.Tokenizer in the transformers call style."""

    def __init__(self, tok):
        self.tok = tok

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, tid):
        return self.tok.id_to_token(tid)


def test_transformers_fast_tokenizer_matches_its_own_decode_loop(gpt2_tokenizer, gpt2_vocab):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=gpt2_tokenizer)
    vocab = CompressedVocab.from_tokenizer(hf, use_cache=False)
    assert np.array_equal(vocab.lookup, gpt2_vocab.lookup)
    # A WordLevel tokenizer whose wrapper cleans up spaces before punctuation: the wrapper's
    # own decode() decides the keys, exactly as in the reference.
    toks = [".", " .", " ,", ",", "don", " n't", "n't", "a b", "x"]
    hf2 = transformers.PreTrainedTokenizerFast(tokenizer_object=_word_level(toks),
                                               clean_up_tokenization_spaces=True)
    v2 = CompressedVocab.from_tokenizer(hf2, use_cache=False)
    assert v2.lookup.tolist() == _reference_style_lookup(hf2).tolist()


def test_call_maps_any_shape_and_keeps_negative_ids(gpt2_vocab):
    ids = np.array([[[464, -1], [0, 50256]]])
    out = gpt2_vocab(ids)
    assert out.shape == ids.shape and out.dtype == np.int64
    assert out[0, 0, 1] == -1
    assert out[0, 0, 0] == gpt2_vocab.lookup[464]
    assert gpt2_vocab(np.array([], dtype=np.int32)).size == 0


def test_bad_ids_are_refused_with_the_value(gpt2_vocab):
    with pytest.raises(ValueError, match="token id 50257 is outside the tokenizer vocabulary of 50257"):
        gpt2_vocab([1, 50257])
    with pytest.raises(ValueError, match="must be integers, got dtype float64"):
        gpt2_vocab([1.0])
    with pytest.raises(ValueError, match="token id -1"):
        gpt2_vocab.compress_id(-1)
    with pytest.raises(ValueError, match="expected a tokenizers.Tokenizer"):
        CompressedVocab.from_tokenizer(object())


def test_lookup_is_read_only(gpt2_vocab):
    with pytest.raises(ValueError):
        gpt2_vocab.lookup[0] = 5


def test_cache_is_keyed_by_content_and_survives_a_torn_file(tmp_path, monkeypatch, gpt2_tokenizer):
    v1 = CompressedVocab.from_tokenizer(gpt2_tokenizer, cache_dir=tmp_path)
    files = list((tmp_path / "vocab").glob("*.npy"))
    assert len(files) == 1
    # A second build is a file read: decoding is never called.
    monkeypatch.setattr(T._TokenizerView, "decode_each", lambda self: pytest.fail("cache missed"))
    v2 = CompressedVocab.from_tokenizer(gpt2_tokenizer, cache_dir=tmp_path)
    assert np.array_equal(v1.lookup, v2.lookup) and v1.digest == v2.digest
    # A different tokenizer gets its own entry.
    monkeypatch.undo()
    small = _word_level(["a", "A", "b"])
    assert CompressedVocab.from_tokenizer(small, cache_dir=tmp_path).size == 2
    assert len(list((tmp_path / "vocab").glob("*.npy"))) == 2
    # A torn cache file is rebuilt, not trusted.
    files[0].write_bytes(b"\x93NUMPY garbage")
    v3 = CompressedVocab.from_tokenizer(gpt2_tokenizer, cache_dir=tmp_path)
    assert np.array_equal(v3.lookup, v1.lookup)


def test_from_keys_numbers_in_first_seen_order():
    v = CompressedVocab.from_keys(["b", "a", "b", "c", "a", None, None])
    assert v.lookup.tolist() == [0, 1, 0, 2, 1, 3, 3] and v.size == 4 and len(v) == 4
