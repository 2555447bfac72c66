"""``bench overlap`` on a tiny table: every condition timed and paired, the agent_only setting
answered from the agent's cache (the shards idle), the shards setting by the shards; bad
settings refused before anything starts."""

import os

import numpy as np
import pytest

from engram_ray import config as C
from engram_ray.bench import overlap
from engram_ray.core.tokens import CompressedVocab

VOCAB = CompressedVocab(np.arange(97) // 2)
two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to split")


@pytest.mark.parametrize("kwargs, message", [
    ({"iterations": 0}, "iterations=0"),
    ({"layers": 0}, "layers=0"),
    ({"batch": 0}, "batch=0"),
    ({"settings": ("shards", "remote")}, "settings"),
    ({"settings": ()}, "settings"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        overlap.run(C.tiny(), C.model_preset("tiny"), VOCAB, **kwargs)


@two_cores
@pytest.mark.ray
@pytest.mark.slow
def test_both_settings_time_every_condition_and_the_cache_answers_agent_only():
    r = overlap.run(C.tiny(), C.model_preset("tiny"), VOCAB, iterations=4, batch=2, shards=2,
                    max_resident_gib=0.01)
    assert r["chunk"]["layers"] == min(C.tiny().layer_ids) and r["isolation"]["ok"]
    for setting in overlap.SETTINGS:
        res = r["results"][setting]
        assert set(res["conditions"]) == set(overlap.CONDITIONS) and res["round_trip_us"] > 0
        assert res["spin_s"] > 0 and {"median", "quartiles"} <= set(res["sleep_us"]) <= set(res["memory_work_us"])
        assert res["conditions"]["none"]["extra_us"] == 0.0       # the baseline, paired with itself
        assert all(c["median_us"] > 0 for c in res["conditions"].values())
        assert res["lookups"] > 0
    assert r["results"]["shards"]["cache"] is None and r["results"]["shards"]["timed_cache_misses"] is None
    only = r["results"]["agent_only"]
    # warmed: the timed lookups hit (a shard silent for cache_max_age_s is asked again: a few rows)
    assert only["cache"]["hits"] > 0 and 0 <= only["timed_cache_misses"] <= 0.1 * only["cache"]["hits"]


def test_the_cli_offers_the_benchmarks_settings():
    from engram_ray.cli import overlap as cli_overlap
    assert cli_overlap.SETTINGS == overlap.SETTINGS
