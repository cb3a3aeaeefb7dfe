"""Server interceptors: auth, error mapping, and access logs with request metrics.

Each interceptor wraps the RPC's behaviour function, so the same code handles unary and
streaming RPCs. Order in the server (outermost first): OpenTelemetry tracing, access log,
error mapping, auth; so auth failures are mapped like any other domain error and logged
inside the trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Mapping

import grpc
from google.protobuf import descriptor_pool

from maas_runtime import errors
from maas_runtime.access import annotate_call, close_call, open_call
from maas_runtime.auth import (
    Principal,
    Role,
    TokenStore,
    reset_current_principal,
    set_current_principal,
)
from maas_runtime.grpc_errors import to_grpc_status

_log = logging.getLogger("maas.access")

OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")
"""Services every caller may use without a token (probes, tooling)."""

Behaviour = Callable
Wrapper = Callable[[Behaviour, str, bool], Behaviour]


def wrap_handler(handler: grpc.RpcMethodHandler | None, method: str, wrapper: Wrapper):
    """Return `handler` with its behaviour replaced by `wrapper(behaviour, method, streams)`."""
    if handler is None:
        return None
    for kind, factory in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return factory(
                wrapper(behaviour, method, handler.response_streaming),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def guarded(behaviour: Behaviour, response_streaming: bool, before, on_error, after):
    """Run `before(context)`, the behaviour, then `after(context, state, failure)`.

    `on_error` sees every exception (from `before` too) and re-raises or aborts. Works for
    coroutine and async-generator behaviours alike.
    """
    if response_streaming:

        async def stream_behaviour(request, context):
            state = failure = None
            try:
                state = before(context)
                result = behaviour(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:
                    await result
            except BaseException as exc:  # noqa: BLE001 - re-raised or mapped by on_error
                failure = exc
                await on_error(exc, context)
            finally:
                after(context, state, failure)

        return stream_behaviour

    async def unary_behaviour(request, context):
        state = failure = None
        try:
            state = before(context)
            return await behaviour(request, context)
        except BaseException as exc:  # noqa: BLE001 - re-raised or mapped by on_error
            failure = exc
            await on_error(exc, context)
        finally:
            after(context, state, failure)

    return unary_behaviour


async def reraise(exc: BaseException, context) -> None:
    raise exc


def _nothing(context):
    return None


def _no_after(context, state, failure) -> None:
    return None


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's behaviour once and reuses the wrapped handler for every call.

    Wrapping per call would build new handler objects on the hot path of every request;
    per-call facts (metadata, peer) are read from the servicer context instead.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def applies_to(self, method: str) -> bool:
        return True

    def wrap(self, behaviour: Behaviour, method: str, response_streaming: bool) -> Behaviour:
        raise NotImplementedError

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.applies_to(method):
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, wrap_handler(handler, method, self.wrap))
            self._wrapped[method] = cached
        return cached[1]


class ErrorInterceptor(WrappingInterceptor):
    """Turns domain errors into canonical codes with `google.rpc.Status` details.

    Downstream `AioRpcError`s keep their code and details (a NOT_FOUND from the registry stays
    NOT_FOUND at the gateway); anything else is a server bug and becomes INTERNAL, logged.
    """

    def wrap(self, behaviour, method, response_streaming):
        async def on_error(exc: BaseException, context) -> None:
            if isinstance(exc, errors.MaasError):
                await context.abort_with_status(to_grpc_status(exc))
            if isinstance(exc, grpc.aio.AioRpcError):
                await context.abort(exc.code(), exc.details() or "", exc.trailing_metadata())
            if isinstance(exc, (grpc.aio.AbortError, GeneratorExit)) or not isinstance(
                exc, Exception
            ):
                raise exc
            _log.exception("unhandled error in %s", method)
            await context.abort_with_status(
                to_grpc_status(errors.Internal(f"internal error in {method}"))
            )

        return guarded(behaviour, response_streaming, _nothing, on_error, _no_after)


def method_roles_from_descriptors(
    pool: descriptor_pool.DescriptorPool | None = None, service_names=()
) -> dict[str, Role]:
    """Read `(maas.common.v1.required_role)` of every method of the named services."""
    from maas.common.v1 import access_pb2

    pool = pool or descriptor_pool.Default()
    roles: dict[str, Role] = {}
    for service_name in service_names:
        service = pool.FindServiceByName(service_name)
        for method in service.methods:
            declared = method.GetOptions().Extensions[access_pb2.required_role]
            roles[f"/{service.full_name}/{method.name}"] = (
                Role(declared) if declared else Role.ADMIN  # undeclared: fail closed
            )
    return roles


class AuthInterceptor(WrappingInterceptor):
    """Checks `authorization: Bearer <token>` and the method's required role.

    Health and reflection stay open. Methods not in `method_roles` need ADMIN, so a service
    added without annotations fails closed rather than open.
    """

    def __init__(self, tokens: TokenStore, method_roles: Mapping[str, Role]):
        super().__init__()
        self._tokens = tokens
        self._method_roles = dict(method_roles)

    def applies_to(self, method: str) -> bool:
        return method.split("/")[1] not in OPEN_SERVICES

    def wrap(self, behaviour, method, response_streaming):
        required = self._method_roles.get(method, Role.ADMIN)

        def before(context):
            authorization = next((value for key, value in context.invocation_metadata() or ()
                                  if key == "authorization"), None)
            principal: Principal = self._tokens.authenticate(authorization)
            annotate_call(principal=principal.name)
            principal.require(required, f"call {method.rsplit('/', 1)[-1]}")
            return set_current_principal(principal)

        def after(context, token, failure):
            if token is None:
                return
            # grpc finalises a response stream whose caller left (GeneratorExit) from another
            # task, whose context never held this principal: nothing to undo there, and
            # `reset` would raise ValueError out of the finaliser.
            with contextlib.suppress(ValueError):
                reset_current_principal(token)

        return guarded(behaviour, response_streaming, before, reraise, after)


RequestLabeller = Callable[[str, object], Mapping[str, str]]
"""`(method, request) -> labels` for a unary request, e.g. {"deployment": "digits"}."""


class AccessLogInterceptor(WrappingInterceptor):
    """One structured log line and two metrics (count, duration) per RPC.

    The line carries the method, outcome (gRPC code), duration, principal, what the service's
    `request_labels` names (the inference service: the deployment) and, from the log
    formatter, the trace id. The metrics carry the service, method, code and those labels.
    """

    def __init__(self, meter=None, *, service: str = "",
                 request_labels: RequestLabeller | None = None):
        super().__init__()
        self._service = service
        self._request_labels = request_labels
        self._requests = self._duration = None
        if meter is not None:
            self._requests = meter.create_counter(
                "maas.rpc.server.requests", unit="{request}",
                description="RPCs handled, by service, method and gRPC code")
            self._duration = meter.create_histogram(
                "maas.rpc.server.duration", unit="ms", description="RPC handling time")

    def _labelled(self, behaviour: Behaviour, method: str) -> Behaviour:
        labeller = self._request_labels
        if labeller is None:
            return behaviour

        def labelled(request, context):
            if hasattr(request, "DESCRIPTOR"):  # a message, not a request stream
                annotate_call(**labeller(method, request))
            return behaviour(request, context)

        return labelled

    def wrap(self, behaviour, method, response_streaming):
        def before(context):
            return time.perf_counter(), open_call()

        def after(context, state, failure):
            started, token = state
            elapsed_ms = (time.perf_counter() - started) * 1000
            code = _outcome_code(context, failure)
            record = close_call(token)
            labels = {key: value for key, value in record.items() if key != "principal"}
            if self._requests is not None:
                attributes = {"service": self._service, "rpc.method": method,
                              "rpc.grpc.status_code": code, **labels}
                self._requests.add(1, attributes)
                self._duration.record(elapsed_ms, attributes)
            level = logging.INFO if code in ("OK", "CANCELLED") else logging.WARNING
            _log.log(level, "rpc %s %s %.2fms", method, code, elapsed_ms,
                     extra={"rpc_method": method, "grpc_code": code, "outcome": code,
                            "duration_ms": round(elapsed_ms, 3),
                            "principal": record.get("principal", ""), **labels})

        return guarded(self._labelled(behaviour, method), response_streaming, before, reraise,
                       after)


def _outcome_code(context, failure: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int) and code:
        return grpc.StatusCode(tuple(c for c in grpc.StatusCode if c.value[0] == code)[0]).name
    if failure is None:
        return "OK"
    return "CANCELLED" if isinstance(failure, asyncio.CancelledError) else "UNKNOWN"
