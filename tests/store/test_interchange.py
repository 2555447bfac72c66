"""Tables in and out of safetensors (store/interchange.py, `engram-ray import` / `export`): a
V4.1-shaped FP8 checkpoint built here at small scale with the real row format, a reference-
style float table, round trips bit for bit, and every mismatch refused before a byte is
written."""

import json

import numpy as np
import pytest
import torch

from engram_ray.cli import main
from engram_ray.client import EngramClient
from engram_ray.config import EngramConfig, OptimizerConfig, ServiceConfig, StoreConfig
from engram_ray.core import fp8
from engram_ray.core.layout import TableLayout
from engram_ray.core.safetensors import SafetensorsWriter
from engram_ray.core.tokens import CompressedVocab
from engram_ray.rpc.host import ShardHost
from engram_ray.store.checkpoint import load_range
from engram_ray.store.interchange import NameMap, export_tables, import_tables, plan_import

# deepseek_v41_flash's geometry (layers 1 and 14, orders 2-4 x 8 heads, rows of 256) with
# small vocabularies: ~2,600 rows a layer instead of 384M
V41_SMALL = EngramConfig(engram_vocab_size=(101, 103, 107), max_ngram_size=4, n_embed_per_ngram=2048,
                         n_head_per_ngram=8, layer_ids=(1, 14), pad_id=2, seed=0, kernel_size=4)
NAME = "model.layers.{layer}.engram.embedding.weight"


@pytest.fixture(scope="module")
def layout():
    return TableLayout.build(V41_SMALL, CompressedVocab(np.arange(100)))


def _fp8_file(path, layout, scale_dtype="F8_E8M0"):
    """A V4.1-style file: per layer FP8 codes [rows, 256] and ue8m0 scales [rows, 8]; returns
    the float32 rows torch dequantises from those bytes."""
    rng = np.random.default_rng(0)
    specs, data, want = {}, {}, []
    for lid, rows in zip(layout.layer_ids, layout.layer_rows):
        values = (rng.standard_normal((rows, layout.row_dim)) * rng.uniform(1e-3, 10, (rows, 1))).astype(np.float32)
        codes, scales = fp8.quantize_rows(values)
        name = NAME.format(layer=lid)
        scale_name = name[:-len("weight")] + "weight_scale_inv"  # DeepSeek's FP8 naming
        specs[name], specs[scale_name] = ("F8_E4M3", codes.shape), (scale_dtype, scales.shape)
        data[name], data[scale_name] = codes, scales
        t = (torch.from_numpy(codes).view(torch.float8_e4m3fn).float().view(rows, -1, 32)
             * torch.exp2(torch.from_numpy(scales).float() - 127)[..., None]).view(rows, -1)
        want.append(t.numpy())
    with SafetensorsWriter(path, specs) as w:
        for name in specs:
            w.write(name, data[name])
    return np.concatenate(want)


def test_a_v41_style_fp8_file_imports_and_serves_the_rows_torch_dequantises(tmp_path, layout):
    want = _fp8_file(tmp_path / "v41.safetensors", layout)
    sources = plan_import([tmp_path / "v41.safetensors"], layout, NameMap(pattern=NAME))
    rep = import_tables(sources, layout, tmp_path / "ckpt", dtype="bfloat16", chunk_rows=1000)
    assert rep.rows == layout.total_rows and rep.pieces == sum(-(-r // 1000) for r in layout.layer_rows)
    assert rep.bytes_read == layout.total_rows * 264  # 256 code bytes + 8 scale bytes a row
    rows, _ = load_range(tmp_path / "ckpt", layout.fingerprint, 0, layout.total_rows, layout.row_dim, "bfloat16")
    np.testing.assert_array_equal(rows.astype(np.float32), want)  # e4m3 x 2**k is exact in bfloat16
    # ... and a shard started from the checkpoint serves them over gRPC
    store = StoreConfig(dtype="bfloat16", optimizer=OptimizerConfig(kind="none"))
    host = ShardHost(layout, store, ServiceConfig(auth=False), 1, 0, checkpoint=str(tmp_path / "ckpt"))
    try:
        with EngramClient([host.address()], layout) as client:
            ids = np.random.default_rng(1).integers(0, layout.total_rows, size=(4, 50))
            np.testing.assert_array_equal(client.lookup(ids).astype(np.float32), want[ids])
    finally:
        host.stop(0)


def test_float_tables_round_trip_bit_for_bit_through_import_and_export(tmp_path, layout):
    # reference-style: one float32 weight per layer under names of our choosing
    names = NameMap(names={1: "engram.1.multi_head_embedding.embedding.weight",
                           14: "engram.14.multi_head_embedding.embedding.weight"})
    values = np.random.default_rng(2).standard_normal((layout.total_rows, layout.row_dim)).astype(np.float32)
    first = export_tables(lambda a, b: values[a:b], layout, tmp_path / "a.safetensors", dtype="float32",
                          names=names, chunk_rows=777)
    import_tables(plan_import([first], layout, names), layout, tmp_path / "ckpt", dtype="float32", chunk_rows=500)
    back, _ = load_range(tmp_path / "ckpt", layout.fingerprint, 0, layout.total_rows, layout.row_dim, "float32")
    np.testing.assert_array_equal(back, values)
    again = export_tables(lambda a, b: load_range(tmp_path / "ckpt", layout.fingerprint, a, b, layout.row_dim,
                                                  "float32")[0],
                          layout, tmp_path / "b.safetensors", dtype="float32", names=names, chunk_rows=1234)
    assert again.read_bytes() == first.read_bytes()  # chunking differs, the file does not


def _write(path, specs_data):
    with SafetensorsWriter(path, {k: (dt, a.shape) for k, (dt, a) in specs_data.items()}) as w:
        for k, (_, a) in specs_data.items():
            w.write(k, a)


@pytest.mark.parametrize("case,why", [
    ("missing", r"'model.layers.14.engram.embedding.weight' \(Engram layer 14\) is in none of the files; they hold"),
    ("shape", r"layer 1\) is F32 \[5, 256\]; the layout .* expects \[\d+, 256\]"),
    ("dtype", r"is I32; expected one of F32, BF16, F16 or F8_E4M3"),
    ("no_scales", r"holds FP8 codes, but its scales 'model.layers.1.engram.embedding.weight_scale_inv'"),
    ("bad_scales", r"scales .* are U8 \[\d+, 4\]; expected .* \[\d+, 8\]"),
])
def test_every_mismatch_is_refused_before_a_byte_is_written(tmp_path, layout, case, why, capsys):
    r1, r14 = layout.layer_rows
    n1, n14 = NAME.format(layer=1), NAME.format(layer=14)
    good14 = (n14, ("F32", np.zeros((r14, 256), np.float32)))
    files = {
        "missing": {n1: ("F32", np.zeros((r1, 256), np.float32))},
        "shape": {n1: ("F32", np.zeros((5, 256), np.float32)), good14[0]: good14[1]},
        "dtype": {n1: ("I32", np.zeros((r1, 256), np.int32)), good14[0]: good14[1]},
        "no_scales": {n1: ("F8_E4M3", np.zeros((r1, 256), np.uint8)), good14[0]: good14[1]},
        "bad_scales": {n1: ("F8_E4M3", np.zeros((r1, 256), np.uint8)),
                       n1[:-6] + "weight_scale_inv": ("U8", np.zeros((r1, 4), np.uint8)), good14[0]: good14[1]},
    }[case]
    _write(tmp_path / "x.safetensors", files)
    with pytest.raises(ValueError, match=why):
        plan_import([tmp_path / "x.safetensors"], layout, NameMap(pattern=NAME))
    # the command: exit 2, the message on stderr, no checkpoint started
    assert main(["import", str(tmp_path / "x.safetensors"), "--config", _config(tmp_path),
                 "--to-checkpoint", str(tmp_path / "ckpt")]) == 2
    assert "engram-ray import: error:" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def _config(tmp_path):
    p = tmp_path / "v41_small.json"
    V41_SMALL.to_json(p)
    return str(p)


def test_the_commands_import_and_export_with_progress_and_a_report(tmp_path, capsys):
    from engram_ray.data import default_vocab, load_tokenizer
    layout = TableLayout.build(V41_SMALL, default_vocab(load_tokenizer("gpt2")))  # what the CLI builds
    want = _fp8_file(tmp_path / "v41.safetensors", layout, scale_dtype="U8")
    cfg = _config(tmp_path)
    assert main(["import", str(tmp_path / "v41.safetensors"), "--config", cfg, "--to-checkpoint",
                 str(tmp_path / "ckpt"), "--chunk-rows", "999", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["rows"] == layout.total_rows and report["fingerprint"] == layout.fingerprint
    assert "serve --checkpoint" in out
    assert main(["export", str(tmp_path / "out.safetensors"), "--config", cfg, "--from-checkpoint",
                 str(tmp_path / "ckpt"), "--dtype", "bf16"]) == 0
    from engram_ray.core.safetensors import SafetensorsFile
    f = SafetensorsFile(tmp_path / "out.safetensors")
    assert f.metadata["fingerprint"] == layout.fingerprint
    got = np.concatenate([f.array(NAME.format(layer=lid)).astype(np.float32) for lid in layout.layer_ids])
    np.testing.assert_array_equal(got, want)


def test_an_import_never_mixes_tables_or_leaves_half_a_checkpoint(tmp_path, layout):
    names = NameMap(pattern=NAME)
    values = np.random.default_rng(4).standard_normal((layout.total_rows, layout.row_dim)).astype(np.float32)
    path = export_tables(lambda a, b: values[a:b], layout, tmp_path / "t.safetensors", dtype="float32", names=names)
    import_tables(plan_import([path], layout, names), layout, tmp_path / "ckpt", dtype="float32")
    with pytest.raises(ValueError, match="exists and is not empty"):  # old pieces would mix with new ones
        import_tables(plan_import([path], layout, names), layout, tmp_path / "ckpt", dtype="float32")
    bad = values.copy()
    bad[layout.layer_rows[0] + 7, 3] = np.inf  # layer 14's row 7
    path = export_tables(lambda a, b: bad[a:b], layout, tmp_path / "bad.safetensors", dtype="float32", names=names)
    with pytest.raises(ValueError, match=r"layer 14\) row 7: a value that is not finite"):
        import_tables(plan_import([path], layout, names), layout, tmp_path / "ckpt2", dtype="float32",
                      chunk_rows=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "ckpt", "t.safetensors"]


def test_an_fp8_service_serves_the_checkpoints_bytes_and_workers_get_torchs_values(tmp_path, layout):
    # issue 14's done-when: import a V4.1-layout FP8 file into an FP8 service (kept as FP8:
    # 264 B a row on the wire), then a worker's lookup -- in-process client and lookup agent
    # alike -- gives the values torch dequantises from the same bytes
    from engram_ray.agent import AgentClient
    from engram_ray.agent.process import spawn
    from engram_ray.core.safetensors import SafetensorsFile
    from engram_ray.remote_memory import RemoteMemory

    want = _fp8_file(tmp_path / "v41.safetensors", layout)
    sources = plan_import([tmp_path / "v41.safetensors"], layout, NameMap(pattern=NAME))
    rep = import_tables(sources, layout, tmp_path / "ckpt", dtype="fp8_e4m3", chunk_rows=1000)
    assert rep.bytes_written == layout.total_rows * 264 == layout.nbytes("fp8_e4m3")
    src = SafetensorsFile(tmp_path / "v41.safetensors")
    store = StoreConfig(dtype="fp8_e4m3", optimizer=OptimizerConfig(kind="none"))
    host = ShardHost(layout, store, ServiceConfig(auth=False), 1, 0, checkpoint=str(tmp_path / "ckpt"))
    agent_proc = None
    try:
        ids = np.random.default_rng(6).integers(0, layout.total_rows, size=(2, 3, 5, 24))  # [L, B, T, H]
        with EngramClient([host.address()], layout) as client:
            packed = client.lookup(ids[0])
            assert packed.shape == (3, 5, 24, 264) and packed.dtype == np.uint8  # bytes on the wire
            r1 = layout.layer_rows[0]
            first = ids[0].ravel()[ids[0].ravel() < r1][:1]
            np.testing.assert_array_equal(packed.reshape(-1, 264)[ids[0].ravel() == first[0]][0, :256],
                                          src.array(NAME.format(layer=1))[first[0]])  # the file's codes, as is
            np.testing.assert_array_equal(client.values(packed), want[ids[0]])
            with pytest.raises(ValueError, match="read-only"):
                client.push_gradients(ids[0], np.ones((3, 5, 24, 256), np.float32))
            fetch = RemoteMemory(client).fetch(ids, requires_grad=False)
            np.testing.assert_array_equal(fetch.rows(1).numpy(), want[ids[1]].reshape(3, 5, -1))
        sock = str(tmp_path / "agent.sock")
        agent_proc = spawn(sock, [host.address()], layout)
        with AgentClient(sock, layout, start=lambda: None, connect_timeout=60) as agent:
            np.testing.assert_array_equal(agent.values(agent.lookup(ids[1])), want[ids[1]])
            fetch = RemoteMemory(agent).fetch(ids, requires_grad=False)
            for li in (0, 1):
                np.testing.assert_array_equal(fetch.rows(li).numpy(), want[ids[li]].reshape(3, 5, -1))
    finally:
        if agent_proc is not None:
            agent_proc.terminate()
            agent_proc.wait(10)
        host.stop(0)


def test_fp8_tables_export_as_codes_and_scales_and_round_trip(tmp_path, layout):
    _fp8_file(tmp_path / "v41.safetensors", layout)
    names = NameMap(pattern=NAME)
    import_tables(plan_import([tmp_path / "v41.safetensors"], layout, names), layout, tmp_path / "a",
                  dtype="fp8_e4m3")

    def read(directory):
        return lambda a, b: load_range(directory, layout.fingerprint, a, b, 264, "fp8_e4m3")[0]
    first = export_tables(read(tmp_path / "a"), layout, tmp_path / "a.safetensors", dtype="fp8_e4m3", names=names)
    import_tables(plan_import([first], layout, names), layout, tmp_path / "b", dtype="fp8_e4m3")
    again = export_tables(read(tmp_path / "b"), layout, tmp_path / "b.safetensors", dtype="fp8_e4m3", names=names,
                          chunk_rows=333)
    assert again.read_bytes() == first.read_bytes()
    with pytest.raises(Exception, match="cannot load them"):  # packed bytes never cast into values
        load_range(tmp_path / "a", layout.fingerprint, 0, 10, 256, "bfloat16")
