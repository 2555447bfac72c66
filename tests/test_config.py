import dataclasses
import json

import numpy as np
import pytest

from engram_ray import config as C
from engram_ray.config import EngramConfig


def test_defaults_are_the_reference_demo():
    cfg = EngramConfig()
    assert cfg.engram_vocab_size == (646400, 646400)
    assert (cfg.max_ngram_size, cfg.n_embed_per_ngram, cfg.n_head_per_ngram) == (3, 512, 8)
    assert (cfg.layer_ids, cfg.pad_id, cfg.seed, cfg.kernel_size) == ((1, 15), 2, 0, 4)


def test_paper_27b_preset_geometry():
    cfg = C.paper_27b()
    assert cfg.engram_vocab_size == (2_262_400, 2_262_400)
    assert list(cfg.orders) == [2, 3] and cfg.n_head_per_ngram == 8
    assert cfg.memory_dim == 1280 and cfg.row_dim == 80
    assert cfg.layer_ids == (2, 15)


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_every_preset_builds_and_round_trips_json(name, tmp_path):
    cfg = C.preset(name)
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    assert EngramConfig.from_json(path) == cfg
    assert EngramConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(path.read_text()) == cfg.to_dict()


def test_preset_name_accepts_dashes_and_rejects_unknown():
    assert C.preset("paper-27b") == C.paper_27b()
    with pytest.raises(ValueError, match="unknown preset 'gpt5'.*paper_27b"):
        C.preset("gpt5")


def test_config_is_frozen_and_lists_become_tuples():
    cfg = EngramConfig(layer_ids=[3, 4], engram_vocab_size=[11, 13])
    assert cfg.layer_ids == (3, 4) and cfg.engram_vocab_size == (11, 13)
    hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_unknown_json_key_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown key.*'n_heads'"):
        EngramConfig.from_dict({"n_heads": 4})
    with pytest.raises(ValueError, match="expected a JSON object"):
        EngramConfig.from_json("[1, 2]")
    with pytest.raises(ValueError, match="not valid JSON"):
        EngramConfig.from_json("{oops")


@pytest.mark.parametrize("field,value,match", [
    ("max_ngram_size", 1, "max_ngram_size=1"),
    ("max_ngram_size", 2.0, "max_ngram_size=2.0: expected an integer"),
    ("n_head_per_ngram", 0, "n_head_per_ngram=0"),
    ("n_embed_per_ngram", 30, "n_embed_per_ngram=30: expected a multiple of n_head_per_ngram=8"),
    ("engram_vocab_size", [100], r"engram_vocab_size=\[100\]: expected one size per n-gram order"),
    ("engram_vocab_size", [1, 5], "engram_vocab_size.*sizes in"),
    ("engram_vocab_size", "12", "engram_vocab_size='12': expected a list of integers"),
    ("layer_ids", [], r"layer_ids=\[\]"),
    ("layer_ids", [1, 1], "distinct"),
    ("layer_ids", [-1], "distinct non-negative"),
    ("layer_ids", [True], "layer_ids"),
    ("pad_id", -2, "pad_id=-2"),
    ("seed", -1, "seed=-1"),
    ("kernel_size", 0, "kernel_size=0"),
])
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        EngramConfig(**{field: value})


@pytest.mark.parametrize("cfg", [C.model_tiny(), C.model_demo(), C.TrainConfig(), C.StoreConfig(dtype="bf16"),
                                 C.OptimizerConfig(kind="sgd", lr=0.5)])
def test_other_configs_round_trip_and_refuse_unknown_keys(cfg):
    cls = type(cfg)
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=f"{cls.__name__}: unknown key.*'bogus'"):
        cls.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize("cls,field,value,match", [
    (C.ModelConfig, "ffn", "mlp", "ffn='mlp': expected one of moe, dense"),
    (C.ModelConfig, "hc_mult", 0, "hc_mult=0"),
    (C.TrainConfig, "lr", 0.0, "lr=0.0"),
    (C.StoreConfig, "dtype", "int8", "dtype='int8'"),
    (C.OptimizerConfig, "kind", "lion", "kind='lion'"),
])
def test_bad_values_in_other_configs_name_the_field(cls, field, value, match):
    with pytest.raises(ValueError, match=match):
        cls(**{field: value})


def test_storage_dtypes_are_one_list_with_one_alias_table():
    import numpy as np

    from engram_ray.core.dtypes import numpy_dtype
    from engram_ray.core.layout import DTYPE_BYTES, dtype_bytes
    from engram_ray.rpc.codec import WIRE_DTYPES
    assert C.STORE_DTYPES == tuple(C.STORE_DTYPE_BYTES) == tuple(DTYPE_BYTES)
    assert set(C.STORE_DTYPES) <= set(WIRE_DTYPES)
    for name, width in C.STORE_DTYPE_BYTES.items():
        assert np.dtype(numpy_dtype(name)).itemsize == width
    for alias, name in C.DTYPE_ALIASES.items():  # the config and the planner read aliases alike
        none = C.OptimizerConfig(kind="none")  # an FP8 table is read-only: no optimiser
        assert C.StoreConfig(dtype=alias, optimizer=none).dtype == name == dtype_bytes(alias)[0]
    with pytest.raises(ValueError, match="read-only"):
        C.StoreConfig(dtype="fp8")
    with pytest.raises(ValueError, match="'int8'"):
        C.StoreConfig(dtype="int8")
    with pytest.raises(ValueError, match="'int8'"):
        dtype_bytes("int8")


def test_deepseek_v41_flash_has_the_checkpoints_row_counts():
    # issue 14: the checkpoint's two Engram layers hold 384,006,168 and 384,016,682 rows of
    # 256 values; vocabularies of 16,000,000 per head give exactly those through the primes
    from engram_ray.core.layout import TableLayout
    from engram_ray.core.tokens import CompressedVocab

    cfg = C.preset("deepseek_v41_flash")
    assert cfg.layer_ids == (1, 14) and list(cfg.orders) == [2, 3, 4] and cfg.n_head_per_ngram == 8
    assert cfg.row_dim == 256
    layout = TableLayout.build(cfg, CompressedVocab(np.arange(1000)))
    assert layout.layer_rows == (384_006_168, 384_016_682)
