"""Vocabulary compression: many tokenizer ids that mean the same word share one id.

Engram hashes *compressed* ids, so that " The", "the" and "THE" feed the same n-gram rows.
The mapping must be bit-identical to the reference (``CompressedTokenizer`` in
``engram_demo_v1.py``): decode each id alone; if the text holds U+FFFD key it by the raw
token string, else by the text normalised with the ``tokenizers`` sequence

    NFKC -> NFD -> StripAccents -> Lowercase -> Replace([ \\t\\r\\n]+, " ")
         -> Replace(^ $, SENTINEL) -> Strip -> Replace(SENTINEL, " ")

and number the keys in first-seen order of token id.

The normaliser is the real ``tokenizers`` one, imported when a vocabulary is built from a
tokenizer (which is itself a ``tokenizers`` object, so nothing new gets loaded). A
standard-library re-statement was tried and differs on ~440 code points: the Rust crates'
mark and NFKC tables are older than Python's ``unicodedata`` and Rust's lowercasing is newer,
so only the same library gives the same ids. The ``tokenizers`` version keys the cache, and
the vocabulary digest enters the table fingerprint, so two machines that disagree are caught.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CompressedVocab", "reference_normalizer", "default_cache_dir"]

log = logging.getLogger(__name__)

#: Bump when the compression rule changes: it keys the on-disk cache.
_RULE_VERSION = "engram-compress-v1"
_SENTINEL = "\ue000"
_REPLACEMENT_CHAR = "\ufffd"


def default_cache_dir() -> Path:
    """Where derived artefacts (compressed vocabularies, tokenised corpora) are cached:
    ``$ENGRAM_RAY_CACHE`` or ``~/.cache/engram_ray``."""
    return Path(os.environ.get("ENGRAM_RAY_CACHE", Path.home() / ".cache" / "engram_ray"))


def reference_normalizer() -> Any:
    """The reference's ``tokenizers`` normaliser sequence (``.normalize_str(text)``)."""
    tk = importlib.import_module("tokenizers")
    n = tk.normalizers
    return n.Sequence([
        n.NFKC(), n.NFD(), n.StripAccents(), n.Lowercase(),
        n.Replace(tk.Regex(r"[ \t\r\n]+"), " "),
        # "^ $": a whitespace-only token keeps one space instead of stripping to "".
        n.Replace(tk.Regex(r"^ $"), _SENTINEL),
        n.Strip(),
        n.Replace(_SENTINEL, " "),
    ])


class _TokenizerView:
    """Uniform access to a ``tokenizers.Tokenizer`` or a transformers fast tokenizer, by
    duck typing so that ``core`` imports neither."""

    def __init__(self, tok: Any):
        self.tok = tok
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:  # transformers PreTrainedTokenizerFast
            self.backend, self.is_transformers = backend, True
            self.size = len(tok)
        elif hasattr(tok, "decode_batch") and hasattr(tok, "id_to_token"):
            self.backend, self.is_transformers = tok, False
            self.size = tok.get_vocab_size(with_added_tokens=True)
        else:
            raise ValueError(
                f"CompressedVocab.from_tokenizer: got {type(tok).__name__}; expected a "
                "tokenizers.Tokenizer or a transformers fast tokenizer (with .backend_tokenizer)")

    def content_hash(self) -> str:
        h = hashlib.sha256(_RULE_VERSION.encode())
        h.update(importlib.import_module("tokenizers").__version__.encode())
        h.update(self.backend.to_str().encode())
        if self.is_transformers:
            # The wrapper's decode options can change decoded text, so they key the cache too.
            for attr in ("clean_up_tokenization_spaces",
                         "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
                h.update(f"{attr}={getattr(self.tok, attr, None)!r}".encode())
            h.update(type(self.tok).__name__.encode())
        return h.hexdigest()

    def decode_each(self) -> list[str]:
        """``decode([tid], skip_special_tokens=False)`` for every id, as the reference does."""
        texts = self.backend.decode_batch([[i] for i in range(self.size)],
                                          skip_special_tokens=False)
        if self.is_transformers:
            # A transformers wrapper may post-process (clean_up_tokenization removes spaces
            # before punctuation), which only ever touches text with a space in it: re-decode
            # exactly those through the wrapper itself, whatever its version does.
            for i, t in enumerate(texts):
                if " " in t:
                    texts[i] = self.tok.decode([i], skip_special_tokens=False)
        return texts

    def raw_token(self, tid: int) -> str | None:
        if self.is_transformers:
            return self.tok.convert_ids_to_tokens(tid)
        return self.backend.id_to_token(tid)


class CompressedVocab:
    """Maps tokenizer ids onto compressed ids (first-seen order of token id).

    ``lookup[tid]`` is the compressed id of token ``tid``; ``size`` is the number of
    compressed ids. Calling the vocab maps an id array of any shape; negative ids (padding
    sentinels) pass through unchanged, as in the reference.
    """

    def __init__(self, lookup: np.ndarray):
        lookup = np.ascontiguousarray(lookup, dtype=np.int64)
        if lookup.ndim != 1 or lookup.size == 0:
            raise ValueError(f"CompressedVocab: lookup must be a non-empty 1-D array, "
                             f"got shape {lookup.shape}")
        self.lookup = lookup
        self.lookup.flags.writeable = False
        self.size = int(lookup.max()) + 1
        #: Content digest: any change that moves a compressed id changes it.
        self.digest = hashlib.sha256(lookup.tobytes()).hexdigest()[:16]

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"CompressedVocab(tokens={self.lookup.size}, compressed={self.size}, "
                f"digest={self.digest})")

    @property
    def num_tokens(self) -> int:
        """Size of the original tokenizer vocabulary."""
        return int(self.lookup.size)

    @property
    def ratio(self) -> float:
        """Compressed size / original size (the paper reports ~0.77 for a 128k vocabulary)."""
        return self.size / self.lookup.size

    def __call__(self, ids: Any) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"CompressedVocab: token ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and arr.max() >= self.lookup.size:
            bad = int(arr.max())
            raise ValueError(f"CompressedVocab: token id {bad} is outside the tokenizer "
                             f"vocabulary of {self.lookup.size} ids")
        # lookup[] on a clipped copy then a where() is branch-free and keeps negatives.
        return np.where(arr >= 0, self.lookup[np.maximum(arr, 0)], arr)

    def compress_id(self, tid: int) -> int:
        """The compressed id of one token id (used for the pad id)."""
        if not 0 <= tid < self.lookup.size:
            raise ValueError(f"CompressedVocab: token id {tid} is outside the tokenizer "
                             f"vocabulary of {self.lookup.size} ids")
        return int(self.lookup[tid])

    # Construction --------------------------------------------------------------------
    @classmethod
    def from_keys(cls, keys: list[str | None]) -> CompressedVocab:
        """Assign compressed ids to per-token keys in first-seen order."""
        key2new: dict[str | None, int] = {}
        # setdefault with len() assigns ids in first-seen order in one C-level pass.
        lookup = np.fromiter((key2new.setdefault(k, len(key2new)) for k in keys),
                             dtype=np.int64, count=len(keys))
        return cls(lookup)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, *, cache_dir: str | Path | None = None,
                       use_cache: bool = True) -> CompressedVocab:
        """Build from a ``tokenizers.Tokenizer`` or a transformers fast tokenizer.

        The result is cached on disk under the tokenizer's content hash, so the second
        build of the same vocabulary is a file read.
        """
        view = _TokenizerView(tokenizer)
        cache_path = None
        if use_cache:
            cache_path = Path(cache_dir or default_cache_dir()) / "vocab" / f"{view.content_hash()}.npy"
            if cache_path.exists():
                try:
                    return cls(np.load(cache_path))
                except (OSError, ValueError) as e:  # a torn or foreign file: rebuild it
                    log.warning("ignoring unreadable vocab cache %s (%s)", cache_path, e)
        texts = view.decode_each()
        normalize = reference_normalizer().normalize_str
        keys: list[str | None] = []
        for tid, text in enumerate(texts):
            if _REPLACEMENT_CHAR in text:
                # A partial UTF-8 sequence: the raw token string keeps byte pieces apart.
                # (An id with no token gives None, which like the reference's dict key
                # merges all such holes into one compressed id.)
                keys.append(view.raw_token(tid))
            else:
                norm = normalize(text)
                keys.append(norm if norm else text)
        vocab = cls.from_keys(keys)
        if cache_path is not None:
            _atomic_save(cache_path, vocab.lookup)
        log.info("compressed vocabulary: %d -> %d ids (%.1f%%)", vocab.num_tokens, vocab.size,
                 100 * vocab.ratio)
        return vocab


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    """Write via a temp file and rename, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)
