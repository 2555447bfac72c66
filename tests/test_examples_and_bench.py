import json
import subprocess
import sys
from pathlib import Path

import pytest

from engram_ray import config as C
from engram_ray.bench import hash as bench_hash
from engram_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_example_runs_and_checks_itself():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "hash_and_place.py"), "hello world"],
                         capture_output=True, text=True, check=True)
    assert "incremental decoding reads the same rows: yes" in out.stdout
    assert "lookups per shard" in out.stdout


def test_reference_loop_baseline_gives_the_same_ids():
    import numpy as np

    from engram_ray.core.hashing import NgramHasher
    h = NgramHasher(C.tiny(), 500, 3)
    x = np.random.default_rng(0).integers(0, 500, size=(3, 17))
    got, want = h.hash(x), bench_hash.reference_loop(h, x)
    assert all(np.array_equal(got[layer], want[layer]) for layer in h.layer_ids)


def test_bench_hash_writes_well_formed_json(tmp_path, capsys):
    out = tmp_path / "hash.json"
    assert main(["bench", "hash", "--preset", "tiny", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "hash" and report["statistic"] == "median"
    assert report["machine"]["cores"] >= 1 and report["time_utc"]
    assert {r["phase"] for r in report["results"]} == {"prefill", "decode"}
    for r in report["results"]:
        assert r["ours_tokens_per_s"] > 0 and r["reference_tokens_per_s"] > 0 and r["speedup"] > 0
    assert "speedup" in capsys.readouterr().out


@pytest.mark.ray
@pytest.mark.slow
def test_bench_lookup_writes_well_formed_json(tmp_path):
    out = tmp_path / "lookup.json"
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "bench", "lookup", "--preset", "tiny",
                        "--shards", "1", "2", "--batch", "64", "512", "--repeats", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "lookup" and report["statistic"] == "median"
    assert [(x["shards"], x["rows"]) for x in report["results"]] == [(1, 64), (1, 512), (2, 64), (2, 512)]
    for x in report["results"]:
        assert x["client_rows_per_s"] > 0 and x["local_rows_per_s"] > 0 and x["client_over_local"] > 0
        assert x["bytes"] == x["rows"] * report["row_bytes"]
    assert "client/local time" in r.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_deploy_example_runs():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "deploy_and_prefetch.py")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "prefetch issued" in r.stdout and "pushed gradients to" in r.stdout
    assert r.stdout.count("rows served") == 2


@pytest.mark.ray
@pytest.mark.slow
def test_bench_offload_writes_json_and_a_plot(tmp_path):
    out = tmp_path / "offload.json"
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "bench", "offload", "--preset", "tiny",
                        "--max-resident-gib", "0.0001", "--sequences", "2", "--min-len", "8", "--max-len", "16",
                        "--decode-batch", "2", "--decode-tokens", "2", "--requests", "3", "--prompt-len", "6", "12",
                        "--output-len", "2", "4", "--max-batch", "2", "--token-budget", "8", "--repeats", "2",
                        "--profile", "--trace", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["benchmark"] == "offload" and rep["statistic"] == "median"
    assert set(rep["results"]) == {"no_engram", "local", "remote", "remote_lazy"}
    assert rep["phases"] == ["prefill", "decode", "serving"]
    assert all(v[f"{ph}_tokens_per_s"] > 0 for v in rep["results"].values() for ph in rep["phases"])
    assert {"prefill:remote_vs_local", "decode:remote_vs_local", "serving:remote_vs_local",
            "serving:remote_lazy_vs_local", "serving:local_vs_no_engram"} <= set(rep["overhead"])
    iso = rep["isolation"]  # two or more cores: split, and the kernel agrees (read from /proc)
    if rep["machine"]["cores"] >= 2:
        assert iso["enabled"] and iso["ok"] and iso["model_thread"]["cpus"] == iso["compute_cores"]
        names = {p["name"] for p in iso["processes"]}
        assert "raylet" in names and any(n.startswith("ray::ShardServ") for n in names)
        assert all(p["cpus"] == iso["memory_cores"] for p in iso["processes"])
    assert rep["table"]["capped"] and rep["table"]["resident_rows"] < rep["table"]["logical_rows"]
    assert "decode:remote_vs_local" in rep["overhead"] and rep["machine"]["cores"] >= 1
    pair = rep["overhead_paired"]["decode:remote_vs_local"]  # per-repetition losses, with their spread
    assert pair["min"] <= pair["q1"] <= pair["median"] <= pair["q3"] <= pair["max"]
    assert "paired within each repetition" in r.stdout
    for v in rep["results"].values():  # spread around the median
        sp = v["prefill_spread_s"]
        assert sp["min"] <= v["prefill_s"] <= sp["max"] and sp["q1"] <= sp["q3"]
    # the breakdown adds up to the run, and only Engram modes hash and fetch
    for key, b in rep["breakdown"].items():
        assert b["total_s"] == pytest.approx(b["compute_s"] + b["hash_s"] + b["issue_s"] + b["wait_s"]
                                             + b["stage_s"])
        assert (b["hash_s"] > 0) == (not key.endswith("no_engram"))
        assert (b["stage_s"] > 0) == (":remote" in key)  # staging and the expand: remote rows only
        assert 0 <= b["off_cpu_s"] <= b["total_s"]     # asleep: a part of the run, beside the others
        if iso["enabled"]:  # the memory cores' busy seconds in the run, whoever spent them
            assert b["memory_busy_s"] >= 0
    lazy = rep["breakdown"]["prefill:remote_lazy"]
    assert lazy["issue_s"] < lazy["wait_s"]  # on demand: the fetch is issued and waited for inside rows()
    pl = rep["per_lookup"]
    assert pl["rpcs_per_lookup"] >= 1 and pl["server_handler_ms_per_rpc"] > 0
    # the agent's direct lookups ride the shards' LookupStreams (the service's default)
    assert rep["memory"]["max_lookup_streams"] == 16 and 0 < pl["lookups_streamed"] <= pl["lookups_direct"]
    assert pl["client_io_ms"]["in_flight"] > 0
    assert rep["profile_top"] and all(f["own_s"] >= 0 for f in rep["profile_top"])
    path = {f["function"].split(":")[0] for f in rep["profile_top"] if f.get("path")}
    assert "remote_memory.py" in path  # the memory path is listed beside the top functions
    assert "cProfile of one remote run" in r.stdout and "where a run's time goes" in r.stdout
    tr = rep["trace"]  # --trace: one decode run (the default phase) per mode under torch.profiler
    assert tr["phase"] == "decode" and set(tr["modes"]) == set(rep["results"])
    for t in tr["modes"].values():
        assert t["wall_ms"] > 0 and t["host_top"] and t["device_busy_ms"] is None  # CPU: no device side
    assert "torch.profiler, one decode run per mode" in r.stdout
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = tmp_path / "RESULTS.md"
    assert main(["bench", "report", "--results", str(tmp_path), "--out", str(page)]) == 0
    text = page.read_text()
    assert "## Offload" in text and "| prefill:remote |" in text and "shard handler" in text
    assert "| serving:remote |" in text and "serving tokens/s" in text and "Cores: the model thread" in text


RAY_FREE = r"""
import json, sys
from engram_ray.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "ray_loaded": "ray" in sys.modules}))
"""


@pytest.mark.slow
def test_bench_offload_against_running_shards_without_ray(tmp_path, gpt2_vocab):
    """--memory-at: shards that already serve (here, in this process), no Ray anywhere; the
    serving phase fetches from them."""
    import numpy as np

    from engram_ray.core.layout import TableLayout
    from engram_ray.rpc import create_server
    from engram_ray.store import TableShard

    layout = TableLayout.build(C.tiny(), gpt2_vocab)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    shards = [TableShard.create(layout, 2, i, C.StoreConfig(init_std=0.02)) for i in range(2)]
    servers = [create_server(sh, "127.0.0.1", 0, token="s3cret") for sh in shards]
    out = tmp_path / "offload.json"
    try:
        r = subprocess.run([sys.executable, "-c", RAY_FREE, "bench", "offload", "--preset", "tiny", "--model", "tiny",
                            "--memory-at", ",".join(f"127.0.0.1:{p}" for _, p in servers),
                            "--token-file", str(token), "--sequences", "2", "--min-len", "8", "--max-len", "12",
                            "--decode-batch", "2", "--decode-tokens", "2", "--requests", "3", "--prompt-len", "6",
                            "10", "--output-len", "2", "3", "--max-batch", "2", "--repeats", "1", "--microbatches", "2",
                            "--cache-gib", "0.01", "--agent-spin-ms", "0.5", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        last = json.loads(r.stdout.strip().splitlines()[-1])
        assert last == {"code": 0, "ray_loaded": False}
        rep = json.loads(out.read_text())
        # the default way in is the node-local lookup agent (a plain process here, no Ray)
        assert rep["memory"]["source"] == "running" and rep["memory"]["via"] == "agent"
        assert rep["memory"]["agent_spin_s"] == 0.0005  # --agent-spin-ms reaches the worker's client
        # through the agent no gRPC client lives in the model's process: no I/O thread of one
        py_threads = {t["name"] for t in rep["isolation"]["threads"] if t["python"]}
        assert not any(n.startswith("engram-client") for n in py_threads), py_threads
        fc = rep["fetch_cost"]  # the model thread's cost per fetch, measured in the bench
        assert fc["layers"] == 2 and 0 < fc["total_us"]["median"] < 20_000 and 0 <= fc["in_by_gap"] <= 1
        assert rep["table"]["shards"] == 2 and not rep["table"]["capped"]
        assert "serving:remote_vs_local" in rep["overhead"] and rep["model"]["n_layers"] >= 3
        assert rep["phases"][-1] == "decode_mb2" and "decode_mb2:remote_vs_local" in rep["overhead"]
        # the remote modes read their rows from these shards (their counters, read by Describe)
        assert rep["breakdown"]["serving:remote"]["hash_s"] > 0 and rep["lookup_p50_ms"] > 0
        # (the row cache answers most lookups of the repeated workload without any RPC)
        assert rep["per_lookup"]["rpcs_per_lookup"] > 0 and rep["per_lookup"]["server_handler_ms_per_rpc"] > 0
        assert np.isfinite(rep["results"]["remote"]["serving_tokens_per_s"])
        # the agent's row cache: the workload repeats, so the repetitions hit what the warm-up read
        assert rep["cache"]["policy"] == "lru" and rep["cache"]["hits"] > 0
        assert rep["wire"]["bytes_saved"] > 0 and rep["wire"]["bytes_received"] > 0
    finally:
        for srv, _ in servers:
            srv.stop(0)


def test_bench_offload_flags_are_checked():
    from engram_ray.bench.memory_source import memory_client, parse_addresses
    assert parse_addresses("a:1, b:2") == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_addresses("a:1,b")
    with pytest.raises(ValueError, match="--via"):
        memory_client(object(), "carrier-pigeon")
    # options no run could finish with are refused before anything starts
    from engram_ray.bench import offload
    for bad, match in ((dict(token_budget=0), "token_budget=0"), (dict(max_batch=0), "max_batch=0"),
                       (dict(prompt_len=(0, 4)), r"prompt_len=\(0, 4\)"), (dict(output_len=(5, 2)), "output_len"),
                       (dict(microbatches=99), "microbatches=99"), (dict(dtype="int8"), "'int8'"),
                       (dict(agent_spin_s=-1.0), "agent_spin_s=-1.0"),
                       (dict(agent_spin_s=0.001, via="client"), "via='agent'"),
                       (dict(lookup_streams=-1), "lookup_streams=-1"),
                       (dict(lookup_streams=0, memory_at=("a:1",)), "--memory-at")):
        with pytest.raises(ValueError, match=match):
            offload.run(C.tiny(), C.model_tiny(), None, None, **bad)
    # --lookup-streams reaches the shards the bench deploys (0: they refuse streams, for an A/B)
    src = offload._source(C.tiny(), None, offload.Options(lookup_streams=0))
    assert src.service.max_lookup_streams == 0
    assert offload._source(C.tiny(), None, offload.Options()).service == C.ServiceConfig()


def test_dense_1b_preset_is_about_a_billion_parameters():
    import torch

    from engram_ray.model import EngramLM
    with torch.device("meta"):
        m = EngramLM(C.model_preset("dense_1b"))
    assert 0.9e9 < sum(p.numel() for p in m.parameters()) < 1.1e9
    assert m.cfg.ffn == "dense" and m.cfg.max_seq_len >= 2048 and C.model_preset("dense-1b") == m.cfg


@pytest.mark.ray
@pytest.mark.slow
def test_bench_latency_and_the_generated_report(tmp_path):
    res = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "bench", "latency-vs-size", "--preset", "tiny",
                        "--sizes", "0.0001", "0.0002", "--batch", "64", "--calls", "3",
                        "--out", str(res / "latency.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((res / "latency.json").read_text())
    assert [round(x["resident_gib"], 4) <= 0.0002 for x in rep["results"]] == [True, True]
    assert all(x["p50_ms"] > 0 and x["p99_ms"] >= x["p50_ms"] for x in rep["results"])
    assert (res / "latency.png").exists()
    assert main(["bench", "hash", "--preset", "tiny", "--repeats", "1", "--out", str(res / "hash.json")]) == 0
    assert (res / "hash.png").exists()
    page = tmp_path / "docs" / "RESULTS.md"
    assert main(["bench", "report", "--results", str(res), "--out", str(page)]) == 0
    text = page.read_text()
    assert "## Lookup latency vs table size" in text and "## Hashing throughput" in text
    assert "](../results/latency.png)" in text and "Machine:" in text
    assert "## Offload" not in text  # no offload.json: no section, no invented figures


@pytest.mark.slow
def test_bench_latency_of_a_memory_mapped_shard_warm_and_cold(tmp_path):
    out = tmp_path / "latency_mmap.json"
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "bench", "latency-vs-size", "--preset", "tiny",
                        "--storage", "mmap", "--sizes", "0.002", "0.004", "--batch", "64", "--calls", "3",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["benchmark"] == "latency-vs-size-mmap" and rep["storage"] == "mmap"
    assert [x["table_gib"] > 0.0015 for x in rep["results"]] == [True, True]
    for x in rep["results"]:
        assert 0 < x["warm_p50_ms"] <= x["warm_p99_ms"] and 0 < x["cold_p50_ms"] <= x["cold_p99_ms"]
    assert out.with_suffix(".png").exists() and "cold p50" in r.stdout
    import tempfile
    assert not list(Path(tempfile.gettempdir()).glob("engram-latency-mmap-*"))  # its temporary tables are gone


@pytest.mark.slow
def test_bench_agent_hop_times_both_paths_to_the_same_shards(tmp_path):
    out = tmp_path / "agent_hop.json"
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "bench", "agent-hop", "--preset", "tiny",
                        "--ids", "32", "256", "--calls", "5", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert [x["ids"] for x in rep["results"]] == [32, 256]
    for x in rep["results"]:
        assert 0 < x["client_p50_ms"] <= x["client_p90_ms"] and 0 < x["agent_p50_ms"] <= x["agent_p90_ms"]
        assert x["agent_extra_ms"] == pytest.approx(x["agent_p50_ms"] - x["client_p50_ms"])
    assert rep["cores"]["agent"] == rep["cores"]["shards"]  # the default: the agent on the memory cores
    assert "agent +" in r.stdout


def test_bench_cache_writes_curves_and_a_plot(tmp_path):
    out = tmp_path / "cache.json"
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "bench", "cache", "--corpora", "stdlib",
                        "--presets", "tiny", "--tokens", "4000", "--batch", "2", "--seq-len", "64",
                        "--sizes", "0.01", "0.5", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    (run,) = rep["runs"]
    assert rep["benchmark"] == "cache" and run["corpus"] == "stdlib" and run["preset"] == "tiny"
    assert [(c["share"], c["policy"]) for c in run["curves"]] == [(0.01, "lru"), (0.01, "tinylfu"),
                                                                 (0.5, "lru"), (0.5, "tinylfu")]
    assert all(0 <= c["hit_rate"] <= run["hit_rate_ceiling"] + 1e-12 for c in run["curves"])
    assert (tmp_path / "cache.png").stat().st_size > 1000 and "Zipf s =" in r.stdout
