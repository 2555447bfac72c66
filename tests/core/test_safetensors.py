"""core/safetensors.py against the safetensors package, both ways, and hostile headers."""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engram_ray.core.safetensors import SafetensorsFile, SafetensorsWriter


def test_reads_what_the_package_writes_bf16_and_fp8_included(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=g), "b": torch.randn(3, 4, generator=g).to(torch.bfloat16),
               "c": torch.randn(6, 32, generator=g).to(torch.float8_e4m3fn), "d": torch.arange(9, dtype=torch.uint8)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.metadata == {"k": "v"} and set(f.tensors) == set(tensors)
    assert f.tensors["c"].dtype == "F8_E4M3" and f.tensors["b"].dtype == "BF16"
    np.testing.assert_array_equal(f.array("a.weight"), tensors["a.weight"].numpy())
    np.testing.assert_array_equal(f.array("b").astype(np.float32), tensors["b"].float().numpy())
    np.testing.assert_array_equal(f.array("c"), tensors["c"].view(torch.uint8).numpy())  # codes as bytes
    np.testing.assert_array_equal(f.array("d")[2:5], [2, 3, 4])  # a slice reads only what it touches


def test_the_package_reads_what_we_write_streamed_in_chunks(tmp_path):
    rows = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)
    codes = np.arange(64, dtype=np.uint8).reshape(2, 32)
    with SafetensorsWriter(tmp_path / "y.safetensors", {"t": ("F32", (10, 4)), "f8": ("F8_E4M3", (2, 32))},
                           {"fingerprint": "x"}) as w:
        for a in range(0, 10, 3):
            w.write("t", rows[a:a + 3])
        w.write("f8", codes)
    with safe_open(tmp_path / "y.safetensors", framework="pt") as f:
        assert f.metadata() == {"fingerprint": "x"}
        np.testing.assert_array_equal(f.get_tensor("t").numpy(), rows)
        assert f.get_tensor("f8").dtype == torch.float8_e4m3fn
        np.testing.assert_array_equal(f.get_tensor("f8").view(torch.uint8).numpy(), codes)


def test_a_short_or_misdirected_stream_leaves_no_file(tmp_path):
    out = tmp_path / "z.safetensors"
    with pytest.raises(ValueError, match="missing 16 bytes"):
        with SafetensorsWriter(out, {"t": ("F32", (2, 4))}) as w:
            w.write("t", np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="expected 't'"):
        with SafetensorsWriter(out, {"t": ("F32", (2, 4))}) as w:
            w.write("u", np.zeros((1, 4), np.float32))
    assert not list(tmp_path.iterdir())


def _raw(tmp_path, header: object, data: bytes = b"") -> str:
    text = json.dumps(header).encode()
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(p)


@pytest.mark.parametrize("header,data,why", [
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8, "outside"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, "16 expected"),
    ({"t": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "dtype"),
    ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "shape"),
    ([1, 2], b"", "not an object"),
    ({"t": {"dtype": [], "shape": [1], "data_offsets": [0, 1]}}, b"\0", "dtype"),          # unhashable
    ({"t": {"dtype": "U8", "shape": [2**63, 4], "data_offsets": [0, 4]}}, b"\0" * 4, "expected"),  # no wrap
    ({"t": {"dtype": "U8", "shape": [True, 4], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
    ({"t": {"dtype": "U8", "shape": [1] * 9, "data_offsets": [0, 1]}}, b"\0", "at most 8"),
    ({"__metadata__": {"a": 1}}, b"", "strings"),
])
def test_hostile_headers_are_refused_naming_what_is_wrong(tmp_path, header, data, why):
    with pytest.raises(ValueError, match=why):
        SafetensorsFile(_raw(tmp_path, header, data))


def test_a_deeply_nested_header_is_refused_as_not_json(tmp_path):
    p = tmp_path / "deep.safetensors"
    text = b"[" * 100_000
    p.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(ValueError, match="not JSON"):
        SafetensorsFile(p)


def test_the_writer_takes_only_the_tensors_own_dtype(tmp_path):
    with pytest.raises(ValueError, match="float16 chunk"):  # same width as BF16, other bits
        with SafetensorsWriter(tmp_path / "w.safetensors", {"t": ("BF16", (1, 4))}) as w:
            w.write("t", np.ones((1, 4), np.float16))
    with pytest.raises(ValueError, match="not a name and shape"):
        SafetensorsWriter(tmp_path / "w.safetensors", {"__metadata__": ("U8", (1,))})
    assert not list(tmp_path.iterdir())


def test_a_header_longer_than_the_file_is_refused_unread(tmp_path):
    p = tmp_path / "big.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetensorsFile(p)
