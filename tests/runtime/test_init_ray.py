"""init_ray: a local start that times out is retried once; anything else is raised."""

import pytest

ray = pytest.importorskip("ray")

from engram_ray.runtime import service  # noqa: E402


def _fake_init(failures):
    calls = []

    def init(address=None, **kw):
        calls.append(address)
        if failures:
            raise failures.pop(0)
    return init, calls


@pytest.mark.parametrize("error", [
    Exception("The current node timed out during startup. ..."),
    RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_6e9a"),  # seen in CI
])
def test_a_local_start_that_times_out_is_retried_once(monkeypatch, error):
    init, calls = _fake_init([error])
    monkeypatch.setattr(service.ray, "init", init)
    monkeypatch.setattr(service.ray, "shutdown", lambda: calls.append("shutdown"))
    service.init_ray(num_cpus=1)
    assert calls == [None, "shutdown", None]


def test_other_failures_and_remote_addresses_are_not_retried(monkeypatch):
    init, calls = _fake_init([Exception("The current node timed out during startup.")])
    monkeypatch.setattr(service.ray, "init", init)
    with pytest.raises(Exception, match="timed out"):
        service.init_ray("10.0.0.1:6379")
    init, calls = _fake_init([ConnectionError("no cluster"), None])
    monkeypatch.setattr(service.ray, "init", init)
    with pytest.raises(ConnectionError):
        service.init_ray()
    assert calls == [None]
