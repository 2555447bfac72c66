"""engram_ray.rpc.codec: numpy arrays to ``engram.v1.Array`` and back, every byte checked."""

import numpy as np
import pytest

from engram_ray.config import STORE_DTYPES
from engram_ray.errors import InvalidRequest
from engram_ray.rpc import codec
from engram_ray.rpc.generated import engram_pb2 as pb


@pytest.mark.parametrize("name", codec.WIRE_DTYPES)
def test_every_wire_dtype_goes_and_comes_back_bit_exact(name):
    dt = codec.wire_dtype(name)
    src = np.arange(24).reshape(4, 6).astype(dt)
    msg = codec.encode(src, name)
    back = codec.decode(pb.Array.FromString(msg.SerializeToString()), what="rows", dtypes=(name,), ndim=2)
    assert msg.dtype == name and back.dtype == dt and back.tobytes() == src.tobytes()
    assert codec.wire_dtype(name) is dt  # built once


def test_the_dtype_is_named_from_the_array_where_it_has_a_wire_name():
    assert codec.encode(np.arange(3)).dtype == "int64"
    assert codec.encode(np.ones(2, np.float32)).dtype == "float32"
    big = np.arange(3, dtype=">f4")  # not the wire's byte order: converted, same values
    back = codec.decode(codec.encode(big), what="x", dtypes=("float32",), ndim=1)
    assert back.dtype == np.dtype("<f4") and back.tolist() == [0.0, 1.0, 2.0]
    # uint8 is how FP8 rows are packed, but bytes alone are not FP8: the caller must say so
    for bad in (np.ones(2, np.uint8), np.ones(2, np.float64), np.ones(2, np.int32)):
        with pytest.raises(InvalidRequest, match=f"cannot send dtype {bad.dtype}"):
            codec.encode(bad)


def _msg(dtype="float32", shape=(2, 3), nbytes=24):
    return pb.Array(dtype=dtype, shape=shape, data=bytes(nbytes))


@pytest.mark.parametrize("msg, match", [
    (_msg(dtype="float64"), "dtype 'float64'; expected float32"),
    (_msg(shape=(6,)), "has 1 dims; expected 2"),
    (_msg(shape=(2, -3)), "negative dimension"),
    (_msg(nbytes=20), "20 bytes for shape \\[2, 3\\]"),
    (_msg(nbytes=28), "truncated or padded"),
    (_msg(shape=(1 << 40, 1 << 40), nbytes=0), "elements exceed the limit"),
])
def test_a_hostile_array_is_refused_by_name(msg, match):
    with pytest.raises(InvalidRequest, match=match):
        codec.decode(msg, what="rows", dtypes=("float32",), ndim=2, max_elements=1 << 20)


def test_store_dtypes_are_wire_dtypes():
    assert set(STORE_DTYPES) <= set(codec.WIRE_DTYPES)
