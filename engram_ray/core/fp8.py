"""FP8 rows: e4m3 values with one ue8m0 (power-of-two) scale per block of 32, as DeepSeek-V4.1
checkpoints store their Engram tables (a 256-value row: 256 code bytes + 8 scale bytes = 264 B,
against 512 in bfloat16 and 1024 in float32).

Formats (pure numpy; torch's ``float8_e4m3fn`` decodes the same codes on a device):

* **e4m3** ("fn": finite, no infinities): 1 sign, 4 exponent (bias 7), 3 mantissa bits. Normal
  values ``(1 + m/8) * 2**(e-7)`` for e in 1..15, subnormals ``m/8 * 2**-6``; ``0x7f`` / ``0xff``
  are NaN, so the largest finite value is 448 (e=15, m=6).
* **ue8m0**: an unsigned 8-bit exponent, the scale ``2**(s - 127)``; 255 is NaN.

Quantising a block ``x[32]``: the scale is the smallest power of two with ``max|x| / scale <=
448`` (so no code saturates and the block's largest value keeps its full 3-bit precision), and
each value becomes the nearest e4m3 code to ``x / scale``, ties to the even code -- what
``torch.Tensor.to(torch.float8_e4m3fn)`` does, checked bit for bit in the tests. Dequantising is
``value(code) * 2**(s - 127)``, exact in float32.
"""

from __future__ import annotations

import numpy as np

__all__ = ["E4M3_MAX", "BLOCK", "e4m3_values", "encode_e4m3", "decode_e4m3", "quantize_rows",
           "dequantize_rows", "fp8_row_bytes", "pack_rows", "unpack_rows", "quantize_packed", "dequantize_packed"]

#: Largest finite e4m3fn value.
E4M3_MAX = 448.0
#: Values per ue8m0 scale.
BLOCK = 32
_UE8M0_BIAS = 127


def e4m3_values() -> np.ndarray:
    """The float32 value of every code ``0..255`` (NaN for ``0x7f`` and ``0xff``)."""
    codes = np.arange(256, dtype=np.int32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    mag = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1.0 + man / 8.0) * 2.0 ** (exp - 7.0))
    values = (sign * mag).astype(np.float32)
    values[[0x7F, 0xFF]] = np.nan
    return values


_VALUES = e4m3_values()
#: The non-negative finite values in code order (codes 0..126), increasing.
_POSITIVE = _VALUES[:0x7F].astype(np.float64)


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """Codes (uint8, same shape) of float values within ``[-448, 448]``: the nearest e4m3 value,
    ties to the even code. Values outside, or NaN, are refused (scale the block first)."""
    x = np.asarray(x, dtype=np.float32)
    mag = np.abs(x).astype(np.float64)
    if not np.all(mag <= E4M3_MAX):  # also False for NaN
        bad = x[~(mag <= E4M3_MAX)]
        raise ValueError(f"encode_e4m3: {bad.size} value(s) outside [-448, 448] or NaN (e.g. {bad.flat[0]}): "
                         "scale the block first (quantize_rows)")
    hi = np.searchsorted(_POSITIVE, mag, side="left").clip(0, _POSITIVE.size - 1)  # first value >= mag
    lo = np.maximum(hi - 1, 0)
    d_hi, d_lo = _POSITIVE[hi] - mag, mag - _POSITIVE[lo]
    # nearest; on a tie the even code (its lowest mantissa bit clear), as round-to-nearest-even
    pick_lo = (d_lo < d_hi) | ((d_lo == d_hi) & (lo % 2 == 0))
    code = np.where(pick_lo, lo, hi).astype(np.uint8)
    # the sign bit, except for values that round to zero from below (-0.0 keeps it, as torch)
    return code | np.where(np.signbit(x), np.uint8(0x80), np.uint8(0))


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """float32 values of e4m3 codes (uint8, any shape)."""
    return _VALUES[np.asarray(codes, dtype=np.uint8)]


def fp8_row_bytes(row_dim: int) -> int:
    """Bytes of one FP8 row: a code per value and a scale per block (256 -> 264)."""
    if row_dim % BLOCK:
        raise ValueError(f"row_dim={row_dim}: FP8 rows need a multiple of {BLOCK} values (one scale per block)")
    return row_dim + row_dim // BLOCK


def quantize_rows(rows_nd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float rows ``[N, D]`` -> (codes ``[N, D]`` uint8, scales ``[N, D/32]`` uint8 ue8m0)."""
    rows = np.asarray(rows_nd, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"quantize_rows: rows of shape {rows.shape}: expected [N, D]")
    fp8_row_bytes(rows.shape[1])
    if not np.all(np.isfinite(rows)):
        raise ValueError("quantize_rows: rows hold NaN or infinity")
    n, d = rows.shape
    blocks = rows.reshape(n, d // BLOCK, BLOCK)                                    # [N, D/32, 32]
    amax = np.abs(blocks).max(axis=-1).astype(np.float64)                          # [N, D/32]
    # smallest e with amax / 2**e <= 448; an all-zero block takes 2**-127's neighbour 2**0
    e = np.where(amax > 0, np.ceil(np.log2(np.where(amax > 0, amax, 1.0) / E4M3_MAX)), 0.0)
    e = e + (amax / np.exp2(e) > E4M3_MAX)            # log2 rounding: never let a block saturate
    e = np.clip(e, -_UE8M0_BIAS, 254 - _UE8M0_BIAS)
    scaled = blocks / np.exp2(e)[..., None]
    codes = encode_e4m3(scaled.astype(np.float32)).reshape(n, d)
    return codes, (e + _UE8M0_BIAS).astype(np.uint8)


def dequantize_rows(codes_nd: np.ndarray, scales_nb: np.ndarray) -> np.ndarray:
    """(codes ``[N, D]``, ue8m0 scales ``[N, D/32]``) -> float32 rows ``[N, D]`` (exact)."""
    codes, scales = np.asarray(codes_nd, dtype=np.uint8), np.asarray(scales_nb, dtype=np.uint8)
    n, d = codes.shape
    if scales.shape != (n, d // BLOCK) or d % BLOCK:
        raise ValueError(f"dequantize_rows: codes {codes.shape} and scales {scales.shape}: expected "
                         f"[N, D] and [N, D/{BLOCK}]")
    factor = np.exp2(scales.astype(np.float32) - _UE8M0_BIAS)                      # [N, D/32]
    return (decode_e4m3(codes).reshape(n, d // BLOCK, BLOCK) * factor[..., None]).reshape(n, d)


# Packed rows: what an FP8 table stores and sends, one row = its D codes then its D/32 scales.
def pack_rows(codes_nd: np.ndarray, scales_nb: np.ndarray) -> np.ndarray:
    """(codes ``[N, D]``, scales ``[N, D/32]``) -> packed uint8 rows ``[N, D + D/32]``."""
    return np.concatenate([np.asarray(codes_nd, np.uint8), np.asarray(scales_nb, np.uint8)], axis=1)


def unpack_rows(packed: np.ndarray, row_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed rows ``[N, D + D/32]`` -> (codes ``[N, D]``, scales ``[N, D/32]``), views."""
    if packed.ndim != 2 or packed.shape[1] != fp8_row_bytes(row_dim):
        raise ValueError(f"packed FP8 rows of shape {packed.shape}: expected [N, {fp8_row_bytes(row_dim)}] "
                         f"for rows of {row_dim}")
    return packed[:, :row_dim], packed[:, row_dim:]


def quantize_packed(rows_nd: np.ndarray) -> np.ndarray:
    """float rows ``[N, D]`` -> packed FP8 rows ``[N, D + D/32]``."""
    return pack_rows(*quantize_rows(rows_nd))


def dequantize_packed(packed: np.ndarray, row_dim: int) -> np.ndarray:
    """Packed FP8 rows -> float32 rows ``[N, D]`` (exact)."""
    codes, scales = unpack_rows(np.asarray(packed, np.uint8), row_dim)
    return dequantize_rows(codes, scales)
