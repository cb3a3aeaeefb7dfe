"""`maas.Client`: the whole suite from Python in a few lines.

    import maas
    client = maas.Client()                       # the local suite (`maas up`), its admin token
    client.upload_module("digits", net, x, alias="production")  # TorchScript, signature from x
    client.deploy("digits", "digits@production")
    client.predict("digits", x)                  # {"output": array(...)}, as net(x)

Calls are synchronous; underneath, grpc.aio channels (one `maas_runtime.peers.PeerChannel`
per service, opened on first use and reused) run on the client's private event loop, so a
client works from any thread and inside notebooks. `predict`, the hot path, calls from the
caller's own thread over one blocking channel (`maas_runtime.client.open_blocking_channel`,
same TLS and limits, the token as call metadata), with the request built from the arrays'
bytes and the outputs read as views of the reply's: about tritonclient's cost per call.
Resources come back as the contract's protobuf messages (`model_pb2.ModelVersion`, ...); a
failed call raises the typed error of its status (`maas.NotFound`, `maas.InvalidArgument`
with field violations, `maas.Unauthenticated`, ...). Close the client (or use it as a
context manager) when done.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import functools
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import field_mask_pb2, json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas.common.v1 import job_pb2
from maas.compressor.v1 import (
    compression_job_pb2 as cj,
    compressor_service_pb2 as cs,
    compressor_service_pb2_grpc,
)
from maas.inference.v1 import (
    deployment_pb2,
    inference_service_pb2 as inf,
    inference_service_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from maas.registry.v1 import (
    audit_pb2,
    dataset_pb2,
    model_pb2,
    registry_service_pb2 as rs,
    registry_service_pb2_grpc,
)
from maas.trainer.v1 import trainer_service_pb2 as ts, trainer_service_pb2_grpc, training_job_pb2 as tj
from maas_runtime.auth import Role, TokenInfo, add_token, list_tokens, revoke_tokens
from maas_runtime.client import bearer_metadata, open_blocking_channel
from maas_runtime.discovery import ServiceDiscovery
from maas_runtime.grpc_errors import from_rpc_error
from maas_runtime.messages import to_dict
from maas_runtime.peers import PeerChannel, PeerTransport
from maas_runtime.registry_client import DownloadRetry, RegistryClient, file_sha256
from tritonclient.grpc import service_pb2 as kserve_pb2, service_pb2_grpc as kserve_grpc

from maas_sdk import jobs as job_specs
from maas_sdk.connection import (
    MAX_MESSAGE_BYTES,
    SERVICES,
    TOKENS_FILE,
    Connection,
    EventLoopThread,
    healthy_round_robin_options,
)
from maas_sdk.errors import (
    AlreadyExists,
    InvalidArgument,
    JobFailed,
    MaasError,
    NotFound,
    Unavailable,
)
from maas_sdk.failover import Failover
from maas_sdk.generation import Generation, generate_request, log_generation_restart, pump_generation
from maas_sdk.jobs import FINAL_STATES, JobProgress, progress_of, state_name
from maas_sdk.lineage import LineageTree
from maas_sdk.llm import LlmImport
from maas_sdk.model_files import (
    model_format,
    signature_from_onnx,
    signature_from_torchscript,
    write_module,
)
from maas_sdk.replicas import AsyncReplicas, BlockingReplicas
from maas_sdk.retries import RetryPolicy
from maas_sdk.tensors import from_tensor, named_inputs, to_tensor

__all__ = ["Client", "ServiceStatus"]

_log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
PAGE_SIZE = 500
_Stub = TypeVar("_Stub")
Job = tj.TrainingJob | cj.CompressionJob
ProgressCallback = Callable[[JobProgress], None]


@dataclass(frozen=True)
class ServiceStatus:
    """Health of one service (or of the Triton behind the inference service)."""

    name: str
    target: str
    status: str
    """"SERVING", "NOT_SERVING", "UNREACHABLE", or for Triton "READY" / "NOT_READY"."""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("SERVING", "READY")


def model_name(model: str) -> str:
    """`digits` → `models/digits`."""
    return model if model.startswith("models/") else f"models/{model}"


def version_name(reference: str) -> str:
    """`digits@production`, `digits/3`, `digits/versions/3` or a full name → the resource
    name the registry resolves (`models/digits@production`, `models/digits/versions/3`)."""
    reference = model_name(reference)
    match = re.fullmatch(r"models/([^/@]+)/(\d+)", reference)
    return f"models/{match[1]}/versions/{match[2]}" if match else reference


def dataset_name(dataset: str) -> str:
    return dataset if dataset.startswith("datasets/") else f"datasets/{dataset}"


def dataset_version_name(reference: str) -> str:
    reference = dataset_name(reference)
    match = re.fullmatch(r"datasets/([^/@]+)/(\d+)", reference)
    return f"datasets/{match[1]}/versions/{match[2]}" if match else reference


def deployment_name(deployment: str) -> str:
    return deployment if deployment.startswith("deployments/") else f"deployments/{deployment}"


@dataclass(frozen=True)
class Prediction:
    """One Predict reply: the outputs and the version that answered."""

    outputs: dict[str, np.ndarray]
    """Output name → array (read-only views of the reply)."""
    model_version: str
    """The version that served the request, "models/{m}/versions/{v}"."""


class Client:
    """One connection to the suite: registry, trainer, compressor and inference.

    Where: `target` ("host:port" for every service, or "registry=host:port;inference=...")
    or `targets` (service → "host:port"), or `discovery` (a `maas_runtime.discovery`
    backend) / `consul` (a Consul agent's address); by default `MAAS_TARGET`,
    `CONSUL_HTTP_ADDR`, `MAAS_STATIC_ENDPOINTS`, then the suite `maas up` runs on
    `state_dir`. Who: `token`, else `MAAS_TOKEN`, else the local suite's admin token. TLS:
    `ca_file` (and `cert_file` + `key_file` for mTLS, `server_name` when the certificate
    names another host). `timeout` bounds every unary call (each attempt), in seconds.

    Replicas: a service named with several endpoints (`inference=a:50054,b:50054`), or found
    through discovery, is called round-robin over its replicas that report SERVING; reads
    and `predict` that fail UNAVAILABLE are sent again to the next one as `retry` says
    (`maas_sdk.retries`; writes are never repeated).
    """

    def __init__(self, target: str | None = None, *, targets: Mapping[str, str] | None = None,
                 discovery: ServiceDiscovery | None = None, consul: str | None = None,
                 token: str | None = None, state_dir: str | os.PathLike[str] | None = None,
                 ca_file: str | os.PathLike[str] | None = None,
                 cert_file: str | os.PathLike[str] | None = None,
                 key_file: str | os.PathLike[str] | None = None, server_name: str = "",
                 timeout: float = 60.0, retry: RetryPolicy | None = None):
        self.connection = Connection.resolve(
            target=target, targets=targets, discovery=discovery, consul=consul, token=token,
            state_dir=state_dir, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
            server_name=server_name)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._runner = EventLoopThread()
        self._peers: dict[str, PeerChannel] = {}
        self._opening = asyncio.Lock()
        self._stubs: dict[tuple[str, type], Any] = {}
        self._input_names: dict[str, list[str]] = {}
        self._predict_channel: grpc.Channel | None = None
        self._predict_stub: inference_service_pb2_grpc.InferenceServiceStub | None = None
        self._predict_replicas: BlockingReplicas | None = None
        self._replicas: dict[str, AsyncReplicas] = {}
        self._metadata = bearer_metadata(self.connection.token)
        self._predict_lock = threading.Lock()

    # Lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every channel and stop the client's event loop."""
        if self._runner.loop.is_closed():
            return
        if self._predict_channel is not None:
            self._predict_channel.close()
            self._predict_channel = self._predict_stub = None
        if self._predict_replicas is not None:
            self._predict_replicas.close()
            self._predict_replicas = None
        self._runner.run(self._close_peers())
        self._runner.close()

    async def _close_peers(self) -> None:
        for replicas in self._replicas.values():
            await replicas.close()
        self._replicas.clear()
        for peer in self._peers.values():
            await peer.close()
        self._peers.clear()
        self._stubs.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Plumbing --------------------------------------------------------------------------------

    async def _stub(self, service: str, stub_class: Callable[[grpc.aio.Channel], _Stub]) -> _Stub:
        key = (service, stub_class)
        stub = self._stubs.get(key)  # type: ignore[arg-type]
        if stub is not None:
            return stub
        peer = self._peers.get(service)
        if peer is None:
            async with self._opening:  # first calls from several threads open one channel
                peer = self._peers.get(service)
                if peer is None:
                    peer = self.connection.peer(service)
                    await peer.open()
                    if not peer.target:  # several replicas: calls take them in turn
                        self._replicas[service] = self._async_replicas(service, peer)
                    self._peers[service] = peer
        stub = peer.stub(stub_class)
        if peer.target:  # a discovered peer's stub follows the endpoint set: fetch it each time
            self._stubs[key] = stub  # type: ignore[index]
        return stub

    def _async_replicas(self, service: str, balanced: PeerChannel) -> AsyncReplicas:
        return AsyncReplicas(balanced, transport=balanced.transport, token=self.connection.token,
                             max_message_bytes=MAX_MESSAGE_BYTES,
                             options=healthy_round_robin_options(service))

    async def _stubs_in_turn(self, service: str, stub_class: Callable[[grpc.aio.Channel], _Stub]
                             ) -> list[_Stub]:
        """The stubs one call tries in turn: one per replica (`maas_sdk.replicas`), else the
        service's one stub."""
        stub = await self._stub(service, stub_class)
        replicas = self._replicas.get(service)
        return (replicas.stubs(stub_class) if replicas is not None else []) or [stub]

    def _error(self, service: str, rpc_error: grpc.RpcError) -> MaasError:
        error = from_rpc_error(rpc_error)
        if isinstance(error, Unavailable) and not _carries_status(rpc_error):
            peer = self._peers.get(service)
            where = peer.where if peer else self._where(service)
            transport = (peer.transport if peer else self.connection.tls.transport()
                         if self.connection.tls else PeerTransport()).name
            error.message = (f"{service} at {where} is unreachable over {transport}: "
                             f"{error.message}")
            error.args = (error.message,)
        return error

    def _failover(self, service: str, method: str, *, deadline: float | None = None,
                  on_retry: Callable[[MaasError, int], None] | None = None) -> Failover:
        """One call of `method` over the replicas of `service`, as the retry policy says."""
        return Failover(method, self.retry,
                        to_error=lambda rpc_error: self._error(service, rpc_error),
                        deadline=deadline, on_retry=on_retry)

    async def _unary(self, service: str, stub_class, method: str, request, timeout=None):
        return await self._failover(service, method).call(
            lambda: self._stubs_in_turn(service, stub_class),
            lambda stub: getattr(stub, method)(request, timeout=timeout or self.timeout))

    def _call(self, service: str, stub_class, method: str, request, timeout=None):
        return self._runner.run(self._unary(service, stub_class, method, request, timeout))

    def _registry(self, method: str, request):
        return self._call("registry", registry_service_pb2_grpc.RegistryServiceStub, method,
                          request)

    def _inference(self, method: str, request, timeout=None):
        return self._call("inference", inference_service_pb2_grpc.InferenceServiceStub, method,
                          request, timeout)

    def _trainer(self, method: str, request):
        return self._call("trainer", trainer_service_pb2_grpc.TrainerServiceStub, method, request)

    def _compressor(self, method: str, request):
        return self._call("compressor", compressor_service_pb2_grpc.CompressorServiceStub,
                          method, request)

    def _pages(self, call: Callable[[Any], Any], request, items: str) -> list:
        results: list = []
        while True:
            page = call(request)
            results.extend(getattr(page, items))
            if not page.next_page_token:
                return results
            request.page_token = page.next_page_token

    # Models and versions -----------------------------------------------------------------------

    def list_models(self, filter: str = "") -> list[model_pb2.Model]:
        """Every model (AIP-160 `filter`, e.g. `labels.team = "vision"`)."""
        return self._pages(lambda r: self._registry("ListModels", r),
                           rs.ListModelsRequest(page_size=PAGE_SIZE, filter=filter), "models")

    def get_model(self, model: str) -> model_pb2.Model:
        return self._registry("GetModel", rs.GetModelRequest(name=model_name(model)))

    def create_model(self, model_id: str, *, description: str = "",
                     labels: Mapping[str, str] | None = None) -> model_pb2.Model:
        return self._registry("CreateModel", rs.CreateModelRequest(
            model_id=model_id, model=model_pb2.Model(description=description,
                                                      labels=dict(labels or {}))))

    def delete_model(self, model: str) -> None:
        self._registry("DeleteModel", rs.DeleteModelRequest(name=model_name(model)))

    def list_versions(self, model: str, filter: str = "") -> list[model_pb2.ModelVersion]:
        return self._pages(lambda r: self._registry("ListModelVersions", r),
                           rs.ListModelVersionsRequest(parent=model_name(model),
                                                       page_size=PAGE_SIZE, filter=filter),
                           "model_versions")

    def get_version(self, reference: str) -> model_pb2.ModelVersion:
        """A version by name or alias: `digits@production`, `models/digits/versions/3`."""
        return self._registry("GetModelVersion",
                              rs.GetModelVersionRequest(name=version_name(reference)))

    def delete_version(self, reference: str) -> None:
        self._registry("DeleteModelVersion",
                       rs.DeleteModelVersionRequest(name=version_name(reference)))

    def set_alias(self, model: str, alias: str, version: str) -> model_pb2.ModelAlias:
        """Point `models/{model}@{alias}` at `version` (a number or a version name)."""
        target = (f"{model_name(model)}/versions/{version}" if str(version).isdigit()
                  else version_name(version))
        return self._registry("SetModelAlias", rs.SetModelAliasRequest(
            name=f"{model_name(model)}/aliases/{alias}", version=target))

    def delete_alias(self, model: str, alias: str) -> None:
        self._registry("DeleteModelAlias", rs.DeleteModelAliasRequest(
            name=f"{model_name(model)}/aliases/{alias}"))

    def watch_events(self, *, after_event_id: int = 0, resource_prefix: str = "",
                     types: Sequence[str] = (), timeout: float | None = None
                     ) -> Iterator[audit_pb2.RegistryEvent]:
        """The registry's events after `after_event_id` (0: every one retained), then each
        change as it is committed, oldest first, until `timeout` seconds passed (forever when
        None; stop iterating to end it sooner). `resource_prefix` ("models/digits") and
        `types` ("EVENT_TYPE_ALIAS_MOVED", ...) narrow them. A stream cut short (the replica
        serving it died) resumes after the last event it gave, on the next replica, as the
        retry policy says: every event comes once."""
        request = rs.WatchEventsRequest(
            after_event_id=after_event_id, resource_prefix=resource_prefix,
            types=[audit_pb2.EventType.Value(name) for name in types])
        deadline = None if timeout is None else time.monotonic() + timeout

        def events(stub: registry_service_pb2_grpc.RegistryServiceStub
                   ) -> Generator[audit_pb2.RegistryEvent, None, None]:
            """One replica's stream, after the last event any replica gave."""
            if deadline is not None and time.monotonic() >= deadline:
                return  # the caller's timeout
            call = self._runner.run(_open_stream(stub.WatchEvents, request,
                                                 _seconds_left(deadline)))
            try:
                while (event := self._runner.run(call.read())) is not grpc.aio.EOF:
                    request.after_event_id = event.event_id
                    yield event
            except grpc.aio.AioRpcError as rpc_error:
                if rpc_error.code() is grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                    return  # the caller's timeout
                raise
            finally:
                self._runner.loop.call_soon_threadsafe(call.cancel)

        def resuming(error: MaasError, attempt: int) -> None:
            _log.warning("event watch cut short after event %d (%s); resuming after it on the "
                         "next replica", request.after_event_id, error.message)

        yield from self._failover("registry", "WatchEvents", on_retry=resuming).stream_blocking(
            lambda: self._runner.run(self._stubs_in_turn(
                "registry", registry_service_pb2_grpc.RegistryServiceStub)), events)

    def lineage(self, reference: str, *, max_depth: int = 0) -> LineageTree:
        """Where a version came from and what was derived from it, as a tree."""
        graph: audit_pb2.LineageGraph = self._registry("GetLineage", rs.GetLineageRequest(
            name=version_name(reference) if not reference.startswith("datasets/") else reference,
            max_depth=max_depth))
        origins = LineageTree.from_graph(graph)
        if len(origins) == 1:
            return origins[0]
        return LineageTree("", children=origins)

    # Uploads ---------------------------------------------------------------------------------

    def upload_module(self, model: str, module, example_input, *, format: str = "torchscript",
                      alias: str = "", description: str = "",
                      metrics: Mapping[str, float] | None = None,
                      labels: Mapping[str, str] | None = None,
                      parents: Sequence[str] = ()) -> model_pb2.ModelVersion:
        """Register a torch `nn.Module` as a new version of `model` (created when missing).

        The module is written as TorchScript (traced) or ONNX (`format="onnx"`), and its
        signature inferred by running it on `example_input` (batch first)."""
        with tempfile.TemporaryDirectory(prefix="maas-sdk-") as directory:
            path, format_name, signature = write_module(module, example_input, Path(directory),
                                                        format)
            return self._upload_version(model, path, format_name, signature, alias=alias,
                                        description=description, metrics=metrics, labels=labels,
                                        parents=parents, operation="upload")

    def upload_model(self, model: str, path: str | os.PathLike[str], *, format: str | None = None,
                     signature: Mapping[str, Any] | model_pb2.Signature | None = None,
                     example_input=None, alias: str = "", description: str = "",
                     metrics: Mapping[str, float] | None = None,
                     labels: Mapping[str, str] | None = None,
                     parents: Sequence[str] = ()) -> model_pb2.ModelVersion:
        """Register a model file: ONNX (signature read from the graph), TorchScript
        (signature from `signature` or by running `example_input`) or a maas-package
        (signature in its manifest). `format` defaults to what the suffix says."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, "no such model file", str(path))
        format_name = model_format(path, format)
        described: dict[str, Any] = {}
        if isinstance(signature, model_pb2.Signature):
            described = json_format.MessageToDict(signature, preserving_proto_field_name=True)
        elif signature is not None:
            described = dict(signature)
        elif format_name == "MODEL_FORMAT_ONNX":
            described = signature_from_onnx(path)
        elif format_name == "MODEL_FORMAT_TORCHSCRIPT":
            if example_input is None:
                raise InvalidArgument.for_field(
                    "signature", "a TorchScript file needs signature= or example_input=")
            described = signature_from_torchscript(path, example_input)
        return self._upload_version(model, path, format_name, described, alias=alias,
                                    description=description, metrics=metrics, labels=labels,
                                    parents=parents, operation="upload")

    def _upload_version(self, model: str, path: Path, format_name: str,
                        signature: Mapping[str, Any], *, alias: str, description: str,
                        metrics, labels, parents: Sequence[str],
                        operation: str) -> model_pb2.ModelVersion:
        model_id = model_name(model).removeprefix("models/")
        version = json_format.ParseDict({
            "format": format_name, "description": description,
            "metrics": dict(metrics or {}), "labels": dict(labels or {}),
            "lineage": {"parents": [version_name(p) for p in parents],
                        "operation": {"kind": operation}},
            **({"signature": dict(signature)} if signature else {}),
        }, model_pb2.ModelVersion())
        self._ensure(lambda: self.create_model(model_id))
        header = rs.UploadModelVersionHeader(
            parent=f"models/{model_id}", model_version=version,
            expected_sha256=file_sha256(path), size_bytes=path.stat().st_size)
        created = self._runner.run(self._stream_upload(
            "UploadModelVersion", rs.UploadModelVersionRequest, header, path))
        if alias:
            self.set_alias(model_id, alias, created.name)
            created = self.get_version(created.name)
        return created

    def upload_dataset(self, dataset: str, data: str | os.PathLike[str] | np.ndarray, *,
                       labels: np.ndarray | None = None, feature_column: str = "features",
                       label_column: str = "label", description: str = "",
                       version_labels: Mapping[str, str] | None = None) -> dataset_pb2.DatasetVersion:
        """Register a dataset version: an `.npz` file (arrays `feature_column` and
        `label_column`), a `.csv` file (every column but `label_column` is a feature), or a
        features array with its `labels` array."""
        dataset_id = dataset_name(dataset).removeprefix("datasets/")
        with tempfile.TemporaryDirectory(prefix="maas-sdk-") as directory:
            if isinstance(data, np.ndarray):
                if labels is None:
                    raise InvalidArgument.for_field("labels", "a features array needs its labels")
                path = Path(directory) / "data.npz"
                np.savez(path, **{feature_column: data, label_column: np.asarray(labels)})
            else:
                path = Path(data)
                if not path.is_file():
                    raise FileNotFoundError(errno.ENOENT, "no such dataset file", str(path))
            suffix = path.suffix.lower()
            if suffix == ".npz":
                format_name, features = "DATASET_FORMAT_NPZ", [feature_column]
            elif suffix == ".csv":
                with path.open(newline="") as handle:
                    header = next(csv.reader(handle), [])
                format_name = "DATASET_FORMAT_CSV"
                features = [column for column in header if column != label_column]
            else:
                raise InvalidArgument.for_field("data", f"{path.name}: expected .npz or .csv")
            version = dataset_pb2.DatasetVersion(
                format=dataset_pb2.DatasetFormat.Value(format_name), description=description,
                labels=dict(version_labels or {}),
                schema=dataset_pb2.DatasetSchema(feature_columns=features,
                                                 label_column=label_column))
            self._ensure(lambda: self._registry("CreateDataset",
                                                rs.CreateDatasetRequest(dataset_id=dataset_id)))
            header = rs.UploadDatasetVersionHeader(
                parent=f"datasets/{dataset_id}", dataset_version=version,
                expected_sha256=file_sha256(path), size_bytes=path.stat().st_size)
            return self._runner.run(self._stream_upload(
                "UploadDatasetVersion", rs.UploadDatasetVersionRequest, header, path))

    def _ensure(self, create: Callable[[], Any]) -> None:
        try:
            create()
        except AlreadyExists:
            pass

    async def _stream_upload(self, method: str, request_type, header, path: Path):
        async def requests() -> AsyncIterator[Any]:
            yield request_type(header=header)
            with path.open("rb") as handle:
                while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                    yield request_type(chunk=chunk)

        stub = await self._stub("registry", registry_service_pb2_grpc.RegistryServiceStub)
        try:
            return await getattr(stub, method)(requests(), timeout=max(self.timeout, 600))
        except grpc.aio.AioRpcError as rpc_error:
            raise self._error("registry", rpc_error) from None

    # Datasets ------------------------------------------------------------------------------

    def list_datasets(self, filter: str = "") -> list[dataset_pb2.Dataset]:
        return self._pages(lambda r: self._registry("ListDatasets", r),
                           rs.ListDatasetsRequest(page_size=PAGE_SIZE, filter=filter), "datasets")

    def get_dataset(self, dataset: str) -> dataset_pb2.Dataset:
        return self._registry("GetDataset", rs.GetDatasetRequest(name=dataset_name(dataset)))

    def delete_dataset(self, dataset: str) -> None:
        self._registry("DeleteDataset", rs.DeleteDatasetRequest(name=dataset_name(dataset)))

    def list_dataset_versions(self, dataset: str) -> list[dataset_pb2.DatasetVersion]:
        return self._pages(lambda r: self._registry("ListDatasetVersions", r),
                           rs.ListDatasetVersionsRequest(parent=dataset_name(dataset),
                                                         page_size=PAGE_SIZE),
                           "dataset_versions")

    def get_dataset_version(self, reference: str) -> dataset_pb2.DatasetVersion:
        return self._registry("GetDatasetVersion", rs.GetDatasetVersionRequest(
            name=dataset_version_name(reference)))

    # Downloads -------------------------------------------------------------------------------

    def download(self, reference: str, destination: str | os.PathLike[str]) -> Path:
        """A model version (`digits@production`) or dataset version
        (`datasets/d/versions/1`) written to `destination` (a file, or a directory to put it
        in), verified against the sha256 the registry records. A download cut short by a
        replica that died goes on at the byte it reached on the next replica, as the retry
        policy says (attempts that moved it forward are not counted against the policy's
        attempts), all within one deadline (`timeout`, at least 600 s); nothing is written at
        `destination` unless the whole file arrived and checked out."""
        path = Path(destination)
        if reference.startswith("datasets/"):
            version: Any = self.get_dataset_version(reference)
            suffix = ".npz" if version.format == dataset_pb2.DATASET_FORMAT_NPZ else ".csv"
        else:
            version = self.get_version(reference)
            suffix = {model_pb2.MODEL_FORMAT_ONNX: ".onnx",
                      model_pb2.MODEL_FORMAT_TORCHSCRIPT: ".pt"}.get(version.format,
                                                                     ".safetensors")
        if path.is_dir():
            path = path / (version.name.replace("/", "_") + suffix)
        elif not path.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(path.parent))
        self._runner.run(self._download(version, path))
        return path

    async def _download(self, version, destination: Path) -> None:
        await self._stub("registry", registry_service_pb2_grpc.RegistryServiceStub)
        registry = RegistryClient(self._peers["registry"], timeout_seconds=max(self.timeout, 600))
        if isinstance(version, dataset_pb2.DatasetVersion):
            await registry.download_dataset_version(
                version.name, destination, sha256=version.artifact.sha256,
                size_bytes=version.artifact.size_bytes,
                retry=self._download_retry("DownloadDatasetVersion"))
        else:
            await registry.download_model_version(
                to_dict(version), destination,
                retry=self._download_retry("DownloadModelVersion"))

    def _download_retry(self, method: str) -> DownloadRetry:
        """The registry replicas in turn and the retry policy, for one download (resumed at
        the byte it reached by `RegistryClient`, which keeps the offset and the digest)."""
        return DownloadRetry(
            lambda: self._stubs_in_turn("registry", registry_service_pb2_grpc.RegistryServiceStub),
            functools.partial(self.retry.retry_after, method))

    # Training and compression -----------------------------------------------------------------

    def train(self, *, dataset: str, arch: str, model: str, epochs: int = 3,
              hyperparameters: Mapping[str, Any] | None = None, batch_size: int = 32,
              learning_rate: float = 0.003, optimizer: str = "adam", alias: str = "",
              min_test_accuracy: float = 0.0, seed: int = 0, job_id: str = "",
              spec: tj.TrainingSpec | None = None) -> tj.TrainingJob:
        """Start a training job (`dataset` "builtin:digits" or "datasets/d/versions/1", `arch`
        a zoo entry: "mlp", "cnn", "transformer"); the result is registered as a version of
        `model`. Returns at once; `wait(job)` follows it."""
        spec = spec or job_specs.training_spec(
            dataset=dataset, arch=arch, model=model, epochs=epochs,
            hyperparameters=hyperparameters, batch_size=batch_size, learning_rate=learning_rate,
            optimizer=optimizer, alias=alias, min_test_accuracy=min_test_accuracy, seed=seed)
        return self._trainer("CreateTrainingJob", ts.CreateTrainingJobRequest(
            training_job_id=job_id, training_job=tj.TrainingJob(spec=spec)))

    def compress(self, source: str, steps: Sequence[str | cj.CompressionStep] = (), *,
                 dataset: str = "builtin:digits", output: str = "", alias: str = "",
                 max_accuracy_drop: float | None = None, seed: int = 0, job_id: str = "",
                 spec: cj.CompressionSpec | None = None) -> cj.CompressionJob:
        """Start a compression job on `source` (`digits@production`): `steps` in the short
        form (`prune:amount=0.5`, `quantize:dtype=int8`, `quantize:dtype=int8,format=torch`,
        `convert`) or as messages; the result is registered as a version of `output` (a
        sentence encoder is measured on `dataset="builtin:pydoc"`). Returns at once;
        `wait(job)` follows it."""
        if spec is None:
            if not output:
                raise InvalidArgument.for_field("output.model_id", "name the output model")
            spec = job_specs.compression_spec(
                version_name(source), list(steps), dataset=dataset, output_model=output,
                alias=alias, max_accuracy_drop=max_accuracy_drop, seed=seed)
        return self._compressor("CreateCompressionJob", cs.CreateCompressionJobRequest(
            compression_job_id=job_id, compression_job=cj.CompressionJob(spec=spec)))

    def get_job(self, job: str | Job) -> Job:
        name = job if isinstance(job, str) else job.name
        if name.startswith("compressionJobs/"):
            return self._compressor("GetCompressionJob", cs.GetCompressionJobRequest(name=name))
        if name.startswith("trainingJobs/"):
            return self._trainer("GetTrainingJob", ts.GetTrainingJobRequest(name=name))
        raise InvalidArgument.for_field("name", f"{name!r} is neither trainingJobs/… nor "
                                        "compressionJobs/…")

    def list_jobs(self, kind: str = "all", filter: str = "") -> list[Job]:
        """Training and/or compression jobs (`kind` "training", "compression" or "all")."""
        found: list[Job] = []
        if kind in ("all", "training"):
            found += self._pages(lambda r: self._trainer("ListTrainingJobs", r),
                                 ts.ListTrainingJobsRequest(page_size=PAGE_SIZE, filter=filter),
                                 "training_jobs")
        if kind in ("all", "compression"):
            found += self._pages(lambda r: self._compressor("ListCompressionJobs", r),
                                 cs.ListCompressionJobsRequest(page_size=PAGE_SIZE,
                                                               filter=filter),
                                 "compression_jobs")
        return found

    def cancel_job(self, job: str | Job) -> Job:
        name = job if isinstance(job, str) else job.name
        if name.startswith("compressionJobs/"):
            return self._compressor("CancelCompressionJob",
                                    cs.CancelCompressionJobRequest(name=name))
        return self._trainer("CancelTrainingJob", ts.CancelTrainingJobRequest(name=name))

    def wait(self, job: str | Job, progress: ProgressCallback | None = None, *,
             timeout: float | None = None, check: bool = True) -> Job:
        """Follow the job's Watch stream until it ends, calling `progress` with each event
        (on the client's event-loop thread); the final job. A job that did not succeed
        raises `JobFailed` unless `check` is False. A stream cut short (the replica serving
        it restarted or died) is resumed after its last event, on the next replica when it
        failed UNAVAILABLE, as the retry policy says."""
        name = job if isinstance(job, str) else job.name
        current = self.get_job(name)
        total = current.spec.epochs if isinstance(current, tj.TrainingJob) else 0
        deadline = None if timeout is None else time.monotonic() + timeout
        after = 0
        while current.state not in FINAL_STATES:
            after = self._runner.run(self._watch(name, progress, total, deadline, after))
            current = self.get_job(name)
        if check and current.state != job_pb2.JOB_STATE_SUCCEEDED:
            raise JobFailed(current, f"{name} ended {state_name(current.state)}: "
                            f"{current.error.code} {current.error.message}".rstrip())
        return current

    async def _watch(self, name: str, progress: ProgressCallback | None, total: int,
                     deadline: float | None, after: int) -> int:
        """Pass the job's events after sequence `after` to `progress` until its Watch stream
        ends, resumed after the last one passed on the next replica when it is cut short, as
        the retry policy says; the last sequence passed."""
        service, stub_class, method = _watch_rpc(name)
        request_type = (cs.WatchCompressionJobRequest if name.startswith("compressionJobs/")
                        else ts.WatchTrainingJobRequest)

        # Its events are not reported to the failover (`deliver()`): as the job's Watch always
        # was, it is given up after max_attempts failures in a row, however far each one got.
        async def watch(stub: Any) -> None:
            nonlocal after
            state = ""
            async for event in getattr(stub, method)(
                    request_type(name=name, after_sequence=after),
                    timeout=_seconds_left(deadline)):
                after = event.sequence
                update = progress_of(name, event, state, total)
                state = update.state
                if progress is not None:
                    progress(update)

        await self._failover(service, method).call(
            lambda: self._stubs_in_turn(service, stub_class), watch)
        return after

    # Deployments -----------------------------------------------------------------------------

    def deploy(self, deployment: str, model: str, *, track_alias: bool | None = None,
               max_batch_size: int = 0, instance_count: int = 0,
               replace: bool = False) -> deployment_pb2.Deployment:
        """Serve `model` (`digits@production` or a version) as `deployment` on Triton; ready
        when this returns. An alias is followed when it moves unless `track_alias=False`.
        `replace` deletes an existing deployment of that name first."""
        reference = version_name(model)
        deployment_id = deployment_name(deployment).removeprefix("deployments/")
        if replace:
            try:
                self.delete_deployment(deployment_id)
            except NotFound:
                pass
        self._input_names.pop(deployment_name(deployment_id), None)
        return self._inference("CreateDeployment", inf.CreateDeploymentRequest(
            deployment_id=deployment_id, deployment=deployment_pb2.Deployment(
                model=reference, track_alias="@" in reference if track_alias is None else track_alias,
                serving=deployment_pb2.ServingConfig(max_batch_size=max_batch_size,
                                                     instance_count=instance_count))),
            timeout=max(self.timeout, 600))

    def get_deployment(self, deployment: str) -> deployment_pb2.Deployment:
        return self._inference("GetDeployment",
                               inf.GetDeploymentRequest(name=deployment_name(deployment)))

    def list_deployments(self) -> list[deployment_pb2.Deployment]:
        return self._pages(lambda r: self._inference("ListDeployments", r),
                           inf.ListDeploymentsRequest(page_size=PAGE_SIZE), "deployments")

    def delete_deployment(self, deployment: str) -> None:
        self._input_names.pop(deployment_name(deployment), None)
        self._inference("DeleteDeployment",
                        inf.DeleteDeploymentRequest(name=deployment_name(deployment)))

    def _update(self, deployment: str, paths: Iterable[str],
                **fields: Any) -> deployment_pb2.Deployment:
        name = deployment_name(deployment)
        self._input_names.pop(name, None)
        return self._inference("UpdateDeployment", inf.UpdateDeploymentRequest(
            deployment=deployment_pb2.Deployment(name=name, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=list(paths))),
            timeout=max(self.timeout, 600))

    def rollout(self, deployment: str, model: str, *,
                track_alias: bool | None = None) -> deployment_pb2.Deployment:
        """Move the deployment to another version (or alias), all traffic to it: the new one
        is loaded before requests go to it, the old one unloaded after they drained."""
        reference = version_name(model)
        return self._update(deployment, ("model", "track_alias", "traffic"), model=reference,
                            track_alias="@" in reference if track_alias is None else track_alias)

    def split_traffic(self, deployment: str,
                      percents: Mapping[str, int]) -> deployment_pb2.Deployment:
        """A canary: version → percent of requests (adding up to 100), sticky per request id."""
        return self._update(deployment, ("traffic",), traffic=[
            deployment_pb2.TrafficTarget(model_version=version_name(version), percent=percent)
            for version, percent in percents.items()])

    def shadow(self, deployment: str, model: str | None,
               percent: int = 100) -> deployment_pb2.Deployment:
        """Copy `percent` of the requests to `model` as well (its answers are compared, never
        returned); `None` stops shadowing."""
        config = (deployment_pb2.ShadowConfig(model_version=version_name(model), percent=percent)
                  if model else deployment_pb2.ShadowConfig())
        return self._update(deployment, ("shadow",), shadow=config)

    # Generation ------------------------------------------------------------------------------

    def generate(self, deployment: str, prompt: str | None = None, *,
                 messages: Sequence[Mapping[str, str]] | None = None,
                 max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int = 0, stop: str | Sequence[str] = (),
                 seed: int | None = None, repetition_penalty: float | None = None,
                 timeout: float | None = None) -> Generation:
        """Stream text from a generative deployment: a `prompt` as it is, or chat `messages`
        ([{"role": "user", "content": "..."}], rendered with the model's chat template).
        Iterate the returned `Generation` for the text as it comes; then its
        `finish_reason` and `usage` are set. Unset sampling parameters take the model's
        defaults (temperature 1, top_p 1, no top_k; max_tokens: the service's default).
        `timeout` bounds the whole generation. A gateway lost before the first text arrived
        is replaced by the next replica, as the retry policy says; one lost after raises
        `Unavailable` (`maas_sdk.generation`)."""
        request = generate_request(
            deployment_name(deployment), prompt, messages, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed,
            repetition_penalty=repetition_penalty)

        deadline = None if timeout is None else time.monotonic() + timeout
        failover = self._failover("inference", "Generate", deadline=deadline,
                                  on_retry=log_generation_restart)

        def open_call(stub: inference_service_pb2_grpc.InferenceServiceStub) -> Any:
            return stub.Generate(request, timeout=_seconds_left(deadline))

        return Generation(lambda messages_out: self._runner.submit(pump_generation(
            failover, lambda: self._stubs_in_turn(
                "inference", inference_service_pb2_grpc.InferenceServiceStub),
            open_call, messages_out)))

    # Predictions -----------------------------------------------------------------------------

    def input_names(self, deployment: str) -> list[str]:
        """The input names of the version the deployment serves (looked up once)."""
        name = deployment_name(deployment)
        names = self._input_names.get(name)
        if names is None:
            deployment = self.get_deployment(name)
            answering = [served for served in deployment.served_versions if not served.shadow]
            if answering:  # the deployment reports the signature it serves
                names = [spec.name for spec in answering[0].inputs]
            else:
                reference = (deployment.serving_versions[0] if deployment.serving_versions
                             else deployment.model)
                names = [spec.name for spec in self.get_version(reference).signature.inputs]
            self._input_names[name] = names
        return names

    def predict(self, deployment: str, inputs: np.ndarray | Mapping[str, Any], *,
                output_names: Sequence[str] = (), request_id: str = "",
                timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run `inputs` (name → array, or one array for a single-input model; batch first)
        through the deployment; output name → array (read-only views of the reply)."""
        return self.predict_detailed(deployment, inputs, output_names=output_names,
                                     request_id=request_id, timeout=timeout).outputs

    def predict_detailed(self, deployment: str, inputs: np.ndarray | Mapping[str, Any], *,
                         output_names: Sequence[str] = (), request_id: str = "",
                         timeout: float | None = None) -> Prediction:
        """`predict`, also saying which version answered (a canary splits traffic)."""
        name = deployment_name(deployment)
        if isinstance(inputs, Mapping):
            arrays = {key: np.asarray(value) for key, value in inputs.items()}
        else:
            arrays = named_inputs(inputs, self._input_names.get(name) or self.input_names(name),
                                  name)
        request = inf.PredictRequest(deployment=name, request_id=request_id,
                                     inputs=[to_tensor(key, value) for key, value in arrays.items()],
                                     output_names=output_names)
        reply = self._predict_reply(request, timeout)
        return Prediction({tensor.name: from_tensor(tensor) for tensor in reply.outputs},
                          reply.model_version)

    def import_hf(self, directory: str | os.PathLike[str], model: str, *, alias: str = "",
                  description: str = "", labels: Mapping[str, str] | None = None
                  ) -> model_pb2.ModelVersion:
        """Register a Hugging Face model directory (config, model.safetensors or model.onnx,
        tokenizer) as an HF_TRANSFORMER version: zipped with its tokenizer, served as text in
        (BYTES `text`) and a normalized FP32 `embedding` out. Nothing is unpickled or fetched."""
        from maas_sdk.text import hf_version_fields

        with tempfile.TemporaryDirectory(prefix="maas-hf-") as work_dir:
            archive, signature, facts = hf_version_fields(directory, work_dir)
            return self._upload_version(
                model, archive, "MODEL_FORMAT_HF_TRANSFORMER", signature, alias=alias,
                description=description, metrics=None, labels={**facts, **dict(labels or {})},
                parents=(), operation="import")

    def import_gguf(self, path: str | os.PathLike[str], model: str, *, bf16: bool = True,
                    alias: str = "", description: str = "",
                    labels: Mapping[str, str] | None = None) -> LlmImport:
        """Register a GGUF file as a GGUF version (its header facts recorded by the registry)
        and, with `bf16`, its bf16 safetensors conversion as a CAUSAL_LM version whose lineage
        points at it (`alias`, when given, goes to the last version registered). Text in
        (BYTES `text_input`), generated text out. Nothing in the file is executed."""
        from maas_formats.gguf import read_gguf_header

        from maas_sdk.llm import convert_gguf, generation_signature

        source = Path(path)
        read_gguf_header(source, field_path="path")  # refused here before any byte is sent
        gguf = self._upload_version(
            model, source, "MODEL_FORMAT_GGUF", generation_signature(),
            alias="" if bf16 else alias, description=description, metrics=None,
            labels=dict(labels or {}), parents=(), operation="import")
        if not bf16:
            return LlmImport(gguf=gguf, causal_lm=None)
        with tempfile.TemporaryDirectory(prefix="maas-gguf-") as work_dir:
            converted = convert_gguf(source, work_dir)
            causal_lm = self._import_causal_lm(
                converted.path, model, work_dir, alias=alias,
                description=description or f"bf16 safetensors conversion of {gguf.name}",
                labels=labels, parents=(gguf.name,), operation="convert")
        return LlmImport(gguf=gguf, causal_lm=causal_lm)

    def import_causal_lm(self, directory: str | os.PathLike[str], model: str, *,
                         alias: str = "", description: str = "",
                         labels: Mapping[str, str] | None = None) -> model_pb2.ModelVersion:
        """Register a Hugging Face causal-LM directory (config naming a *ForCausalLM,
        model.safetensors, tokenizer.json and its chat template) as a CAUSAL_LM version:
        zipped, text in and generated text out. Pickled weights are refused."""
        with tempfile.TemporaryDirectory(prefix="maas-causal-lm-") as work_dir:
            return self._import_causal_lm(directory, model, work_dir, alias=alias,
                                          description=description, labels=labels, parents=(),
                                          operation="import")

    def _import_causal_lm(self, directory: str | os.PathLike[str], model: str,
                          work_dir: str, *, alias: str, description: str,
                          labels: Mapping[str, str] | None, parents: Sequence[str],
                          operation: str) -> model_pb2.ModelVersion:
        from maas_sdk.llm import causal_lm_fields, generation_signature

        archive, facts = causal_lm_fields(directory, work_dir)
        return self._upload_version(
            model, archive, "MODEL_FORMAT_CAUSAL_LM", generation_signature(), alias=alias,
            description=description, metrics=None, labels={**facts, **dict(labels or {})},
            parents=parents, operation=operation)

    def embed(self, deployment: str, texts: Sequence[str | bytes], *,
              timeout: float | None = None, with_truncation: bool = False
              ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Embeddings [n, dim] (FP32, L2-normalized) of `texts` from a text deployment; with
        `with_truncation`, also which texts exceeded the model's limit and were cut ([n])."""
        from maas_sdk.text import EMBEDDING_OUTPUT, TRUNCATED_OUTPUT, text_tensor

        request = inf.PredictRequest(deployment=deployment_name(deployment),
                                     inputs=[text_tensor(texts)])
        reply = self._predict_reply(request, timeout)
        outputs = {tensor.name: from_tensor(tensor) for tensor in reply.outputs}
        vectors = outputs[EMBEDDING_OUTPUT]
        if with_truncation:
            return vectors, outputs[TRUNCATED_OUTPUT].reshape(-1)
        return vectors

    def _predict_reply(self, request: inf.PredictRequest,
                       timeout: float | None) -> inf.PredictResponse:
        """Predict on the blocking channels (the aio ones for a discovered service), sent
        again to the next replica on UNAVAILABLE as the retry policy says."""
        stubs = self._predict_stubs()
        if not stubs:  # the inference service found through discovery: the aio channels
            return self._inference("Predict", request, timeout)
        return self._failover("inference", "Predict").call_blocking(
            lambda: stubs, lambda stub: stub.Predict(
                request, timeout=timeout or self.timeout, metadata=self._metadata))

    def _predict_stubs(self) -> list[inference_service_pb2_grpc.InferenceServiceStub]:
        """Predict's own blocking channels to the inference targets named (one per replica,
        taken in turn), in the order this call tries them; [] for a discovered service.
        A call from the caller's thread, without the event-loop hop and the interceptor of
        the aio path."""
        if self._predict_stub is not None:
            return [self._predict_stub]
        if self._predict_replicas is not None:
            return self._predict_replicas.stubs(inference_service_pb2_grpc.InferenceServiceStub)
        target = self.connection.targets.get("inference")
        if not target:
            return []
        with self._predict_lock:
            if self._predict_stub is None and self._predict_replicas is None:
                replicas = self.connection.replicas("inference")
                if replicas:
                    self._predict_replicas = BlockingReplicas(
                        replicas, transport=self._transport(),
                        max_message_bytes=MAX_MESSAGE_BYTES,
                        options=healthy_round_robin_options("inference"))
                else:
                    self._predict_stub = self._blocking_inference_stub(target)
        return self._predict_stubs()

    def _transport(self) -> PeerTransport:
        return self.connection.tls.transport() if self.connection.tls else PeerTransport()

    def _blocking_inference_stub(self, target: str) -> inference_service_pb2_grpc.InferenceServiceStub:
        transport = self._transport()
        self._predict_channel = open_blocking_channel(
            target, credentials=transport.credentials, max_message_bytes=MAX_MESSAGE_BYTES,
            options=transport.options)
        return inference_service_pb2_grpc.InferenceServiceStub(self._predict_channel)

    # Usage -------------------------------------------------------------------------------------

    def usage(self, *, tenant: str = "", deployment: str = "", since: datetime | None = None,
              until: datetime | None = None, filter: str = "",
              limit: int = 0) -> list[usage_pb2.UsageRecord]:
        """Usage records of the inference service, newest first: one per generation and per
        Predict (the data plane's grouped per few seconds). A non-admin token sees its own
        tenant's only. `limit` > 0 stops after that many."""
        request = usage_pb2.ListUsageRecordsRequest(
            page_size=min(limit, PAGE_SIZE) if limit > 0 else PAGE_SIZE,
            filter=_usage_filter(tenant, deployment, filter))
        _set_time_range(request, since, until)
        records: list[usage_pb2.UsageRecord] = []
        while True:
            page = self._call("inference", usage_pb2_grpc.UsageServiceStub, "ListUsageRecords",
                              request)
            records.extend(page.usage_records)
            if not page.next_page_token or 0 < limit <= len(records):
                return records[:limit] if limit > 0 else records
            request.page_token = page.next_page_token

    def usage_summary(self, *, tenant: str = "", deployment: str = "",
                      since: datetime | None = None, until: datetime | None = None,
                      filter: str = "", group_by: str = "tenant") -> list[usage_pb2.UsageTotals]:
        """Requests, rows and tokens summed per `group_by`: "tenant", "deployment",
        "tenant,deployment" or "" (one total)."""
        groupings = {"tenant": usage_pb2.USAGE_GROUPING_TENANT,
                     "deployment": usage_pb2.USAGE_GROUPING_DEPLOYMENT,
                     "tenant,deployment": usage_pb2.USAGE_GROUPING_TENANT_AND_DEPLOYMENT,
                     "": usage_pb2.USAGE_GROUPING_NONE}
        if group_by not in groupings:
            raise InvalidArgument.for_field("group_by", f"must be one of {sorted(groupings)}",
                                            reason="GROUPING_UNKNOWN")
        request = usage_pb2.SummarizeUsageRequest(
            filter=_usage_filter(tenant, deployment, filter), group_by=groupings[group_by])
        _set_time_range(request, since, until)
        return list(self._call("inference", usage_pb2_grpc.UsageServiceStub, "SummarizeUsage",
                               request).totals)

    # Tokens (local suite) --------------------------------------------------------------------

    @property
    def tokens_file(self) -> Path:
        return self.connection.state_dir / TOKENS_FILE

    def create_token(self, principal: str, role: str = "viewer",
                     models: Sequence[str] = (), tenant: str = "") -> str:
        """Mint a token in the local suite's tokens file (the services pick it up within a
        second); returns the token, which is stored only as its sha256. `tenant`: whose
        limits and usage its calls count against (default: the principal's own)."""
        return add_token(self.tokens_file, principal, Role.parse(role), models, tenant)

    def list_tokens(self) -> list[TokenInfo]:
        return list_tokens(self.tokens_file)

    def revoke_token(self, principal_or_hash: str) -> int:
        """Revoke every token of a principal, or the one whose sha256 starts with the given
        hex prefix (8 characters at least); how many were revoked."""
        return revoke_tokens(self.tokens_file, principal_or_hash)

    # Status --------------------------------------------------------------------------------

    def status(self, timeout: float = 3.0) -> list[ServiceStatus]:
        """Health of every service and whether the inference service's Triton is ready."""
        return self._runner.run(self._status(timeout))

    async def _status(self, timeout: float) -> list[ServiceStatus]:
        return list(await asyncio.gather(
            *(self._health(service, timeout) for service in SERVICES),
            self._triton_ready(timeout)))

    def _where(self, service: str) -> str:
        return self.connection.targets.get(service) or f"{service} (via discovery)"

    async def _health(self, service: str, timeout: float) -> ServiceStatus:
        try:
            stub = await self._stub(service, health_pb2_grpc.HealthStub)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service),
                                     timeout=timeout)
        except grpc.aio.AioRpcError as rpc_error:
            return ServiceStatus(service, self._where(service), "UNREACHABLE",
                                 self._error(service, rpc_error).message)
        except MaasError as error:
            return ServiceStatus(service, self._where(service), "UNREACHABLE", error.message)
        return ServiceStatus(service, self._where(service),
                             health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def _triton_ready(self, timeout: float) -> ServiceStatus:
        try:
            stub = await self._stub("inference", kserve_grpc.GRPCInferenceServiceStub)
            reply = await stub.ServerReady(kserve_pb2.ServerReadyRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as rpc_error:
            return ServiceStatus("triton", self._where("inference"), "UNREACHABLE",
                                 self._error("inference", rpc_error).message)
        except MaasError as error:
            return ServiceStatus("triton", self._where("inference"), "UNREACHABLE", error.message)
        return ServiceStatus("triton", self._where("inference"),
                             "READY" if reply.ready else "NOT_READY")


def _usage_filter(tenant: str, deployment: str, extra: str) -> str:
    """The AIP-160 filter of `client.usage`: tenant, deployment id and the caller's own."""
    terms = [f"{name} = {json.dumps(value, ensure_ascii=False)}" for name, value in (
        ("tenant", tenant), ("deployment", deployment.removeprefix("deployments/")))
        if value]
    if extra.strip():
        terms.append(f"({extra})")
    return " AND ".join(terms)


def _set_time_range(request: Any, since: datetime | None, until: datetime | None) -> None:
    for field_name, value in (("start_time", since), ("end_time", until)):
        if value is not None:
            getattr(request, field_name).FromDatetime(
                value if value.tzinfo is not None else value.astimezone())


def _watch_rpc(job_name: str) -> tuple[str, Callable[[grpc.aio.Channel], Any], str]:
    """The service, stub and Watch method that follow the job `job_name`."""
    if job_name.startswith("compressionJobs/"):
        return ("compressor", compressor_service_pb2_grpc.CompressorServiceStub,
                "WatchCompressionJob")
    return "trainer", trainer_service_pb2_grpc.TrainerServiceStub, "WatchTrainingJob"


def _seconds_left(deadline: float | None) -> float | None:
    """The timeout of an attempt started now within `deadline` (`time.monotonic()`; None:
    none), at least a millisecond."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


async def _open_stream(method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
    """A server stream opened on the client's event loop (an aio call belongs to its loop)."""
    return method(request, timeout=timeout)


def _carries_status(rpc_error: grpc.RpcError) -> bool:
    """Whether a server answered with a `google.rpc.Status` (else the channel itself failed)."""
    trailing = rpc_error.trailing_metadata() if hasattr(rpc_error, "trailing_metadata") else ()
    return any(key == "grpc-status-details-bin" for key, _ in trailing or ())

