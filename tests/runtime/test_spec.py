"""ServiceSpec: the one record of a service that deploy, the directory actor and attach share;
and the one function that names shard copies. No Ray cluster needed."""

import dataclasses
import pickle
from pathlib import Path

import pytest

pytest.importorskip("ray")

from engram_ray.config import ServiceConfig, StoreConfig  # noqa: E402
from engram_ray.runtime.spec import ServiceSpec, copy_name, shard_name  # noqa: E402


def _spec(tiny_layout, copies=1, **kw):
    return ServiceSpec("svc", tiny_layout, StoreConfig(dtype="bfloat16"), ServiceConfig(replicas=copies), 2, **kw)


def test_copies_are_named_in_one_place():
    assert shard_name("engram", 3) == "engram/shard-3"
    assert copy_name("engram", 3) == copy_name("engram", 3, 0) == "engram/shard-3"
    assert copy_name("engram", 3, 2) == "engram/shard-3/r2"


def test_a_spec_gets_its_addresses_once_the_copies_serve(tiny_layout):
    spec = _spec(tiny_layout, copies=2, token="secret")
    assert spec.replicas == () and spec.addresses == []
    assert spec.copy_names == ["svc/shard-0", "svc/shard-0/r1", "svc/shard-1", "svc/shard-1/r1"]
    served = spec.with_replicas([["a:1", "b:1"], ["a:2", "b:2"]])
    assert served.addresses == ["a:1", "a:2"] and served.replicas == (("a:1", "b:1"), ("a:2", "b:2"))
    moved = served.with_address(1, 0, "c:9")  # a restarted copy announces its new address
    assert moved.addresses == ["a:1", "c:9"] and served.addresses == ["a:1", "a:2"]  # frozen: a new spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        served.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="2 addresses for each of 2 shards"):
        spec.with_replicas([["a:1"], ["a:2"]])


def test_a_spec_round_trips_by_pickle_and_hides_its_secrets_from_repr(tiny_layout):
    spec = _spec(tiny_layout, token="client-secret", tls_ca=b"PEM").with_replicas([["a:1"], ["a:2"]])
    again = pickle.loads(pickle.dumps(spec))
    assert again == spec and again.layout.fingerprint == tiny_layout.fingerprint
    assert again.store.dtype == "bfloat16" and again.token == "client-secret" and again.tls_ca == b"PEM"
    assert "client-secret" not in repr(spec) and "PEM" not in repr(spec)
    assert len(pickle.dumps(spec)) < 16_384  # metadata only
    # the copies' peer credential has no place in it: it goes to the shard actors alone
    assert not any("peer" in f.name for f in dataclasses.fields(ServiceSpec))


def test_recovery_checkpoints_of_a_copy_have_their_own_directory(tiny_layout, tmp_path):
    assert _spec(tiny_layout).recovery_dir(1) is None  # no checkpoint_dir: no recovery checkpoints
    one = dataclasses.replace(_spec(tiny_layout), service=ServiceConfig(checkpoint_dir=str(tmp_path)))
    assert one.recovery_dir(1) == Path(tmp_path) / "svc" / "shard-0001-of-0002"
    two = dataclasses.replace(one, service=ServiceConfig(checkpoint_dir=str(tmp_path), replicas=2))
    assert two.recovery_dir(1, 1) == Path(tmp_path) / "svc" / "shard-0001-of-0002-r1"
    assert two.recovery_dir(1, 0) == Path(tmp_path) / "svc" / "shard-0001-of-0002-r0"
