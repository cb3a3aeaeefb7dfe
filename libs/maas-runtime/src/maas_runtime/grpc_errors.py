"""Maps the domain error model onto gRPC status codes with `google.rpc.Status` details.

This is the only place that turns exceptions into wire errors: servers abort with
`to_rpc_status(error)`, and clients turn a downstream `AioRpcError` back into the same domain
exception with `from_rpc_error`, so codes and details survive every hop.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from maas_runtime import errors

_log = logging.getLogger(__name__)

_ERROR_CLASSES: dict[str, type[errors.MaasError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidArgument,
        errors.FailedPrecondition,
        errors.Aborted,
        errors.OutOfRange,
        errors.Unauthenticated,
        errors.PermissionDenied,
        errors.ResourceExhausted,
        errors.Unavailable,
        errors.DeadlineExceeded,
        errors.Cancelled,
        errors.Unimplemented,
        errors.Internal,
    )
}


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_rpc_status(error: errors.MaasError) -> status_pb2.Status:
    """The `google.rpc.Status` for a domain error: code, message and typed details."""
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason, domain=errors.ERROR_DOMAIN, metadata=error.metadata
            )
        )
    ]
    if error.field_violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.field_violations
                    ]
                )
            )
        )
    if error.resource is not None:
        details.append(
            _pack(
                error_details_pb2.ResourceInfo(
                    resource_type=error.resource.resource_type,
                    resource_name=error.resource.resource_name,
                    description=error.resource.description,
                )
            )
        )
    if error.quota_violations:
        details.append(_pack(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
            for v in error.quota_violations])))
    if error.retry_delay_seconds is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(max(error.retry_delay_seconds, 0.0) * 1e9))
        details.append(_pack(retry))
    return status_pb2.Status(
        code=getattr(code_pb2, error.code), message=error.message, details=details
    )


def to_grpc_status(error: errors.MaasError) -> grpc.Status:
    return rpc_status.to_status(to_rpc_status(error))


def status_details(rpc_error: grpc.RpcError) -> status_pb2.Status | None:
    """The `google.rpc.Status` a server attached to an error, if any."""
    try:
        return rpc_status.from_call(rpc_error)
    except ValueError:  # details do not match the code/message: treat as absent
        return None


def unpack_detail(status: status_pb2.Status | None, detail_type):
    """The first detail of `detail_type` in `status`, or None."""
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(detail_type.DESCRIPTOR):
            message = detail_type()
            detail.Unpack(message)
            return message
    return None


def from_rpc_error(rpc_error: grpc.RpcError) -> errors.MaasError:
    """Rebuild the domain error a downstream service raised, keeping code, reason and fields."""
    code_name = rpc_error.code().name
    status = status_details(rpc_error)
    info = unpack_detail(status, error_details_pb2.ErrorInfo)
    bad_request = unpack_detail(status, error_details_pb2.BadRequest)
    resource = unpack_detail(status, error_details_pb2.ResourceInfo)
    quota = unpack_detail(status, error_details_pb2.QuotaFailure)
    retry = unpack_detail(status, error_details_pb2.RetryInfo)
    message = rpc_error.details() or code_name
    if code_name == "NOT_FOUND":
        return errors.NotFound(
            resource.resource_type if resource else "resource",
            resource.resource_name if resource else "",
            message,
        )
    if code_name == "ALREADY_EXISTS":
        return errors.AlreadyExists(
            resource.resource_type if resource else "resource",
            resource.resource_name if resource else "",
            message,
        )
    error_class = _ERROR_CLASSES.get(code_name, errors.Internal)
    return error_class(
        message,
        reason=info.reason if info else None,
        metadata=dict(info.metadata) if info else None,
        field_violations=[
            errors.FieldViolation(v.field, v.description) for v in bad_request.field_violations
        ]
        if bad_request
        else (),
        quota_violations=[errors.QuotaViolation(v.subject, v.description)
                          for v in quota.violations] if quota else (),
        retry_delay_seconds=retry.retry_delay.ToNanoseconds() / 1e9 if retry else None,
    )
