"""gRPC servicer of `maas.registry.v1.RegistryService`: convert, call the domain, convert back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar, overload

import grpc
from google.protobuf import empty_pb2
from maas.registry.v1 import (
    audit_pb2,
    dataset_pb2,
    model_pb2,
    registry_service_pb2,
    registry_service_pb2_grpc,
)
from maas_runtime.auth import current_principal
from maas_runtime.errors import InvalidArgument
from maas_runtime.messages import request_fields, to_message

from maas_registry.registry import Registry

_LINEAGE_DIRECTIONS = {0: "both", 1: "ancestors", 2: "descendants", 3: "both"}


R = TypeVar("R")


@overload
async def _upload_parts(
    requests: AsyncIterator[registry_service_pb2.UploadModelVersionRequest],
) -> tuple[registry_service_pb2.UploadModelVersionHeader, AsyncIterator[bytes]]: ...


@overload
async def _upload_parts(
    requests: AsyncIterator[registry_service_pb2.UploadDatasetVersionRequest],
) -> tuple[registry_service_pb2.UploadDatasetVersionHeader, AsyncIterator[bytes]]: ...


async def _upload_parts(requests: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[bytes]]:
    """Split an upload stream into its header and an async iterator over the chunks."""
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("content") != "header":
        raise InvalidArgument.for_field("header", "the first message must be the header",
                                        reason="CHUNK_BEFORE_HEADER")

    async def chunks() -> AsyncIterator[bytes]:
        async for message in requests:
            if message.WhichOneof("content") != "chunk":
                raise InvalidArgument.for_field("header", "the header may only be sent once",
                                                reason="HEADER_TWICE")
            yield message.chunk

    return first.header, chunks()


async def _stream_chunks(header: Any, chunks: Iterator[bytes],
                         response_type: Callable[..., R]) -> AsyncIterator[R]:
    yield response_type(header=header)
    iterator = iter(chunks)
    while chunk := await asyncio.to_thread(next, iterator, b""):
        yield response_type(chunk=chunk)


class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    """Thin adapter: every method validates via the domain and converts resources."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def CreateModel(self, request: registry_service_pb2.CreateModelRequest,
                          context: grpc.aio.ServicerContext) -> model_pb2.Model:
        model = await self._registry.create_model(
            request.model_id, request_fields(request.model, "model"), current_principal())
        return to_message(model, model_pb2.Model)

    async def GetModel(self, request: registry_service_pb2.GetModelRequest,
                       context: grpc.aio.ServicerContext) -> model_pb2.Model:
        return to_message(await self._registry.get_model(request.name, current_principal()),
                          model_pb2.Model)

    async def ListModels(self, request: registry_service_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> registry_service_pb2.ListModelsResponse:
        result = await self._registry.list_models(request.page_size, request.page_token,
                                                  request.filter, current_principal())
        return registry_service_pb2.ListModelsResponse(
            models=[to_message(m, model_pb2.Model) for m in result.items],
            next_page_token=result.next_page_token)

    async def UpdateModel(self, request: registry_service_pb2.UpdateModelRequest,
                          context: grpc.aio.ServicerContext) -> model_pb2.Model:
        model = await self._registry.update_model(
            request_fields(request.model, "model", keep_identifier=True),
            list(request.update_mask.paths), current_principal())
        return to_message(model, model_pb2.Model)

    async def DeleteModel(self, request: registry_service_pb2.DeleteModelRequest,
                          context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._registry.delete_model(request.name, request.force, request.etag,
                                          current_principal())
        return empty_pb2.Empty()

    async def UploadModelVersion(
            self, request_iterator: AsyncIterator[registry_service_pb2.UploadModelVersionRequest],
            context: grpc.aio.ServicerContext,
    ) -> model_pb2.ModelVersion:
        header, chunks = await _upload_parts(request_iterator)
        version = await self._registry.upload_model_version(
            header.parent, request_fields(header.model_version, "header.model_version"),
            header.expected_sha256, header.size_bytes, chunks, current_principal(),
            require_existing_model=header.require_existing_model)
        return to_message(version, model_pb2.ModelVersion)

    async def GetModelVersion(self, request: registry_service_pb2.GetModelVersionRequest,
                              context: grpc.aio.ServicerContext) -> model_pb2.ModelVersion:
        version = await self._registry.get_model_version(request.name, current_principal())
        return to_message(version, model_pb2.ModelVersion)

    async def ListModelVersions(
            self, request: registry_service_pb2.ListModelVersionsRequest, context: grpc.aio.ServicerContext,
    ) -> registry_service_pb2.ListModelVersionsResponse:
        result = await self._registry.list_model_versions(
            request.parent, request.page_size, request.page_token, request.filter,
            current_principal())
        return registry_service_pb2.ListModelVersionsResponse(
            model_versions=[to_message(v, model_pb2.ModelVersion) for v in result.items],
            next_page_token=result.next_page_token)

    async def UpdateModelVersion(self, request: registry_service_pb2.UpdateModelVersionRequest,
                                 context: grpc.aio.ServicerContext) -> model_pb2.ModelVersion:
        version = await self._registry.update_model_version(
            request_fields(request.model_version, "model_version", keep_identifier=True),
            list(request.update_mask.paths), current_principal())
        return to_message(version, model_pb2.ModelVersion)

    async def DeleteModelVersion(self, request: registry_service_pb2.DeleteModelVersionRequest,
                                 context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._registry.delete_model_version(request.name, request.force,
                                                  current_principal())
        return empty_pb2.Empty()

    async def DownloadModelVersion(
            self, request: registry_service_pb2.DownloadModelVersionRequest,
            context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[registry_service_pb2.DownloadModelVersionResponse]:
        version, chunks = await self._registry.download_model_version(
            request.name, request.offset, current_principal())
        async for message in _stream_chunks(to_message(version, model_pb2.ModelVersion), chunks,
                                            registry_service_pb2.DownloadModelVersionResponse):
            yield message

    async def SetModelAlias(self, request: registry_service_pb2.SetModelAliasRequest,
                            context: grpc.aio.ServicerContext) -> model_pb2.ModelAlias:
        expected = request.expected_version if request.HasField("expected_version") else None
        alias = await self._registry.set_alias(request.name, request.version, expected,
                                               current_principal())
        return to_message(alias, model_pb2.ModelAlias)

    async def DeleteModelAlias(self, request: registry_service_pb2.DeleteModelAliasRequest,
                               context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._registry.delete_alias(request.name, current_principal())
        return empty_pb2.Empty()

    async def ListModelAliases(
            self, request: registry_service_pb2.ListModelAliasesRequest, context: grpc.aio.ServicerContext,
    ) -> registry_service_pb2.ListModelAliasesResponse:
        aliases = await self._registry.list_aliases(request.parent, current_principal())
        return registry_service_pb2.ListModelAliasesResponse(
            aliases=[to_message(a, model_pb2.ModelAlias) for a in aliases])

    async def CreateDataset(self, request: registry_service_pb2.CreateDatasetRequest,
                            context: grpc.aio.ServicerContext) -> dataset_pb2.Dataset:
        dataset = await self._registry.create_dataset(
            request.dataset_id, request_fields(request.dataset, "dataset"), current_principal())
        return to_message(dataset, dataset_pb2.Dataset)

    async def GetDataset(self, request: registry_service_pb2.GetDatasetRequest,
                         context: grpc.aio.ServicerContext) -> dataset_pb2.Dataset:
        return to_message(await self._registry.get_dataset(request.name), dataset_pb2.Dataset)

    async def ListDatasets(self, request: registry_service_pb2.ListDatasetsRequest,
                           context: grpc.aio.ServicerContext) -> registry_service_pb2.ListDatasetsResponse:
        result = await self._registry.list_datasets(request.page_size, request.page_token,
                                                    request.filter)
        return registry_service_pb2.ListDatasetsResponse(
            datasets=[to_message(d, dataset_pb2.Dataset) for d in result.items],
            next_page_token=result.next_page_token)

    async def UpdateDataset(self, request: registry_service_pb2.UpdateDatasetRequest,
                            context: grpc.aio.ServicerContext) -> dataset_pb2.Dataset:
        dataset = await self._registry.update_dataset(
            request_fields(request.dataset, "dataset", keep_identifier=True),
            list(request.update_mask.paths), current_principal())
        return to_message(dataset, dataset_pb2.Dataset)

    async def DeleteDataset(self, request: registry_service_pb2.DeleteDatasetRequest,
                            context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._registry.delete_dataset(request.name, request.force, current_principal())
        return empty_pb2.Empty()

    async def UploadDatasetVersion(
            self, request_iterator: AsyncIterator[registry_service_pb2.UploadDatasetVersionRequest],
            context: grpc.aio.ServicerContext,
    ) -> dataset_pb2.DatasetVersion:
        header, chunks = await _upload_parts(request_iterator)
        version = await self._registry.upload_dataset_version(
            header.parent, request_fields(header.dataset_version, "header.dataset_version"),
            header.expected_sha256, header.size_bytes, chunks, current_principal())
        return to_message(version, dataset_pb2.DatasetVersion)

    async def GetDatasetVersion(self, request: registry_service_pb2.GetDatasetVersionRequest,
                                context: grpc.aio.ServicerContext) -> dataset_pb2.DatasetVersion:
        return to_message(await self._registry.get_dataset_version(request.name),
                          dataset_pb2.DatasetVersion)

    async def ListDatasetVersions(
            self, request: registry_service_pb2.ListDatasetVersionsRequest, context: grpc.aio.ServicerContext,
    ) -> registry_service_pb2.ListDatasetVersionsResponse:
        result = await self._registry.list_dataset_versions(
            request.parent, request.page_size, request.page_token, request.filter)
        return registry_service_pb2.ListDatasetVersionsResponse(
            dataset_versions=[to_message(v, dataset_pb2.DatasetVersion) for v in result.items],
            next_page_token=result.next_page_token)

    async def DeleteDatasetVersion(self, request: registry_service_pb2.DeleteDatasetVersionRequest,
                                   context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._registry.delete_dataset_version(request.name, current_principal())
        return empty_pb2.Empty()

    async def DownloadDatasetVersion(
            self, request: registry_service_pb2.DownloadDatasetVersionRequest,
            context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[registry_service_pb2.DownloadDatasetVersionResponse]:
        version, chunks = await self._registry.download_dataset_version(request.name,
                                                                        request.offset)
        async for message in _stream_chunks(to_message(version, dataset_pb2.DatasetVersion),
                                            chunks,
                                            registry_service_pb2.DownloadDatasetVersionResponse):
            yield message

    async def GetLineage(self, request: registry_service_pb2.GetLineageRequest,
                         context: grpc.aio.ServicerContext) -> audit_pb2.LineageGraph:
        direction = _LINEAGE_DIRECTIONS.get(request.direction)
        if direction is None:
            raise InvalidArgument.for_field("direction", f"unknown value {request.direction}")
        graph = await self._registry.get_lineage(request.name, direction, request.max_depth,
                                                 current_principal())
        return to_message(graph, audit_pb2.LineageGraph)

    async def ListAuditEvents(
            self, request: registry_service_pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext,
    ) -> registry_service_pb2.ListAuditEventsResponse:
        result = await self._registry.list_audit_events(request.page_size, request.page_token,
                                                        request.filter, current_principal())
        return registry_service_pb2.ListAuditEventsResponse(
            audit_events=[to_message(e, audit_pb2.AuditEvent) for e in result.items],
            next_page_token=result.next_page_token)

    async def WatchEvents(self, request: registry_service_pb2.WatchEventsRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[audit_pb2.RegistryEvent]:
        known = audit_pb2.EventType.values()
        unknown = [t for t in request.types if t not in known]
        if unknown:
            raise InvalidArgument.for_field("types", f"unknown event types {unknown}")
        types = [audit_pb2.EventType.Name(t) for t in request.types]
        async for event in self._registry.watch_events(request.after_event_id,
                                                       request.resource_prefix, types,
                                                       current_principal()):
            yield to_message(event, audit_pb2.RegistryEvent)
