"""gRPC servicers: `maas.inference.v1.InferenceService` and KServe-v2 on the same port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import NoReturn

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError
from maas.inference.v1 import deployment_pb2, inference_service_pb2, inference_service_pb2_grpc
from maas_llm.prompts import ChatMessage
from maas_runtime.auth import Role, current_principal
from maas_runtime.errors import InvalidArgument, MaasError, PermissionDenied, Unimplemented
from maas_runtime.messages import parse_request, request_fields, to_message
from tritonclient.grpc import service_pb2, service_pb2_grpc

from maas_inference.controller import DeploymentController
from maas_inference.generation import (
    FinishReason,
    GenerationEnd,
    GenerationRequest,
    Generator,
    TextDelta,
)
from maas_inference.kserve import KServeViews
from maas_inference.predictor import Predictor
from maas_inference.tensors import TensorRule, predict_outputs


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    """Deployments and Predict: convert, call the controller or the predictor, convert back."""

    def __init__(self, controller: DeploymentController, predictor: Predictor,
                 generator: Generator) -> None:
        self._controller = controller
        self._predictor = predictor
        self._generator = generator

    async def CreateDeployment(self, request: inference_service_pb2.CreateDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> deployment_pb2.Deployment:
        deployment = await self._controller.create(
            request.deployment_id, request_fields(request.deployment, "deployment"),
            current_principal())
        return to_message(deployment, deployment_pb2.Deployment)

    async def GetDeployment(self, request: inference_service_pb2.GetDeploymentRequest,
                            context: grpc.aio.ServicerContext) -> deployment_pb2.Deployment:
        deployment = await self._controller.get(request.name, current_principal())
        return to_message(deployment, deployment_pb2.Deployment)

    async def ListDeployments(
            self, request: inference_service_pb2.ListDeploymentsRequest, context: grpc.aio.ServicerContext,
    ) -> inference_service_pb2.ListDeploymentsResponse:
        items, token = await self._controller.list(request.page_size, request.page_token,
                                                  current_principal())
        return inference_service_pb2.ListDeploymentsResponse(
            deployments=[to_message(d, deployment_pb2.Deployment) for d in items],
            next_page_token=token)

    async def UpdateDeployment(self, request: inference_service_pb2.UpdateDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> deployment_pb2.Deployment:
        deployment = await self._controller.update(
            request_fields(request.deployment, "deployment", keep_identifier=True),
            list(request.update_mask.paths), current_principal())
        return to_message(deployment, deployment_pb2.Deployment)

    async def DeleteDeployment(self, request: inference_service_pb2.DeleteDeploymentRequest,
                               context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._controller.delete(request.name, current_principal())
        return empty_pb2.Empty()

    async def Predict(self, request: inference_service_pb2.PredictRequest,
                      context: grpc.aio.ServicerContext) -> inference_service_pb2.PredictResponse:
        return await self._predict(request, context)

    async def StreamPredict(
            self, request_iterator: AsyncIterator[inference_service_pb2.PredictRequest],
            context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_service_pb2.PredictResponse]:
        async for request in request_iterator:
            yield await self._predict(request, context)

    async def _predict(self, request: inference_service_pb2.PredictRequest,
                       context: grpc.aio.ServicerContext) -> inference_service_pb2.PredictResponse:
        prediction = await self._predictor.predict(
            request.deployment, request.request_id, request.inputs, request.output_names,
            _deadline(context), current_principal())
        return inference_service_pb2.PredictResponse(
            request_id=prediction.request_id, model_version=prediction.version,
            outputs=predict_outputs(prediction.response))

    async def Generate(self, request: bytes, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[inference_service_pb2.GenerateResponse]:
        """Registered on raw bytes (`add_inference_to_server`): text that is not UTF-8 is
        INVALID_ARGUMENT naming its field, not grpc's INTERNAL parse failure."""
        parsed = parse_request(inference_service_pb2.GenerateRequest, request)
        async for event in self._generator.generate(generation_request(parsed),
                                                    current_principal(), _deadline(context)):
            yield generate_response(event)


def generation_request(request: inference_service_pb2.GenerateRequest) -> GenerationRequest:
    messages = None
    if request.WhichOneof("input") == "conversation":
        messages = tuple(ChatMessage(m.role, m.content) for m in request.conversation.messages)
    return GenerationRequest(
        deployment=request.deployment,
        prompt=request.prompt if request.WhichOneof("input") == "prompt" else None,
        messages=messages,
        max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
        temperature=request.temperature if request.HasField("temperature") else None,
        top_p=request.top_p if request.HasField("top_p") else None, top_k=request.top_k,
        stop=tuple(request.stop), seed=request.seed if request.HasField("seed") else None,
        repetition_penalty=(request.repetition_penalty
                            if request.HasField("repetition_penalty") else None))


_FINISH_REASONS = {FinishReason.STOP: inference_service_pb2.FINISH_REASON_STOP,
                   FinishReason.LENGTH: inference_service_pb2.FINISH_REASON_LENGTH,
                   FinishReason.CANCELLED: inference_service_pb2.FINISH_REASON_CANCELLED}


def generate_response(event: TextDelta | GenerationEnd) -> inference_service_pb2.GenerateResponse:
    if isinstance(event, TextDelta):
        return inference_service_pb2.GenerateResponse(delta=inference_service_pb2.TextDelta(
            text=event.text, token_count=event.token_count))
    usage = inference_service_pb2.GenerationUsage(
        prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
        total_tokens=event.total_tokens)
    if event.time_to_first_token is not None:
        usage.time_to_first_token.FromNanoseconds(int(event.time_to_first_token * 1e9))
    return inference_service_pb2.GenerateResponse(final=inference_service_pb2.GenerationFinal(
        finish_reason=_FINISH_REASONS[event.finish_reason], usage=usage))


def add_inference_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register InferenceService as its generated code does, except Generate, which takes its
    request as raw bytes and parses it itself (`parse_request`)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}

    class Capture:
        """Receives the generated registration's handlers instead of a server."""

        def add_generic_rpc_handlers(self, generic_handlers: object) -> None:
            pass

        def add_registered_method_handlers(self, service: str,
                                           method_handlers: dict[str, grpc.RpcMethodHandler]
                                           ) -> None:
            handlers.update(method_handlers)

    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, Capture())
    handlers["Generate"] = grpc.unary_stream_rpc_method_handler(
        servicer.Generate,
        response_serializer=inference_service_pb2.GenerateResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(INFERENCE_SERVICE, handlers),))
    server.add_registered_method_handlers(INFERENCE_SERVICE, handlers)


INFERENCE_SERVICE = "maas.inference.v1.InferenceService"


KSERVE_SERVICE = "inference.GRPCInferenceService"

REFUSED_KSERVE_METHODS: dict[str, MaasError] = {
    **{method: PermissionDenied(
        "the gateway loads and unloads models through deployments (CreateDeployment, "
        "UpdateDeployment, DeleteDeployment of maas.inference.v1.InferenceService), never "
        "through the model repository", reason="REPOSITORY_CONTROL_REFUSED")
       for method in ("RepositoryModelLoad", "RepositoryModelUnload")},
    **{method: Unimplemented(
        "shared memory is not offered through the gateway (it is a remote service): send "
        "tensors in the request (raw_input_contents)", reason="SHARED_MEMORY_UNSUPPORTED")
       for method in ("SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
                      "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
                      "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister")},
    **{method: Unimplemented(
        "trace and log settings belong to the operator: the gateway is traced with "
        "OpenTelemetry (W3C traceparent) and configured by its settings",
        reason="SERVER_SETTINGS_UNSUPPORTED")
       for method in ("TraceSetting", "LogSettings")},
}
"""Standard methods refused by design, each with the reason a caller can act on."""

KSERVE_ROLES = {f"/{KSERVE_SERVICE}/{method}": Role.VIEWER
                for method in ("ServerLive", "ServerReady", "ModelReady", "ModelMetadata",
                               "ModelInfer", "ServerMetadata", "ModelConfig", "ModelStatistics",
                               "RepositoryIndex", "ModelStreamInfer", *REFUSED_KSERVE_METHODS)}
"""KServe-v2 has no role annotations of ours: every supported method is a read (or an
inference), and a refused one is refused with its reason, whatever the role."""


def _parse_infer_request(serialized: bytes) -> service_pb2.ModelInferRequest:
    try:
        return service_pb2.ModelInferRequest.FromString(serialized)
    except DecodeError:
        raise InvalidArgument.for_field(
            "request", "is not a serialized inference.ModelInferRequest") from None


async def _parsed_infer_requests(
        serialized_requests: AsyncIterator[bytes]) -> AsyncIterator[service_pb2.ModelInferRequest]:
    async for serialized in serialized_requests:
        yield _parse_infer_request(serialized)


class KServeServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The standard KServe-v2 protocol over deployments (model name = deployment id)."""

    def __init__(self, predictor: Predictor, views: KServeViews,
                 triton_ready: Callable[[], bool]) -> None:
        self._predictor = predictor
        self._views = views
        self._triton_ready = triton_ready

    async def ServerLive(self, request: service_pb2.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: service_pb2.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=self._triton_ready())

    async def ServerMetadata(self, request: service_pb2.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> service_pb2.ServerMetadataResponse:
        return service_pb2.ServerMetadataResponse(name="maas-inference", version="1",
                                                  extensions=["model_repository_free"])

    async def ModelReady(self, request: service_pb2.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> service_pb2.ModelReadyResponse:
        return service_pb2.ModelReadyResponse(ready=self._predictor.is_ready(request.name))

    async def ModelMetadata(self, request: service_pb2.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> service_pb2.ModelMetadataResponse:
        served, versions = self._predictor.metadata(request.name, current_principal())
        signature = served.signature
        batch = [-1] if signature.max_batch_size > 0 else []

        def tensors(
                rules: Iterable[TensorRule]) -> list[service_pb2.ModelMetadataResponse.TensorMetadata]:
            return [service_pb2.ModelMetadataResponse.TensorMetadata(
                name=r.name, datatype=r.datatype, shape=batch + list(r.shape)) for r in rules]

        return service_pb2.ModelMetadataResponse(
            name=request.name, versions=[v.rsplit("/", 1)[-1] for v in versions],
            platform="maas_triton", inputs=tensors(signature.inputs),
            outputs=tensors(signature.outputs))

    async def ModelConfig(self, request: service_pb2.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> service_pb2.ModelConfigResponse:
        config = await self._views.model_config(request.name, current_principal())
        return service_pb2.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: service_pb2.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> service_pb2.ModelStatisticsResponse:
        statistics = await self._views.model_statistics(request.name, current_principal())
        return service_pb2.ModelStatisticsResponse(model_stats=statistics)

    async def RepositoryIndex(self, request: service_pb2.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> service_pb2.RepositoryIndexResponse:
        models = await self._views.repository_index(request.repository_name, request.ready,
                                                    current_principal())
        return service_pb2.RepositoryIndexResponse(models=models)

    async def ModelInfer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        reply = await self._predictor.kserve_infer(_parse_infer_request(request),
                                                   _deadline(context), current_principal())
        return reply.SerializeToString()

    async def ModelStreamInfer(
            self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        async for response in self._predictor.kserve_stream_infer(
                _parsed_infer_requests(request_iterator), _deadline(context),
                current_principal()):
            yield response


def _refusal(error: MaasError) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[NoReturn]]:
    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> NoReturn:
        raise type(error)(error.message, reason=error.reason)  # a fresh one: no traceback piles up

    return refuse


def add_kserve_to_server(servicer: KServeServicer, server: grpc.aio.Server) -> None:
    """Register KServe-v2: ModelInfer and ModelStreamInfer on raw bytes (parsed by the
    servicer, so a malformed request is INVALID_ARGUMENT naming `request`, not grpc's INTERNAL
    deserialization failure), the refused methods on raw bytes too (whatever was sent, the
    answer is the refusal), and the other methods on their generated messages."""
    typed = {
        "ServerLive": (service_pb2.ServerLiveRequest, service_pb2.ServerLiveResponse),
        "ServerReady": (service_pb2.ServerReadyRequest, service_pb2.ServerReadyResponse),
        "ServerMetadata": (service_pb2.ServerMetadataRequest, service_pb2.ServerMetadataResponse),
        "ModelReady": (service_pb2.ModelReadyRequest, service_pb2.ModelReadyResponse),
        "ModelMetadata": (service_pb2.ModelMetadataRequest, service_pb2.ModelMetadataResponse),
        "ModelConfig": (service_pb2.ModelConfigRequest, service_pb2.ModelConfigResponse),
        "ModelStatistics": (service_pb2.ModelStatisticsRequest,
                            service_pb2.ModelStatisticsResponse),
        "RepositoryIndex": (service_pb2.RepositoryIndexRequest,
                            service_pb2.RepositoryIndexResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString)
        for name, (request_type, response_type) in typed.items()
    }
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(servicer.ModelInfer)
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString)
    for name, error in REFUSED_KSERVE_METHODS.items():
        handlers[name] = grpc.unary_unary_rpc_method_handler(_refusal(error))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(KSERVE_SERVICE, handlers),))
