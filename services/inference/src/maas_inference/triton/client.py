"""Async client of one Triton server: model control, and a raw-bytes inference data path.

Model control (load, unload, readiness, config) goes through tritonclient's
`InferenceServerClient`; it is rare and the convenience is worth its overhead. Inference goes
through the generated `GRPCInferenceServiceStub` on a dedicated grpc.aio channel: requests are
built with `raw_input_contents` so tensor bytes pass through untouched, and the lowest layer
(`infer_serialized`) forwards an already-serialized `ModelInferRequest` without parsing it at
all. Triton's failures are raised as the suite's `MaasError`s with the same canonical code.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from maas_runtime.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MaasError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from maas_runtime.peers import PeerTransport
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from maas_inference.triton.lockdown import control_headers


def control_client(grpc_url: str, transport: PeerTransport,
                   channel_args: Sequence[tuple[str, object]]) -> InferenceServerClient:
    """tritonclient's client of one Triton, dialled as `transport` says (plaintext, TLS or
    mTLS, from the service's `peer_tls_*` settings): the one way this package reaches Triton
    for control calls and probes."""
    return InferenceServerClient(grpc_url, creds=transport.credentials,
                                 channel_args=[*channel_args, *transport.options])

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# Triton is local or a sidecar, so reconnecting is cheap, and after a Triton restart gRPC's
# default backoff (1 s growing to 120 s) would keep failing calls long after it is back.
# A channel-local subchannel pool stops one client's backoff after an outage from being
# inherited by a client created later (gRPC shares subchannels between equal channels).
TRITON_CHANNEL_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.use_local_subchannel_pool", 1),
)

# KServe-v2 datatypes with a fixed-width little-endian numpy equivalent (BYTES is
# length-prefixed and BF16 has no numpy type, so neither converts here).
NUMPY_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DATATYPE_BY_NUMPY = {dtype: name for name, dtype in NUMPY_DTYPES.items()}

_ERRORS_BY_CODE: Mapping[grpc.StatusCode, type[MaasError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.CANCELLED: Cancelled,
}


class TritonModelNotFound(NotFound):
    """Triton does not know (or has not loaded) the model."""

    def __init__(self, model_name: str, message: str | None = None) -> None:
        super().__init__("triton model", model_name, message)


class TritonModelLoadError(FailedPrecondition):
    """Triton could not load the model; the message is Triton's (with the runtime's error)."""

    default_reason = "MODEL_LOAD_FAILED"


def triton_error(code: grpc.StatusCode, message: str, model_name: str = "") -> MaasError:
    """The suite error for a Triton status, keeping the canonical code.

    Triton answers NOT_FOUND ("Request for unknown model: ... is not found" or "... has no
    available versions") for a model it never loaded or has unloaded.
    """
    if code is grpc.StatusCode.NOT_FOUND:
        return TritonModelNotFound(model_name, message) if model_name else Internal(message)
    error_type = _ERRORS_BY_CODE.get(code, Internal)
    return error_type(f"triton: {message}", metadata={"triton_status": code.name})


def _from_client_exception(error: InferenceServerException, model_name: str = "") -> MaasError:
    status = error.status() or ""
    code_name = status.removeprefix("StatusCode.")
    code = grpc.StatusCode[code_name] if code_name in grpc.StatusCode.__members__ else None
    return triton_error(code or grpc.StatusCode.UNKNOWN, error.message() or str(error), model_name)


@dataclass(frozen=True)
class RawTensor:
    """A tensor as the KServe-v2 wire carries it: datatype, full shape and raw bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes
    """Row-major, little-endian element bytes (for BYTES: 4-byte length-prefixed items)."""

    @classmethod
    def from_numpy(cls, name: str, array: np.ndarray) -> RawTensor:
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        datatype = _DATATYPE_BY_NUMPY.get(dtype)
        if datatype is None:
            raise InvalidArgument.for_field(name, f"numpy dtype {array.dtype} has no raw KServe type")
        return cls(name, datatype, tuple(array.shape), np.ascontiguousarray(array, dtype).tobytes())

    def to_numpy(self) -> np.ndarray:
        dtype = NUMPY_DTYPES.get(self.datatype)
        if dtype is None:
            raise InvalidArgument.for_field(self.name, f"{self.datatype} has no numpy equivalent")
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)


@dataclass(frozen=True)
class InferReply:
    """Triton's answer: which model version served, and the raw outputs."""

    model_name: str
    model_version: str
    request_id: str
    outputs: tuple[RawTensor, ...]

    def output(self, name: str) -> RawTensor:
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        raise KeyError(name)


def build_infer_request(
    model_name: str,
    inputs: Sequence[RawTensor],
    *,
    output_names: Sequence[str] = (),
    model_version: str = "",
    request_id: str = "",
) -> service_pb2.ModelInferRequest:
    """A `ModelInferRequest` carrying each input's bytes in `raw_input_contents` as given."""
    request = service_pb2.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
    for tensor in inputs:
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        request.raw_input_contents.append(tensor.data)
    for name in output_names:
        request.outputs.add(name=name)
    return request


def reply_from_response(response: service_pb2.ModelInferResponse) -> InferReply:
    outputs = tuple(
        RawTensor(output.name, output.datatype, tuple(output.shape), raw)
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    )
    return InferReply(response.model_name, response.model_version, response.id, outputs)


def _length_delimited_field(field_number: int, value: bytes) -> bytes:
    tag = (field_number << 3) | 2
    length = len(value)
    varint = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        if length:
            varint.append(byte | 0x80)
        else:
            varint.append(byte)
            break
    return bytes([tag]) + bytes(varint) + value


def with_model_name(serialized_request: bytes, model_name: str, model_version: str = "") -> bytes:
    """Retargets a serialized `ModelInferRequest` at another model without parsing it.

    Protobuf parsers keep the last occurrence of a singular field, so appending
    `model_name` (field 1) and `model_version` (field 2) overrides what the caller sent while
    the tensor payload is neither decoded nor copied field by field.
    """
    suffix = _length_delimited_field(1, model_name.encode())
    suffix += _length_delimited_field(2, model_version.encode())
    return serialized_request + suffix


class TritonClient:
    """One Triton server's KServe-v2 API, for model control and inference."""

    def __init__(
        self,
        grpc_url: str,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        control_timeout_seconds: float = 300.0,
        control_key: str = "",
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        transport: PeerTransport | None = None,
    ) -> None:
        """`interceptors` wrap the data path's calls (client spans when traces are exported);
        `transport` is how Triton is dialled (plaintext unless a remote Triton serves TLS)."""
        transport = transport or PeerTransport()
        self.grpc_url = grpc_url
        self._control_timeout_seconds = control_timeout_seconds
        # Load/unload are Triton's restricted model-repository protocol (`lockdown`).
        self._control_headers = control_headers(control_key)
        channel_options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *TRITON_CHANNEL_RECONNECT_OPTIONS,
        ]
        self._control = control_client(grpc_url, transport, channel_options)
        # Own channel for the data path, so bulk inference and control calls do not share
        # one HTTP/2 connection's flow control.
        data_options = [*channel_options, *transport.options]
        self._channel = (
            grpc.aio.secure_channel(grpc_url, transport.credentials, options=data_options,
                                    interceptors=list(interceptors) or None)
            if transport.credentials is not None else
            grpc.aio.insecure_channel(grpc_url, options=data_options,
                                      interceptors=list(interceptors) or None))
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._infer_serialized = self._channel.unary_unary(MODEL_INFER_METHOD)

    async def close(self) -> None:
        await self._control.close()
        await self._channel.close()

    async def __aenter__(self) -> TritonClient:
        return self

    async def __aexit__(self, *_exc_info) -> None:
        await self.close()

    # Model control ------------------------------------------------------------------------

    async def is_server_ready(self, timeout: float = 1.0) -> bool:
        try:
            return await self._control.is_server_ready(client_timeout=timeout)
        except InferenceServerException:
            return False

    async def load_model(self, name: str, *, timeout: float | None = None) -> None:
        """Loads (or reloads, from the repository's current files) `name`; returns once done."""
        try:
            await self._control.load_model(name, headers=self._control_headers,
                                           client_timeout=timeout or self._control_timeout_seconds)
        except InferenceServerException as error:
            converted = _from_client_exception(error, name)
            if isinstance(converted, Unavailable | DeadlineExceeded):
                raise converted from None
            raise TritonModelLoadError(
                f"Triton could not load model {name!r}: {error.message()}",
                metadata={"triton_model": name},
            ) from None

    async def unload_model(self, name: str, *, timeout: float | None = None) -> None:
        """Unloads `name`; Triton lets in-flight requests finish first."""
        try:
            await self._control.unload_model(name, headers=self._control_headers,
                                             client_timeout=timeout or self._control_timeout_seconds)
        except InferenceServerException as error:
            raise _from_client_exception(error, name) from None

    async def is_model_ready(self, name: str, *, timeout: float = 5.0) -> bool:
        try:
            return await self._control.is_model_ready(name, client_timeout=timeout)
        except InferenceServerException as error:
            raise _from_client_exception(error, name) from None

    async def wait_model_ready(
        self, name: str, timeout: float, *, poll_interval_seconds: float = 0.05
    ) -> None:
        """Returns once `name` is READY; `DeadlineExceeded` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if await self.is_model_ready(name, timeout=max(remaining, 0.05)):
                    return
            except Unavailable:
                pass  # Triton is (re)starting; keep waiting until the deadline.
            if time.monotonic() + poll_interval_seconds > deadline:
                raise DeadlineExceeded(f"Triton model {name!r} not ready after {timeout:g} s")
            await asyncio.sleep(poll_interval_seconds)

    async def model_config(self, name: str) -> model_config_pb2.ModelConfig:
        try:
            response = await self._control.get_model_config(name, client_timeout=30.0)
        except InferenceServerException as error:
            raise _from_client_exception(error, name) from None
        return response.config

    async def model_statistics(self, name: str) -> service_pb2.ModelStatisticsResponse:
        try:
            return await self._control.get_inference_statistics(name, client_timeout=30.0)
        except InferenceServerException as error:
            raise _from_client_exception(error, name) from None

    # Data path ----------------------------------------------------------------------------

    async def infer(
        self,
        model_name: str,
        inputs: Sequence[RawTensor],
        *,
        output_names: Sequence[str] = (),
        model_version: str = "",
        request_id: str = "",
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> InferReply:
        request = build_infer_request(
            model_name,
            inputs,
            output_names=output_names,
            model_version=model_version,
            request_id=request_id,
        )
        return reply_from_response(await self.infer_request(request, timeout=timeout, metadata=metadata))

    async def infer_request(
        self,
        request: service_pb2.ModelInferRequest,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> service_pb2.ModelInferResponse:
        """Sends a prepared request as is (a gateway forwards its caller's request here)."""
        try:
            return await self._stub.ModelInfer(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            raise triton_error(error.code(), error.details() or "", request.model_name) from None

    def open_stream(
        self,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> TritonStream:
        """A `ModelStreamInfer` call: requests written one by one, responses read in turn."""
        return TritonStream(self._stub.ModelStreamInfer(timeout=timeout, metadata=metadata))

    async def infer_serialized(
        self,
        serialized_request: bytes,
        *,
        model_name: str = "",
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> bytes:
        """Forwards a serialized `ModelInferRequest` and returns the serialized response.

        Neither message is parsed here: the cheapest hop a gateway can make. `model_name`
        only labels errors.
        """
        try:
            return await self._infer_serialized(serialized_request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            raise triton_error(error.code(), error.details() or "", model_name) from None


class TritonStream:
    """One bidirectional `ModelStreamInfer` call to Triton; failures of the call itself (not
    of a request, which Triton reports in `error_message`) raise the suite's errors."""

    def __init__(self, call) -> None:
        self._call = call

    async def send(self, request: service_pb2.ModelInferRequest) -> None:
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as error:
            raise triton_error(error.code(), error.details() or "", request.model_name) from None

    async def receive(self) -> service_pb2.ModelStreamInferResponse:
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as error:
            raise triton_error(error.code(), error.details() or "") from None
        if response is grpc.aio.EOF:
            raise Unavailable("Triton ended the inference stream", reason="TRITON_UNAVAILABLE")
        return response

    async def close(self) -> None:
        """Half-close, then end the call (a request still being answered is cancelled)."""
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
            await self._call.done_writing()
        self._call.cancel()
