"""Domain errors of the disaggregated engine roles (mapped to gRPC codes in one table,
`tandem.services.ERROR_CODES`)."""

from __future__ import annotations


class NoCapacityError(RuntimeError):
    """No KV blocks (or queue room) for this request right now: try another instance."""


class TransferTimeoutError(TimeoutError):
    """A wait on the other engine role (KV, first token) ran past its deadline."""


class TransferFailedError(RuntimeError):
    """The KV transfer or the peer engine failed; this side freed the request."""


class EngineStoppedError(RuntimeError):
    """The engine thread is not running (stopping, or it died)."""
