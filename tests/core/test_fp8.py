"""FP8 rows (core/fp8.py) against torch's float8_e4m3fn, bit for bit."""

import numpy as np
import pytest
import torch

from engram_ray.core import fp8


def test_the_code_table_is_torchs():
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(fp8.e4m3_values(), want)  # NaN where torch has NaN (0x7f, 0xff)
    assert np.nanmax(fp8.e4m3_values()) == fp8.E4M3_MAX


def test_encoding_rounds_as_torch_does_ties_and_subnormals_included():
    rng = np.random.default_rng(0)
    finite = fp8.e4m3_values()[np.isfinite(fp8.e4m3_values())].astype(np.float64)
    pos = np.unique(finite[finite >= 0])
    mids = (pos[1:] + pos[:-1]) / 2  # exact ties between neighbours: to the even code
    x = np.concatenate([rng.uniform(-448, 448, 20_000), rng.normal(0, 0.01, 20_000),  # subnormals
                        mids, -mids, finite, [0.0, -0.0, 448.0, -448.0, 2.0 ** -10, -(2.0 ** -10)]]).astype(np.float32)
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(fp8.encode_e4m3(x), want)


def test_out_of_range_values_are_refused_not_saturated():
    with pytest.raises(ValueError, match="outside"):
        fp8.encode_e4m3(np.array([449.0], np.float32))
    with pytest.raises(ValueError, match="NaN"):
        fp8.encode_e4m3(np.array([np.nan], np.float32))


def test_rows_round_trip_within_e4m3_precision_and_match_torchs_dequantisation():
    rng = np.random.default_rng(1)
    rows = (rng.standard_normal((64, 256)) * rng.uniform(1e-3, 1e3, (64, 1))).astype(np.float32)
    rows[3, :32] = 0.0  # an all-zero block
    codes, scales = fp8.quantize_rows(rows)
    assert codes.shape == (64, 256) and scales.shape == (64, 8) and codes.dtype == scales.dtype == np.uint8
    assert fp8.fp8_row_bytes(256) == 264 == codes[0].nbytes + scales[0].nbytes
    back = fp8.dequantize_rows(codes, scales)
    # every block's largest value lands in the top binade: relative error <= 2**-4 (3 mantissa bits)
    big = np.abs(rows) >= np.abs(rows).reshape(64, 8, 32).max(-1).repeat(32, 1) / 2
    np.testing.assert_allclose(back[big], rows[big], rtol=2.0 ** -4)
    assert not np.any(back[3, :32])
    # torch on any device: codes viewed as float8, times 2**(scale - 127), gives the same floats
    t = (torch.from_numpy(codes).view(torch.float8_e4m3fn).float().view(64, 8, 32)
         * torch.exp2(torch.from_numpy(scales).float() - 127)[..., None]).view(64, 256)
    np.testing.assert_array_equal(t.numpy(), back)


def test_bad_shapes_are_refused_with_the_shape():
    with pytest.raises(ValueError, match="row_dim=40"):
        fp8.quantize_rows(np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match=r"\[N, D/32\]"):
        fp8.dequantize_rows(np.zeros((2, 64), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="NaN or infinity"):
        fp8.quantize_rows(np.full((1, 32), np.inf, np.float32))
