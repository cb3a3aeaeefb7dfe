"""Client channels to MaaS services: bearer token, tracing, TLS and message limits in one place."""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class _MetadataAdder:
    """Adds fixed metadata to a call's details."""

    def __init__(self, header: tuple[str, str]):
        self._header = header

    def _with_header(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials,
            details.wait_for_ready,
        )


class _UnaryUnaryToken(_MetadataAdder, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._with_header(details), request)


class _UnaryStreamToken(_MetadataAdder, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._with_header(details), request)


class _StreamUnaryToken(_MetadataAdder, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._with_header(details), request_iterator)


class _StreamStreamToken(_MetadataAdder, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._with_header(details), request_iterator)


def bearer_token_interceptors(token: str) -> list:
    """`authorization: Bearer <token>` on every call, plaintext or TLS.

    One interceptor per call kind: grpc.aio files each interceptor under the first kind it
    implements only, so a single class implementing all four would miss streaming calls.
    """
    header = ("authorization", f"Bearer {token}")
    return [kind(header) for kind in
            (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)]


def client_interceptors(token: str | None, telemetry=None) -> list:
    """Tracing first (so the token interceptor's call is inside the client span), then auth."""
    interceptors: list = list(telemetry.client_interceptors()) if telemetry else []
    if token:
        interceptors.extend(bearer_token_interceptors(token))
    return interceptors


def channel_options(max_message_bytes: int,
                    options: Sequence[tuple[str, object]] = ()) -> list[tuple[str, object]]:
    """The options every channel of the suite opens with: message limits, then `options`."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *options,
    ]


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The `authorization` metadata of `token`, for calls made without the interceptors."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def open_blocking_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    max_message_bytes: int = 16 * 1024 * 1024,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.Channel:
    """A synchronous channel with the suite's limits and TLS, for hot client paths (the SDK's
    predict) where an aio call plus an interceptor per call would cost a fifth of the
    throughput. It carries no token: pass `metadata=bearer_metadata(token)` per call."""
    all_options = channel_options(max_message_bytes, options)
    if credentials is not None:
        return grpc.secure_channel(target, credentials, all_options)
    return grpc.insecure_channel(target, all_options)


def open_channel(
    target: str,
    *,
    token: str | None = None,
    telemetry=None,
    credentials: grpc.ChannelCredentials | None = None,
    max_message_bytes: int = 16 * 1024 * 1024,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.aio.Channel:
    """An aio channel to `target` that authenticates, traces and honours size limits."""
    all_options = channel_options(max_message_bytes, options)
    interceptors = client_interceptors(token, telemetry)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, all_options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, all_options, interceptors=interceptors)
