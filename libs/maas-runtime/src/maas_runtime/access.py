"""What one RPC's access log line says beyond its method and outcome: who called, for what.

The access log interceptor opens a record per call; the auth interceptor writes the
principal into it, and a service's request labeller (or domain code, through
`annotate_call`) the deployment. No grpc here, so domain code may annotate too.
"""

from __future__ import annotations

from contextvars import ContextVar, Token

_CURRENT_CALL: ContextVar[dict[str, str] | None] = ContextVar("maas_current_call", default=None)


def open_call() -> Token:
    """Start the record of the call running in this context."""
    return _CURRENT_CALL.set({})


def close_call(token: Token) -> dict[str, str]:
    """End the record opened with `token`; returns what was written into it."""
    record = _CURRENT_CALL.get() or {}
    try:
        _CURRENT_CALL.reset(token)
    except ValueError:  # a stream finalised from another task: nothing to undo there
        pass
    return record


def annotate_call(**fields: str) -> None:
    """Add `fields` (e.g. principal, deployment) to the current call's record, if any."""
    record = _CURRENT_CALL.get()
    if record is not None:
        record.update({key: value for key, value in fields.items() if value})
