"""The structured signals of rpc/wire.py: what a shard sends for each refusal, and what a
receiver makes of metadata it cannot trust."""

import pickle

import grpc
import pytest

from engram_ray.errors import FingerprintMismatch, InvalidRequest, NotPrimary, NotServing, Unreplicated
from engram_ray.rpc import wire
from engram_ray.rpc.servicer import _STATUS

FP, UN, RE = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("exc,signal,primary", [
    (NotPrimary("backup", primary=1), "not-primary", "1"),
    (NotPrimary("two primaries"), "not-primary", None),
    (Unreplicated("not on every replica"), "unreplicated", None),
    (Unreplicated("copying its rows", syncing=True), "syncing", None),
    (NotServing("no checkpoint loads"), "not-serving", None),
    (NotServing("gave its join up", gave_up=True), "gave-up", None),
])
def test_each_refusal_carries_its_signal_with_the_status_the_servicer_gives_it(exc, signal, primary):
    md = wire.metadata_for(exc)
    code = next(c for kind, c in _STATUS if isinstance(exc, kind))
    assert code == wire.SIGNAL_STATUS[signal]
    assert wire.read_signal(md, code) == wire.Signal(signal, primary)
    # the fields survive a pickle (exceptions cross Ray as pickles)
    again = pickle.loads(pickle.dumps(exc))
    assert wire.metadata_for(again) == md and str(again) == str(exc)


def test_other_errors_carry_no_signal():
    for exc in (FingerprintMismatch("x"), InvalidRequest("x"), ValueError("x"), RuntimeError("x")):
        assert wire.metadata_for(exc) is None
    with pytest.raises(ValueError, match="unknown signal"):
        wire.signal_metadata("primary")


@pytest.mark.parametrize("metadata,code,want", [
    ((("engram-signal", "busy"),), RE, wire.Signal("busy")),
    ((("engram-signal", "busy"),), UN, wire.Signal()),  # another status: no signal
    ((("engram-signal", "unreplicated"),), FP, wire.Signal()),
    ((("engram-signal", "Busy"),), RE, wire.Signal()),
    ((("engram-signal", "busy"), ("engram-signal", "busy")), RE, wire.Signal()),  # twice
    ((("engram-signal", b"busy"),), RE, wire.Signal()),  # bytes (a -bin key's kind of value)
    ((), RE, wire.Signal()),
    (None, RE, wire.Signal()),
    ((("authorization", "x"), ("engram-signal", "syncing"), ("other", "y")), UN, wire.Signal("syncing")),
    ((("engram-signal", "not-primary"),), FP, wire.Signal("not-primary", None)),
    ((("engram-signal", "not-primary"), ("engram-primary", "3")), FP, wire.Signal("not-primary", "3")),
    ((("engram-signal", "not-primary"), ("engram-primary", "3"), ("engram-primary", "1")), FP,
     wire.Signal("not-primary", "3,1")),
])
def test_read_signal_trusts_only_one_known_signal_with_its_status(metadata, code, want):
    assert wire.read_signal(metadata, code) == want


@pytest.mark.parametrize("raw,replicas,want", [
    ("0", 2, 0), ("1", 2, 1), ("2", 2, None), ("15", 16, 15), ("", 2, None), (None, 2, None),
    ("01", 2, None), ("-1", 2, None), ("+1", 2, None), (" 1", 2, None), ("1 ", 2, None), ("1.0", 2, None),
    ("\u00b2", 4, None), ("\u0661", 4, None), ("99999999999999999999", 2, None), ("1,0", 2, None),
])
def test_primary_index_is_a_plain_decimal_below_the_number_of_copies(raw, replicas, want):
    assert wire.primary_index(wire.Signal(wire.NOT_PRIMARY, raw), replicas) == want


def test_the_defaults_are_the_services():
    from engram_ray.config import ServiceConfig
    cfg = ServiceConfig()
    assert (wire.DEFAULT_MAX_MESSAGE_BYTES, wire.DEFAULT_MAX_IDS_PER_REQUEST) == \
        (cfg.max_message_bytes, cfg.max_ids_per_request)
    assert wire.auth_metadata(None) is None and wire.auth_metadata("t") == (("authorization", "Bearer t"),)


def test_token_files_are_read_one_way_and_refused_clearly(tmp_path):
    from engram_ray.rpc.wire import read_token_file

    (tmp_path / "t").write_text("  s3cret\n")
    assert read_token_file(tmp_path / "t") == "s3cret"  # shards, agent, bench and workers agree
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match=r"--token-file .*empty is empty"):
        read_token_file(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"--agent-token .*missing: cannot read the token"):
        read_token_file(tmp_path / "missing", what="--agent-token")
