"""Requests reach the registry's domain strictly converted: output-only values are ignored,
invalid values are INVALID_ARGUMENT naming the field (never INTERNAL)."""

from __future__ import annotations

import math

import grpc
from google.protobuf import field_mask_pb2
from maas.registry.v1 import dataset_pb2, model_pb2, registry_service_pb2 as rs

from tests.registry.helpers import (
    dataset_upload_requests,
    digits_csv,
    mlp_package,
    model_upload_requests,
    sha256,
)
from tests.support.grpc_asserts import expect_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAR_FUTURE = 10**12  # beyond 9999-12-31: no RFC 3339 form, so JSON conversion cannot hold it


def out_of_range_times(resource) -> None:
    """Every Timestamp of `resource` set to seconds 10^12, nanos -1."""
    for field in resource.DESCRIPTOR.fields:
        if field.message_type and field.message_type.full_name == "google.protobuf.Timestamp":
            timestamp = getattr(resource, field.name)
            timestamp.seconds, timestamp.nanos = FAR_FUTURE, -1


def hostile_model(**fields) -> model_pb2.Model:
    model = model_pb2.Model(latest_version_id=99, aliases={"prod": 7}, **fields)
    out_of_range_times(model)
    return model


def hostile_version(**fields) -> model_pb2.ModelVersion:
    version = model_pb2.ModelVersion(format=model_pb2.MODEL_FORMAT_MAAS_PACKAGE, version_id=42,
                                     creator="mallory", aliases=["prod"], **fields)
    version.artifact.sha256 = "0" * 64
    out_of_range_times(version)
    return version


def with_header_version(requests, version):
    """An upload stream whose header carries `version` instead of the helper's."""
    first = next(requests)
    first.header.model_version.CopyFrom(version)
    yield first
    yield from requests


async def test_output_only_values_in_create_and_update_model_are_ignored(registry):
    stub = registry.admin
    created = await stub.CreateModel(rs.CreateModelRequest(
        model_id="digits", model=hostile_model(name="models/other", display_name="Digits")))
    assert created.name == "models/digits" and created.latest_version_id == 0
    assert not created.aliases and 0 < created.create_time.seconds < FAR_FUTURE

    updated = await stub.UpdateModel(rs.UpdateModelRequest(
        model=hostile_model(name="models/digits", description="8x8", etag=created.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["description"])))
    assert updated.description == "8x8"
    assert updated.create_time == created.create_time and updated.update_time.seconds < FAR_FUTURE


async def test_output_only_values_in_model_version_upload_and_update_are_ignored(registry):
    stub = registry.admin
    await stub.CreateModel(rs.CreateModelRequest(model_id="digits"))
    data = mlp_package()
    version = await stub.UploadModelVersion(with_header_version(
        model_upload_requests("models/digits", data), hostile_version(description="first")))
    assert version.version_id == 1 and version.creator != "mallory" and not version.aliases
    assert version.artifact.sha256 == sha256(data)
    assert 0 < version.create_time.seconds < FAR_FUTURE

    updated = await stub.UpdateModelVersion(rs.UpdateModelVersionRequest(
        model_version=hostile_version(name=version.name, description="second"),
        update_mask=field_mask_pb2.FieldMask(paths=["description"])))
    assert updated.description == "second" and updated.create_time == version.create_time


async def test_output_only_values_in_dataset_create_update_and_upload_are_ignored(registry):
    stub = registry.admin
    dataset = dataset_pb2.Dataset(display_name="Digits", latest_version_id=5)
    out_of_range_times(dataset)
    created = await stub.CreateDataset(rs.CreateDatasetRequest(dataset_id="digits",
                                                               dataset=dataset))
    assert created.latest_version_id == 0 and created.create_time.seconds < FAR_FUTURE

    dataset.name, dataset.description, dataset.etag = "datasets/digits", "csv", created.etag
    updated = await stub.UpdateDataset(rs.UpdateDatasetRequest(
        dataset=dataset, update_mask=field_mask_pb2.FieldMask(paths=["description"])))
    assert updated.description == "csv" and updated.create_time == created.create_time

    requests = dataset_upload_requests("datasets/digits", digits_csv(),
                                       dataset_pb2.DATASET_FORMAT_CSV, ["f0", "f1", "f2"], "label")
    first = next(requests)
    version = first.header.dataset_version
    version.row_count, version.creator = 10**9, "mallory"
    version.schema.num_classes = 1000
    out_of_range_times(version)
    uploaded = await stub.UploadDatasetVersion(iter([first, *requests]))
    assert uploaded.row_count == 30 and uploaded.schema.num_classes == 4
    assert uploaded.creator != "mallory" and uploaded.create_time.seconds < FAR_FUTURE


async def test_an_unknown_enum_number_is_invalid_argument_naming_the_field(registry):
    stub = registry.admin
    await stub.CreateModel(rs.CreateModelRequest(model_id="digits"))
    await expect_error(
        stub.UploadModelVersion(model_upload_requests("models/digits", mlp_package(), fmt=42)),
        INVALID, "header.model_version.format")
    await stub.CreateDataset(rs.CreateDatasetRequest(dataset_id="digits"))
    await expect_error(
        stub.UploadDatasetVersion(dataset_upload_requests("datasets/digits", digits_csv(), 7,
                                                          ["f0"], "label")),
        INVALID, "header.dataset_version.format")


async def test_a_non_finite_metric_is_invalid_argument_naming_the_metric(registry):
    stub = registry.admin
    await stub.CreateModel(rs.CreateModelRequest(model_id="digits"))
    await expect_error(
        stub.UploadModelVersion(model_upload_requests("models/digits", mlp_package(),
                                                      metrics={"accuracy": math.nan})),
        INVALID, 'header.model_version.metrics["accuracy"]')
    version = await stub.UploadModelVersion(model_upload_requests("models/digits", mlp_package()))
    await expect_error(
        stub.UpdateModelVersion(rs.UpdateModelVersionRequest(
            model_version=model_pb2.ModelVersion(name=version.name, metrics={"loss": math.inf}),
            update_mask=field_mask_pb2.FieldMask(paths=["metrics"]))),
        INVALID, 'model_version.metrics["loss"]')


async def test_a_non_finite_lineage_parameter_is_invalid_argument(registry):
    stub = registry.admin
    await stub.CreateModel(rs.CreateModelRequest(model_id="digits"))
    requests = model_upload_requests("models/digits", mlp_package(), operation="train")
    first = next(requests)
    first.header.model_version.lineage.operation.parameters.update({"lr": math.nan})
    await expect_error(stub.UploadModelVersion(iter([first, *requests])), INVALID,
                       'header.model_version.lineage.operation.parameters["lr"]')
