"""Assertions on gRPC errors: the code, and the BadRequest field violation naming the field."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from maas_runtime.grpc_errors import status_details, unpack_detail


async def expect_error(awaitable, code: grpc.StatusCode, field: str | None = None):
    """The call fails with `code` and, when given, a BadRequest violation naming `field`."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    assert caught.value.code() == code, caught.value.details()
    if field is not None:
        bad_request = unpack_detail(status_details(caught.value), error_details_pb2.BadRequest)
        assert bad_request is not None, caught.value.details()
        assert field in [v.field for v in bad_request.field_violations], bad_request
    return caught.value
