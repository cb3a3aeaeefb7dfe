"""The suite's one error model: domain exceptions that carry a canonical status.

Domain code raises these; the server runtime maps them once, in `grpc_errors`, to gRPC codes
with `google.rpc.Status` details. Nothing here imports grpc, so stores, schedulers and
validators stay transport-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ERROR_DOMAIN = "maas.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request, named by its path (e.g. `model.labels`)."""

    field: str
    description: str


@dataclass(frozen=True)
class ResourceRef:
    """The resource an error is about (becomes a `google.rpc.ResourceInfo`)."""

    resource_type: str
    resource_name: str
    description: str = ""


@dataclass(frozen=True)
class QuotaViolation:
    """One quota a request ran into (becomes a `google.rpc.QuotaFailure` violation): whose
    quota (`subject`, e.g. "tenant:acme") and which limit with its value (`description`)."""

    subject: str
    description: str


class MaasError(Exception):
    """Base of every error a caller may see. `code` is a canonical gRPC status code name.

    `reason` (ErrorInfo.reason) names the problem, never the code again: a raise passes its
    own, or the class derives one (`default_reason`, `FIELD_INVALID`, `MODEL_NOT_FOUND`, ...);
    tests/contracts/test_error_reasons.py holds every raise in libs/ and services/ to that.
    """

    code = "INTERNAL"
    default_reason = "INTERNAL_ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        resource: ResourceRef | None = None,
        quota_violations: Iterable[QuotaViolation] = (),
        retry_delay_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.resource = resource
        self.quota_violations = tuple(quota_violations)
        self.retry_delay_seconds = retry_delay_seconds
        """When retrying may succeed (a `google.rpc.RetryInfo` detail); None gives no hint."""
        self.reason = reason or self.derived_reason()  # derived from the fields above

    def derived_reason(self) -> str:
        """The reason of a raise that names none."""
        return self.default_reason


class InvalidArgument(MaasError):
    """The request is malformed; `field_violations` names every offending field."""

    code = "INVALID_ARGUMENT"
    default_reason = "REQUEST_INVALID"

    def derived_reason(self) -> str:
        return "FIELD_INVALID" if self.field_violations else self.default_reason

    @classmethod
    def for_field(cls, field_path: str, description: str, **kwargs: Any) -> InvalidArgument:
        return cls(
            f"{field_path}: {description}",
            field_violations=[FieldViolation(field_path, description)],
            **kwargs,
        )


class NotFound(MaasError):
    """The named resource does not exist."""

    code = "NOT_FOUND"
    default_reason = "RESOURCE_NOT_FOUND"

    def derived_reason(self) -> str:
        return _resource_reason(self.resource, "NOT_FOUND") or self.default_reason

    def __init__(self, resource_type: str, resource_name: str, message: str | None = None):
        super().__init__(
            message or f"{resource_type} {resource_name!r} not found",
            resource=ResourceRef(resource_type, resource_name),
            metadata={"resource": resource_name},
        )


class AlreadyExists(MaasError):
    """A resource with that name exists already."""

    code = "ALREADY_EXISTS"
    default_reason = "RESOURCE_EXISTS"

    def derived_reason(self) -> str:
        return _resource_reason(self.resource, "ALREADY_EXISTS") or self.default_reason

    def __init__(self, resource_type: str, resource_name: str, message: str | None = None):
        super().__init__(
            message or f"{resource_type} {resource_name!r} already exists",
            resource=ResourceRef(resource_type, resource_name),
            metadata={"resource": resource_name},
        )


class FailedPrecondition(MaasError):
    """The system is not in a state that allows the operation (e.g. alias points at version)."""

    code = "FAILED_PRECONDITION"
    default_reason = "PRECONDITION_UNMET"


class Aborted(MaasError):
    """A concurrency conflict: stale etag, compare-and-set lost. Retrying after a re-read works."""

    code = "ABORTED"
    default_reason = "CONFLICT"


class OutOfRange(MaasError):
    """A value is valid in general but beyond the current bounds (e.g. a download offset)."""

    code = "OUT_OF_RANGE"
    default_reason = "VALUE_OUT_OF_RANGE"


class Unauthenticated(MaasError):
    """No credentials, or credentials that do not identify anyone."""

    code = "UNAUTHENTICATED"
    default_reason = "CREDENTIALS_INVALID"


class PermissionDenied(MaasError):
    """The caller is known but not allowed to do this."""

    code = "PERMISSION_DENIED"
    default_reason = "ACCESS_DENIED"


class ResourceExhausted(MaasError):
    """A size or quota limit was hit."""

    code = "RESOURCE_EXHAUSTED"
    default_reason = "LIMIT_EXCEEDED"


class Unavailable(MaasError):
    """A dependency (Triton, the registry, a discovered service) cannot be reached right now."""

    code = "UNAVAILABLE"
    default_reason = "DEPENDENCY_UNAVAILABLE"


class DeadlineExceeded(MaasError):
    """The caller's deadline ran out before the work finished."""

    code = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_PASSED"


class Cancelled(MaasError):
    """The operation was cancelled."""

    code = "CANCELLED"
    default_reason = "OPERATION_CANCELLED"


class Unimplemented(MaasError):
    """The method exists in a standard contract but is not offered here, by design."""

    code = "UNIMPLEMENTED"
    default_reason = "METHOD_NOT_OFFERED"


class Internal(MaasError):
    """A bug or broken invariant on the server side; never used for a caller's mistake."""


def _resource_reason(resource: ResourceRef | None, problem: str) -> str | None:
    """"MODEL_VERSION_NOT_FOUND" of a "model version" (any spelling) that was not found."""
    if resource is None or not resource.resource_type:
        return None
    words = "".join(c if c.isalnum() else " " for c in resource.resource_type).upper().split()
    return "_".join([*words, problem]) if words else None


@dataclass
class ViolationCollector:
    """Gathers every field violation of a request so the caller learns them all at once."""

    violations: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.violations.append(FieldViolation(field_path, description))

    def check(self, condition: bool, field_path: str, description: str) -> bool:
        if not condition:
            self.add(field_path, description)
        return condition

    def raise_if_any(self, message: str = "invalid request") -> None:
        if self.violations:
            summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
            raise InvalidArgument(f"{message}: {summary}", field_violations=self.violations)
