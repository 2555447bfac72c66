"""The BackboneWorker actor and `engram-ray demo`, on a local Ray with a small corpus."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "value", "None", "for", "in", "if"]
    for i in range(30):
        lines = [" ".join(rng.choice(words, size=8)) for _ in range(60)]
        (d / f"f{i:02d}.py").write_text("\n".join(lines))
    return d


def test_demo_command_trains_through_the_service(corpus_dir, tmp_path):
    out = tmp_path / "demo.json"
    ckpt = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "demo", "--corpus", str(corpus_dir),
                        "--steps", "6", "--eval-every", "3", "--batch-size", "4", "--seq-len", "32",
                        "--sample-tokens", "5", "--checkpoint", str(ckpt), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["steps"] == 6 and [v["step"] for v in rep["val_loss"]] == [0, 3, 6]
    assert rep["val_loss"][-1]["loss"] < rep["val_loss"][0]["loss"]
    assert rep["lookups"] > 0 and 0 < rep["dedup_ratio"] <= 1 and rep["bytes_received"] > 0
    assert rep["rows_pushed"] > 0 and all(s["rows_updated"] > 0 for s in rep["shards"])
    assert rep["fetch_seconds"] > 0 and rep["wait_seconds"] >= 0
    assert isinstance(rep["sample"], str)
    assert "summary" in r.stdout and "of the fetch time hidden behind compute" in r.stdout
    # how much of each table the run read (every table, from the shards' HyperLogLogs)
    assert len(rep["table_use"]) == 4 and all(0 < t["utilisation"] <= 1 for t in rep["table_use"])
    assert "table use" in r.stdout
    # the shards saved the rows, the worker the dense weights
    assert len(list((ckpt / "engram").glob("rows-*.json"))) == 2 and (ckpt / "dense.pt").exists()


def test_two_workers_share_one_service(corpus_dir):
    import ray

    from engram_ray import config as C
    from engram_ray.config import TrainConfig
    from engram_ray.core.tokens import CompressedVocab  # noqa: F401
    from engram_ray.data import default_vocab, load_tokenizer
    from engram_ray.runtime import deploy, init_ray, start_worker

    init_ray(num_cpus=2)
    try:
        import dataclasses
        ecfg = C.tiny()
        mcfg = dataclasses.replace(C.model_tiny(), vocab_size=50257)
        vocab = default_vocab(load_tokenizer())
        svc = deploy(ecfg, vocab=vocab, num_shards=2, name="shared-train")
        tcfg = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_batches=1)
        workers = [start_worker("shared-train", mcfg, ecfg, tcfg, corpus=str(corpus_dir), num_cpus=1)
                   for _ in range(2)]
        refs = [w.actor.train.remote(2) for w in workers]  # both at once, on one service
        results = ray.get(refs)
        assert all(len(r) == 2 and r[-1]["rows_updated"] > 0 for r in results)
        updates = sum(d["counters"]["updates"] for d in svc.describe())
        assert updates >= 2 * 2  # every step of both workers reached the shards
        # both read through this node's one lookup agent: its client counts both workers' lookups
        assert all(w.stats()["lookups"] == 2 * 2 * len(ecfg.layer_ids) for w in workers)  # per step, layer, worker
        agents = [a for a in ray.util.list_named_actors(all_namespaces=True) if "/agent/" in a["name"]]
        assert len(agents) == 1, agents
        for w in workers:
            w.shutdown()
        svc.shutdown()
    finally:
        ray.shutdown()
