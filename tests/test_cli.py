import json
import subprocess
import sys

import pytest

from engram_ray.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "layout", "hash", "train", "serve", "plan", "status", "checkpoint", "recover", "bench"):
        assert cmd in out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "engram_ray.cli", "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("engram-ray ")


def test_layout_json_for_the_paper_preset(capsys):
    assert main(["layout", "--preset", "paper_27b", "--shards", "4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fingerprint"].startswith("engram-")
    assert 5.78e9 < info["params"] < 5.80e9
    assert info["bytes"]["bfloat16"] == 2 * info["params"]
    assert [s["rows"] for s in info["shards"]][-1][1] == info["rows"]
    assert info["tokenizer"]["compressed"] == 32962


def test_layout_text_is_readable(capsys):
    assert main(["layout", "--preset", "table_100b"]) == 0
    out = capsys.readouterr().out
    assert "fingerprint   engram-" in out and "(100.00 B)" in out and "bfloat16" in out


def test_layout_from_a_config_file_and_bad_keys(tmp_path, capsys):
    from engram_ray import config as C
    good = tmp_path / "c.json"
    C.tiny().to_json(good)
    assert main(["layout", "--config", str(good), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == [1, 2]
    bad = tmp_path / "bad.json"
    bad.write_text('{"n_head": 3}')
    assert main(["layout", "--config", str(bad)]) == 2
    assert "unknown key(s) 'n_head'" in capsys.readouterr().err


def test_hash_shows_row_ids(capsys):
    assert main(["hash", "the cat sat on the mat", "--preset", "tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == len(out["compressed_ids"]) == 6
    assert set(out["row_ids"]) == {"1", "2"}
    assert len(out["row_ids"]["1"][0]) == 4  # 2 orders x 2 heads
    # "the" and " the" are different GPT-2 tokens but one compressed id, so one row set
    assert out["tokens"][0] == "the" and out["tokens"][4] == "Ġthe"
    assert out["token_ids"][0] != out["token_ids"][4]
    assert out["compressed_ids"][0] == out["compressed_ids"][4]


def test_plan_for_a_100b_table(capsys, tmp_path):
    cfg = tmp_path / "t100.json"
    assert main(["plan", "--table-params", "100e9", "--dtype", "bf16", "--node-ram-gib", "512",
                 "--save-config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "100.00 B" in out and "memory nodes  1 x 512 GiB" in out and "186.3 GiB" in out
    assert f"--config {cfg} --shards 4 --dtype bfloat16" in out
    from engram_ray.config import EngramConfig
    assert EngramConfig.from_json(cfg).engram_vocab_size == (39_062_500, 39_062_500)
    assert main(["plan", "--preset", "paper_27b", "--optimizer", "adam", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["table_params"] == 5_792_338_560 and plan["ray_resources"]["engram_memory"] == 4
    assert plan["push_bytes_per_token"] > 0 and plan["source"] == "paper_27b"


def test_plan_explains_what_does_not_fit(capsys):
    assert main(["plan", "--node-ram-gib", "1", "--shards", "1"]) == 2
    assert "one shard needs 10.8 GiB but a node gives shards 0.8 GiB" in capsys.readouterr().err


def test_shard_help_and_argument_checks(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["shard", "--help"])
    out = capsys.readouterr().out
    for flag in ("--shards", "--index", "--host", "--port", "--token-file", "--no-auth", "--dtype", "--optimizer",
                 "--checkpoint", "--ready-file"):
        assert flag in out
    assert main(["shard", "--preset", "tiny", "--index", "2", "--shards", "2", "--no-auth"]) == 2
    assert "--index 2" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    assert main(["shard", "--preset", "tiny", "--index", "0", "--token-file", str(tmp_path / "empty")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_status_sums_table_use_over_shards_and_reads_the_copy_read_most(capsys):
    from engram_ray.cli.service import _print_table_use

    def shard(i, replica, reads, touched):
        return {"shard_index": i, "replica": replica, "reads": reads, "reads_top1pct_share": 0.25,
                "reads_top10pct_share": 0.5,
                "table_use": [{"layer": 2, "order": 2, "rows": 1000, "touched": touched, "utilisation": 0}]}
    _print_table_use([shard(0, 0, 500, 100.0), shard(0, 1, 0, 0.0), shard(1, 0, 300, 50.0)])
    out = capsys.readouterr().out
    assert "layer  2 2-grams:" in out and "150 of" in out and "2,000 rows (7.500 %)" in out
    assert "shard 0 top 1 % 25 %, top 10 % 50 %; shard 1" in out
