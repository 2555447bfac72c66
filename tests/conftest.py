"""Shared fixtures: the offline GPT-2 tokenizer, its compressed vocabulary, the reference's
golden hashes, and a cache directory private to the test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "core" / "data"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/engram_ray."""
    old = os.environ.get("ENGRAM_RAY_CACHE")
    os.environ["ENGRAM_RAY_CACHE"] = str(tmp_path_factory.mktemp("engram_cache"))
    yield
    if old is None:
        os.environ.pop("ENGRAM_RAY_CACHE", None)
    else:
        os.environ["ENGRAM_RAY_CACHE"] = old


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from engram_ray.data import load_tokenizer
    return load_tokenizer()


@pytest.fixture(scope="session")
def gpt2_vocab(gpt2_tokenizer):
    from engram_ray.core.tokens import CompressedVocab
    return CompressedVocab.from_tokenizer(gpt2_tokenizer, use_cache=False)


@pytest.fixture(scope="session")
def reference_hashes() -> dict:
    """Output of the reference (deepseek-ai/Engram engram_demo_v1.py) on GPT-2 token ids;
    see "produced_by" in the file."""
    return json.loads((DATA / "reference_hashes.json").read_text())


@pytest.fixture(scope="session")
def tiny_layout():
    """The tiny preset over a 50-id vocabulary: 8,214 rows of 16."""
    import numpy as np

    from engram_ray import config as C
    from engram_ray.core.layout import TableLayout
    from engram_ray.core.tokens import CompressedVocab
    return TableLayout.build(C.tiny(), CompressedVocab(np.arange(50)))
