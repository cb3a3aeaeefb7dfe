"""The SDK's typed exceptions: the suite's one error model, seen from the client side.

Every failed call raises a subclass of `MaasError` (`NotFound`, `InvalidArgument`,
`Unauthenticated`, ...), rebuilt from the gRPC status by `maas_runtime.grpc_errors`: the
`code`, the `ErrorInfo` `reason` and `metadata`, and the `BadRequest` `field_violations`
survive. A job that ends badly raises `JobFailed`.
"""

from __future__ import annotations

from maas_runtime.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    MaasError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "Aborted", "AlreadyExists", "Cancelled", "DeadlineExceeded", "FailedPrecondition",
    "FieldViolation", "Internal", "InvalidArgument", "JobFailed", "MaasError", "NotFound",
    "OutOfRange", "PermissionDenied", "ResourceExhausted", "Unauthenticated", "Unavailable",
    "Unimplemented", "one_line",
]


class JobFailed(FailedPrecondition):
    """A training or compression job ended FAILED or CANCELLED; `job` is its final state."""

    default_reason = "JOB_FAILED"

    def __init__(self, job, message: str):
        super().__init__(message, metadata={"job": job.name})
        self.job = job


def one_line(error: MaasError) -> str:
    """`CODE (REASON): message (field: description; ...)` on one line, for logs and the CLI."""
    reason = f" ({error.reason})" if error.reason and error.reason != error.code else ""
    text = f"{error.code}{reason}: {error.message}"
    missing = [f"{v.field}: {v.description}" for v in error.field_violations
               if v.field not in error.message]
    if missing:
        text += " (" + "; ".join(missing) + ")"
    return " ".join(text.split())
