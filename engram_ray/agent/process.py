"""The lookup agent as a plain process: where its socket lives, how it is built from shard
addresses and a layout, how a worker (or any supervisor) starts one, and the blocking
``run`` that ``engram-ray agent`` / ``python -m engram_ray.agent`` calls."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence

from ..client import EngramClient
from ..client.cache import DEFAULT_POLICY
from ..core.layout import TableLayout
from .server import LookupAgent

__all__ = ["socket_dir", "default_socket_path", "run", "spawn"]

log = logging.getLogger(__name__)


def socket_dir() -> str:
    """This user's directory for agent sockets (mode 0700): ``$TMPDIR/engram-agent-<uid>``."""
    return os.path.join(tempfile.gettempdir(), f"engram-agent-{os.getuid()}")


def default_socket_path(name: str) -> str:
    """The socket of the agent ``name`` (e.g. a service and node); kept short, since a Unix
    socket path has at most 107 bytes."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
    return os.path.join(socket_dir(), f"{safe}.sock")


def run(addresses: Sequence[str | Sequence[str]], layout: TableLayout, socket_path: str, *,
        token: str | None = None, ready: Callable[[LookupAgent], None] | None = None,
        cache_bytes: int = 0, cache_policy: str = DEFAULT_POLICY) -> int:
    """Serve ``layout``'s rows from the shards at ``addresses`` on ``socket_path`` until
    SIGTERM / SIGINT (blocking), keeping the hottest rows in ``cache_bytes`` (0: no cache)
    for every worker of the node. Returns 0; raises if another agent serves the path."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    with EngramClient([a if isinstance(a, str) else list(a) for a in addresses], layout, token=token,
                      cache_bytes=cache_bytes, cache_policy=cache_policy) as client:
        agent = LookupAgent(client, socket_path).start()
        try:
            if ready is not None:
                ready(agent)
            stop.wait()
        finally:
            agent.close()
    return 0


def spawn(socket_path: str, addresses: Sequence[str], layout: TableLayout, *,
          token_file: str | None = None, cache_gib: float = 0.0,
          cache_policy: str = DEFAULT_POLICY, preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen:
    """Start ``python -m engram_ray.agent`` serving on ``socket_path`` (returns at once; a
    worker's :class:`~.client.AgentClient` retries connecting while it comes up). The layout
    goes to it as a JSON file beside the socket (0600). ``preexec_fn`` runs in the child before
    it starts (e.g. a benchmark pins it)."""
    os.makedirs(os.path.dirname(socket_path), mode=0o700, exist_ok=True)
    layout_file = socket_path + ".layout.json"
    fd = os.open(layout_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(layout.to_dict(), f)
    cmd = [sys.executable, "-m", "engram_ray.agent", "--addresses", ",".join(addresses),
           "--layout", layout_file, "--socket", socket_path]
    if token_file:
        cmd += ["--token-file", token_file]
    if cache_gib:
        cmd += ["--cache-gib", str(cache_gib), "--cache-policy", cache_policy]
    log.info("starting a lookup agent: %s", " ".join(cmd))
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec_fn)
