"""A quota error's details survive the wire both ways: `to_rpc_status` packs a QuotaFailure
and a RetryInfo, and `from_rpc_error` rebuilds them on the client (the SDK's exceptions)."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2
from maas_runtime import errors
from maas_runtime.grpc_errors import from_rpc_error, to_rpc_status, unpack_detail


class FailedCall(grpc.RpcError, grpc.Call):
    """What a client sees of a failed call: code, details and the status trailer."""

    def __init__(self, status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return next(code for code in grpc.StatusCode if code.value[0] == self._status.code)

    def details(self) -> str:
        return self._status.message

    def trailing_metadata(self):
        return (("grpc-status-details-bin", self._status.SerializeToString()),)

    def initial_metadata(self):
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback) -> bool:
        return False


def test_quota_failure_and_retry_info_round_trip():
    error = errors.ResourceExhausted(
        "tenant 'acme' is over its requests_per_minute limit of 3", reason="TENANT_QUOTA_EXCEEDED",
        quota_violations=[errors.QuotaViolation("tenant:acme", "requests_per_minute: 3")],
        retry_delay_seconds=12.5)
    status = to_rpc_status(error)
    assert status.code == code_pb2.RESOURCE_EXHAUSTED
    quota = unpack_detail(status, error_details_pb2.QuotaFailure)
    assert [(v.subject, v.description) for v in quota.violations] == [
        ("tenant:acme", "requests_per_minute: 3")]
    retry = unpack_detail(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 12 and retry.retry_delay.nanos == 500_000_000

    rebuilt = from_rpc_error(FailedCall(status))
    assert isinstance(rebuilt, errors.ResourceExhausted)
    assert rebuilt.reason == "TENANT_QUOTA_EXCEEDED"
    assert rebuilt.quota_violations == error.quota_violations
    assert rebuilt.retry_delay_seconds == 12.5


def test_errors_without_quota_carry_neither_detail():
    status = to_rpc_status(errors.InvalidArgument.for_field("filter", "bad"))
    assert unpack_detail(status, error_details_pb2.QuotaFailure) is None
    assert unpack_detail(status, error_details_pb2.RetryInfo) is None
    rebuilt = from_rpc_error(FailedCall(status))
    assert isinstance(rebuilt, errors.InvalidArgument) and rebuilt.reason == "FIELD_INVALID"
    assert (rebuilt.quota_violations, rebuilt.retry_delay_seconds) == ((), None)
