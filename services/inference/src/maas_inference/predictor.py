"""The data path of deployments: Predict, KServe-v2 infer and stream infer, shadow mirroring.

Transport-free. Every request is routed through the `RouteTable` the controller maintains,
checked against the signature of the version it lands on, sent to that version's Triton model
(through the coalescer, so concurrent requests may share a call) and answered under the
deployment's name. A sampled copy goes to the deployment's shadow, never delaying or failing
the primary reply; the comparisons are kept per deployment and counted as metrics.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from maas.common.v1 import tensor_pb2
from maas_runtime import errors
from maas_runtime.auth import Principal
from maas_runtime.telemetry import trace_metadata
from opentelemetry.metrics import Meter
from tritonclient.grpc import service_pb2

from maas_inference.coalescing import RequestCoalescer
from maas_inference.generation import TENANT_PARAMETER, is_generative
from maas_inference.routing import (
    LiveRoute,
    Route,
    RouteTable,
    ServedModel,
    ShadowStats,
    parse_deployment_name,
)
from maas_inference.tenancy import TenancyConfigSource, TenantLimiter
from maas_inference.tensors import (
    check_output_names,
    check_text_inputs,
    infer_request_from_predict,
    kserve_shapes,
    predict_shapes,
)
from maas_inference.triton.client import TritonClient, TritonModelNotFound
from maas_inference.usage import tenant_of


@dataclass
class Prediction:
    request_id: str
    version: str
    response: object
    """The Triton `ModelInferResponse`."""


class Predictor:
    """Predict and KServe inference on the deployments the route table serves."""

    def __init__(self, routes: RouteTable, triton: TritonClient, *,
                 coalesce_calls_per_instance: int = 1, shadow_max_in_flight: int = 64,
                 meter: Meter | None = None, limiter: TenantLimiter | None = None) -> None:
        self._routes = routes
        self._limiter = limiter or TenantLimiter(TenancyConfigSource(None))
        """Admits each request against its tenant's limits and records its usage."""
        self._triton = triton
        self._coalesce_calls_per_instance = coalesce_calls_per_instance
        """Calls open per Triton model instance before concurrent requests share calls."""
        self._coalescer = RequestCoalescer(triton.infer_request)
        self._shadow_slots = asyncio.Semaphore(shadow_max_in_flight)
        self._shadow_tasks: set[asyncio.Task] = set()
        self._shadow_counter = meter.create_counter(
            "maas.inference.shadow.compared", description="shadow comparisons by outcome"
        ) if meter is not None else None

    async def predict(self, deployment: str, request_id: str, inputs: Sequence[tensor_pb2.Tensor],
                      output_names: Sequence[str],
                      timeout: float | None, principal: Principal) -> Prediction:
        deployment_id = parse_deployment_name(deployment, "deployment")
        live = self._routes.served(deployment_id, principal)
        self._routes.require_triton()
        request_id = request_id or uuid.uuid4().hex
        target = live.route.pick(request_id)
        _require_unary(target, deployment_id, "Predict")
        rows = target.signature.check(predict_shapes(inputs), "inputs")
        check_output_names(output_names, target.signature, "output_names")
        request = infer_request_from_predict(inputs, output_names, target.triton_model,
                                             request_id)
        if target.signature.has_text_inputs:
            check_text_inputs(target.signature, request, "inputs")
        async with self._limiter.admit_request(principal, deployment_id, rows) as call:
            call.version = target.version
            response = await self._infer(target, request, rows, timeout)
        if live.route.mirrors(request_id):
            self._mirror(live, request, response)
        return Prediction(request_id, target.version, response)

    async def _infer(self, target: ServedModel, request: service_pb2.ModelInferRequest,
                     rows: int, timeout: float | None) -> service_pb2.ModelInferResponse:
        """Triton's answer, through the coalescer (concurrent requests may share a call).

        A routed model that Triton does not know was lost with a Triton restart and is being
        loaded again: that is UNAVAILABLE (retry shortly), never NOT_FOUND for a deployment
        that exists.
        """
        with self._routes.in_flight.track(target.triton_model):
            try:
                return await self._coalescer.infer(
                    request, rows=rows if target.signature.splits_by_rows else None,
                    max_rows=target.signature.max_batch_size,
                    max_in_flight=target.instances * self._coalesce_calls_per_instance,
                    timeout=timeout, metadata=trace_metadata())
            except TritonModelNotFound as exc:
                raise errors.Unavailable(
                    f"{target.version} is being loaded into Triton again; retry shortly",
                    reason="MODEL_NOT_LOADED") from exc

    async def kserve_infer(self, request: service_pb2.ModelInferRequest, timeout: float | None,
                           principal: Principal) -> service_pb2.ModelInferResponse:
        """KServe-v2 ModelInfer (model name = deployment id).

        The request is sent on under the Triton model's name; the reply carries the
        deployment's name and version. Tensor bytes are passed along as they came
        (concatenated with others' when calls are shared), never decoded.
        """
        deployment_id = request.model_name
        live, target, rows, request_id = self._kserve_route(request, principal)
        _require_unary(target, deployment_id, "ModelInfer")
        async with self._limiter.admit_request(principal, deployment_id, rows) as call:
            call.version = target.version
            response = await self._infer(target, request, rows, timeout)
        if live.route.mirrors(request_id):
            self._mirror(live, request, response)
        response.model_name = deployment_id
        response.model_version = target.version.rsplit("/", 1)[-1]
        return response

    def _kserve_route(self, request: service_pb2.ModelInferRequest, principal: Principal
                      ) -> tuple[LiveRoute, ServedModel, int, str]:
        """Route a KServe request (model name = deployment id) to one of the deployment's
        versions, check it against that version's signature and retarget it at the Triton
        model. Returns the route, the target, the request's rows and its (routing) id."""
        live = self._routes.served(request.model_name, principal)
        self._routes.require_triton()
        request_id = request.id or uuid.uuid4().hex
        target = live.route.pick(request_id)
        rows = target.signature.check(kserve_shapes(request), "inputs")
        if target.signature.has_text_inputs:
            check_text_inputs(target.signature, request, "inputs")
        request.model_name = target.triton_model
        return live, target, rows, request_id

    async def kserve_stream_infer(
            self, requests: AsyncIterator[service_pb2.ModelInferRequest], timeout: float | None,
            principal: Principal) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """KServe-v2 ModelStreamInfer: each request routed as ModelInfer is, then answered on
        one Triton stream, in order: every response of a request (several for a decoupled
        model) comes before the first of the next. A request refused here or failed by Triton
        is answered with `error_message`, as Triton does, and the stream goes on. Shadows are
        not fed from streams.

        Triton marks a request's last response only when asked to, so every request asks
        (`triton_enable_empty_final_response`); the empty closing response of a decoupled
        model is passed on only to callers that asked for it themselves.
        """
        stream = None
        try:
            async for request in requests:
                deployment_id = request.model_name
                metered = contextlib.AsyncExitStack()  # the request's admission, left below
                try:
                    _, target, rows, _ = self._kserve_route(request, principal)
                    call = await metered.enter_async_context(
                        self._limiter.admit_request(principal, deployment_id, rows))
                except errors.MaasError as exc:
                    yield service_pb2.ModelStreamInferResponse(
                        error_message=exc.message, infer_response=service_pb2.ModelInferResponse(
                            model_name=deployment_id, id=request.id))
                    continue
                call.version = target.version
                async with metered:
                    asked = request.parameters.get(ENABLE_FINAL_RESPONSE)
                    caller_wants_final = asked is not None and asked.bool_param
                    request.parameters[ENABLE_FINAL_RESPONSE].bool_param = True
                    # The model shares its slots between tenants: the caller's own, whatever
                    # the request says.
                    request.parameters[TENANT_PARAMETER].string_param = tenant_of(principal)
                    if stream is None:
                        stream = self._triton.open_stream(timeout=timeout, metadata=trace_metadata())
                    with self._routes.in_flight.track(target.triton_model):
                        await stream.send(request)
                        while True:
                            response = await stream.receive()
                            final = is_final_response(response)
                            if final and not caller_wants_final and _is_empty_response(response):
                                break
                            _as_deployment(response, deployment_id, target)
                            if not caller_wants_final and \
                                    FINAL_RESPONSE in response.infer_response.parameters:
                                del response.infer_response.parameters[FINAL_RESPONSE]
                            yield response
                            if final:
                                break
        finally:
            if stream is not None:
                await stream.close()

    def _mirror(self, live: LiveRoute, request: service_pb2.ModelInferRequest,
                primary: service_pb2.ModelInferResponse) -> None:
        """Copy to the shadow without delaying or failing the primary reply."""
        if self._shadow_slots.locked():
            return  # saturated: skip rather than queue behind the primary traffic
        shadow = live.route.shadow
        if shadow is None:
            return
        copy = type(request)()
        copy.CopyFrom(request)
        copy.model_name = shadow.triton_model
        self._spawn_shadow(self._compare(live.shadow_stats, copy, primary))

    def _spawn_shadow(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _compare(self, stats: ShadowStats, request: service_pb2.ModelInferRequest,
                       primary: service_pb2.ModelInferResponse) -> None:
        async with self._shadow_slots:
            try:
                with self._routes.in_flight.track(request.model_name):
                    shadow = await self._triton.infer_request(request, timeout=30)
            except errors.MaasError:
                stats.errors += 1
                self._count_shadow("error")
                return
        first_primary, first_shadow = _first_output(primary), _first_output(shadow)
        stats.compared += 1
        if first_primary is None or first_shadow is None or \
                first_primary.shape != first_shadow.shape:
            self._count_shadow("mismatch")
            return
        diff = float(np.max(np.abs(first_primary - first_shadow))) if first_primary.size else 0.0
        stats.max_abs_diff = max(stats.max_abs_diff, diff)
        agreed = bool(np.array_equal(first_primary.reshape(len(first_primary), -1).argmax(1),
                                     first_shadow.reshape(len(first_shadow), -1).argmax(1)))
        stats.argmax_agreed += agreed
        self._count_shadow("agreed" if agreed else "disagreed")

    def _count_shadow(self, outcome: str) -> None:
        if self._shadow_counter is not None:
            self._shadow_counter.add(1, {"outcome": outcome})

    async def drain_background(self) -> None:
        """Wait for the shadow comparisons in flight (their stats are then complete)."""
        if self._shadow_tasks:
            await asyncio.gather(*self._shadow_tasks, return_exceptions=True)

    async def close(self) -> None:
        """Finish calls and shadow comparisons in flight."""
        await self._coalescer.close()
        await self.drain_background()

    def metadata(self, deployment_id: str,
                 principal: Principal) -> tuple[ServedModel, builtins.list[str]]:
        route = self._routes.served(deployment_id, principal).route
        return route.targets[0][0], [m.version for m, _ in route.targets]

    def served_route(self, deployment_id: str, principal: Principal) -> Route:
        """The live route of a deployment the token may see: NOT_FOUND when there is no such
        deployment, UNAVAILABLE while it is not loaded, PERMISSION_DENIED out of scope."""
        return self._routes.served(deployment_id, principal).route

    def is_ready(self, deployment_id: str) -> bool:
        return self._routes.is_ready(deployment_id)


ENABLE_FINAL_RESPONSE = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"


def is_final_response(response: service_pb2.ModelStreamInferResponse) -> bool:
    """The last response of its request: Triton flags it (when asked); an unflagged one is
    the only one (a model that is not decoupled, or an error)."""
    flag = response.infer_response.parameters.get(FINAL_RESPONSE)
    return flag is None or flag.bool_param


def _is_empty_response(response: service_pb2.ModelStreamInferResponse) -> bool:
    return not response.error_message and not response.infer_response.outputs


def _as_deployment(response: service_pb2.ModelStreamInferResponse, deployment_id: str,
                   target: ServedModel) -> None:
    """Name the deployment and its version where Triton named its own model."""
    reply = response.infer_response
    reply.model_name = deployment_id
    reply.model_version = target.version.rsplit("/", 1)[-1]
    if response.error_message:
        response.error_message = response.error_message.replace(target.triton_model,
                                                                deployment_id)


_NUMPY_TYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64,
                "INT32": np.int32, "INT8": np.int8, "UINT8": np.uint8}


def _first_output(response: service_pb2.ModelInferResponse) -> np.ndarray | None:
    if not response.outputs or not response.raw_output_contents:
        return None
    output = response.outputs[0]
    dtype = _NUMPY_TYPES.get(output.datatype)
    if dtype is None:
        return None
    array = np.frombuffer(response.raw_output_contents[0], dtype=dtype)
    return array.reshape(tuple(output.shape)).astype(np.float64)


def _require_unary(target: ServedModel, deployment_id: str, method: str) -> None:
    """A generative (decoupled) version answers in a stream of responses, which a unary call
    cannot carry: the caller is told which calls to use instead."""
    if is_generative(target.signature):
        raise errors.FailedPrecondition(
            f"deployments/{deployment_id} serves {target.version}, a generative model that "
            f"streams its answer: {method} cannot carry it, use Generate or ModelStreamInfer",
            reason="STREAMING_REQUIRED")
