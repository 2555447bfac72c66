"""The project's exceptions. Bad input is a ``ValueError`` (so generic handlers catch it) and
an ``EngramError`` (so callers can catch ours); messages name the value and what was expected."""

from __future__ import annotations

__all__ = ["EngramError", "InvalidRequest", "FingerprintMismatch", "RequestTooLarge",
           "ShardUnavailable", "CheckpointError", "AuthError", "NotPrimary", "Unreplicated",
           "NotServing"]


class EngramError(Exception):
    """Base of engram_ray's errors."""


class InvalidRequest(EngramError, ValueError):
    """Ids outside a shard's range, wrong dtype or shape, truncated bytes, non-finite values."""


class FingerprintMismatch(EngramError, ValueError):
    """The request was hashed for another table layout than the one this shard serves."""


class RequestTooLarge(EngramError, ValueError):
    """A message above the configured size limit."""


class CheckpointError(EngramError, ValueError):
    """A checkpoint that is missing, incomplete, corrupt, or for another layout."""


class AuthError(EngramError, PermissionError):
    """The shard refused the call: no token, or not this service's token."""


class ShardUnavailable(EngramError, ConnectionError):
    """A shard did not answer within its timeout after all retries."""

    def __init__(self, shard: int, address: str, cause: str):
        super().__init__(f"shard {shard} at {address} is unavailable: {cause}")
        self.shard, self.address, self.cause = shard, address, cause


# Raised inside a shard and sent as status codes, with a structured signal beside them in the
# call's trailing metadata (see engram_ray.rpc.wire and protos/engram/v1/engram.proto) ----------
class NotPrimary(EngramError):
    """A push reached a backup copy while the primary lives (FAILED_PRECONDITION, with the
    primary named), or a Snapshot reached a copy that is not a serving primary."""

    def __init__(self, message: str, *, primary: int | None = None):
        super().__init__(message)
        #: The replica index of the copy that takes pushes, when this copy knows it.
        self.primary = primary


class Unreplicated(EngramError):
    """A push could not reach every copy yet, or this copy is still copying the primary's
    rows (UNAVAILABLE: retry, or go to another copy)."""

    def __init__(self, message: str, *, syncing: bool = False):
        super().__init__(message)
        #: True: this copy is still copying the primary's rows (go to another copy); False: a
        #: push is applied on the primary but not yet on every copy (retry the primary).
        self.syncing = syncing


class NotServing(EngramError):
    """This shard copy refuses data calls: none of its recovery checkpoints loads, and no
    operator has said what to serve instead; or it gave up joining (UNAVAILABLE)."""

    def __init__(self, message: str, *, gave_up: bool = False):
        super().__init__(message)
        #: True: a joining copy gave its join up and answers forwards as a dead copy would.
        self.gave_up = gave_up
