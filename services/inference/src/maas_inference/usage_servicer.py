"""gRPC servicer of `maas.inference.v1.UsageService`: convert, call `UsageReports`, convert."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
from google.protobuf import timestamp_pb2
from maas.inference.v1 import usage_pb2, usage_pb2_grpc
from maas_runtime.auth import current_principal
from maas_runtime.errors import InvalidArgument

from maas_inference.usage import UsageRecord, UsageReports, UsageTotals

USAGE_SERVICE = "maas.inference.v1.UsageService"

GROUPINGS: dict[int, tuple[str, ...]] = {
    usage_pb2.USAGE_GROUPING_UNSPECIFIED: ("tenant",),
    usage_pb2.USAGE_GROUPING_TENANT: ("tenant",),
    usage_pb2.USAGE_GROUPING_DEPLOYMENT: ("deployment",),
    usage_pb2.USAGE_GROUPING_TENANT_AND_DEPLOYMENT: ("tenant", "deployment"),
    usage_pb2.USAGE_GROUPING_NONE: (),
}


def _time(message: usage_pb2.ListUsageRecordsRequest | usage_pb2.SummarizeUsageRequest,
          field_name: str) -> datetime | None:
    if not message.HasField(field_name):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field_name)
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument.for_field(field_name, "is not a valid timestamp",
                                        reason="TIMESTAMP_INVALID") from None


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def record_message(record: UsageRecord) -> usage_pb2.UsageRecord:
    return usage_pb2.UsageRecord(
        record_id=record.record_id, tenant=record.tenant, principal=record.principal,
        deployment=f"deployments/{record.deployment}" if record.deployment else "",
        model_version=record.version, kind=record.kind,
        start_time=_timestamp(record.start_time), duration_seconds=record.duration_seconds,
        outcome=record.outcome, prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens, requests=record.requests, rows=record.rows)


def totals_message(totals: UsageTotals) -> usage_pb2.UsageTotals:
    return usage_pb2.UsageTotals(
        tenant=totals.tenant,
        deployment=f"deployments/{totals.deployment}" if totals.deployment else "",
        requests=totals.requests, rows=totals.rows, prompt_tokens=totals.prompt_tokens,
        completion_tokens=totals.completion_tokens,
        total_tokens=totals.prompt_tokens + totals.completion_tokens)


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    """The usage ledger's reads, scoped to the caller's tenant (all tenants for an admin)."""

    def __init__(self, reports: UsageReports) -> None:
        self._reports = reports

    async def ListUsageRecords(self, request: usage_pb2.ListUsageRecordsRequest,
                               context: grpc.aio.ServicerContext,
                               ) -> usage_pb2.ListUsageRecordsResponse:
        page = await self._reports.list_page(
            current_principal(), request.filter, _time(request, "start_time"),
            _time(request, "end_time"), request.page_size, request.page_token)
        return usage_pb2.ListUsageRecordsResponse(
            usage_records=[record_message(r) for r in page.records],
            next_page_token=page.next_page_token)

    async def SummarizeUsage(self, request: usage_pb2.SummarizeUsageRequest,
                             context: grpc.aio.ServicerContext,
                             ) -> usage_pb2.SummarizeUsageResponse:
        group_by = GROUPINGS.get(request.group_by)
        if group_by is None:
            raise InvalidArgument.for_field("group_by", f"unknown grouping {request.group_by}",
                                            reason="GROUPING_UNKNOWN")
        totals = await self._reports.summarize(
            current_principal(), request.filter, _time(request, "start_time"),
            _time(request, "end_time"), group_by)
        return usage_pb2.SummarizeUsageResponse(totals=[totals_message(t) for t in totals])
