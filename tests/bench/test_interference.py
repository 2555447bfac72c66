"""bench interference: loads run pinned to the memory cores (read back from /proc), the forward
on the compute cores, a report per load; bad settings are refused before anything starts."""

import dataclasses
import os

import pytest

from engram_ray import config as C
from engram_ray.bench import interference

two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to split")


@two_cores
def test_every_load_runs_on_the_memory_cores_and_is_reported():
    cfg = dataclasses.replace(C.model_tiny(), n_layers=1)
    rep = interference.run(cfg, rounds=2, positions=2, table_gib=0.005, rows=16)
    iso = rep["isolation"]
    assert iso["compute_cores"] and iso["memory_cores"] and not set(iso["compute_cores"]) & set(iso["memory_cores"])
    assert list(rep["results"]) == list(interference.LOADS)
    assert rep["results"]["idle"]["slowdown"] == 0.0 and rep["results"]["idle"]["cpus"] == []
    for kind in ("spin", "gather", "stream"):
        r = rep["results"][kind]
        assert r["cpus"] == iso["memory_cores"]          # what the kernel enforced, from /proc
        assert len(r["runs_s"]) == 2 and r["median_s"] > 0 and r["quartiles_s"][0] <= r["quartiles_s"][1]
    assert not [p for p in __import__("multiprocessing").active_children() if p.is_alive()]  # loads stopped


@pytest.mark.parametrize("kwargs, message", [
    ({"loads": ("spin",)}, "with 'idle'"),
    ({"loads": ("idle", "disk")}, "expected some of"),
    ({"positions": 10_000}, "max_seq_len"),
    ({"rounds": 0}, "rounds=0"),
    ({"table_gib": 0.0}, "table_gib=0.0"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        interference.run(C.model_tiny(), **kwargs)
