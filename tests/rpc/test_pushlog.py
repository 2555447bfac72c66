"""PushLog: a retried push is recognised for the window and within the count, then forgotten."""

import pytest

from engram_ray.errors import InvalidRequest
from engram_ray.rpc.pushlog import MAX_REQUEST_ID_BYTES, PushLog, check_request_id


def test_ids_are_remembered_for_the_window_then_forgotten():
    now = [0.0]
    log = PushLog(window_s=600, clock=lambda: now[0])
    log.record("a-1", 5)
    now[0] = 599.0
    assert log.get("a-1").rows == 5
    log.record("a-2", 7, complete=False, seq=3)
    now[0] = 600.5  # a-1 is older than the window now, a-2 is not
    assert log.get("a-1") is None and log.get("a-2") == (7, False, 3, 599.0)
    assert log.get("") is None and len(log) == 1


def test_the_count_bounds_memory_oldest_first():
    log = PushLog(window_s=1e6, max_entries=3)
    for i in range(5):
        log.record(f"id-{i}", i)
    assert [k for k, _ in log.items()] == ["id-2", "id-3", "id-4"]
    log.seed([("old", 1)])
    assert log.get("old").complete and log.get("id-2") is None


@pytest.mark.parametrize("rid", ["x" * (MAX_REQUEST_ID_BYTES + 1), "a\nb", "caf\u00e9", "\x00"])
def test_request_ids_are_short_printable_ascii(rid):
    with pytest.raises(InvalidRequest, match="request_id"):
        check_request_id(rid)
    check_request_id("c0ffee123456-17")
    check_request_id("x" * MAX_REQUEST_ID_BYTES)
