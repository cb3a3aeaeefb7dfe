"""Strict conversion at the edge: output-only fields ignored, bad values named, no silent defaults."""

from __future__ import annotations

import math

import pytest
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from maas.common.v1 import field_behavior_pb2
from maas.inference.v1 import deployment_pb2
from maas.registry.v1 import dataset_pb2, model_pb2
from maas.trainer.v1 import training_job_pb2
from maas_runtime.errors import InvalidArgument
from maas_runtime.messages import (
    field_behaviors,
    invalid_values,
    request_fields,
    to_dict,
    to_message,
    validated_request,
)


def violations(error: InvalidArgument) -> dict[str, str]:
    return {v.field: v.description for v in error.field_violations}


def test_every_field_documented_output_only_is_annotated_so():
    files = [model_pb2, dataset_pb2, deployment_pb2, training_job_pb2]
    for module in files:
        for message in module.DESCRIPTOR.message_types_by_name.values():
            for field in message.fields:
                if field.name in ("create_time", "update_time", "creator"):
                    assert (field_behavior_pb2.FIELD_BEHAVIOR_OUTPUT_ONLY
                            in field_behaviors(field)), field.full_name
                if field.name == "name" and message.name in ("Model", "Deployment"):
                    assert field_behaviors(field) == (field_behavior_pb2.FIELD_BEHAVIOR_IDENTIFIER,)


def test_output_only_values_are_dropped_before_they_are_checked():
    model = model_pb2.Model(display_name="Digits", etag="abc", latest_version_id=7)
    model.create_time.seconds = 10**12
    model.create_time.nanos = -1
    model.aliases["prod"] = 3

    assert request_fields(model, "model") == {"display_name": "Digits", "etag": "abc"}


def test_output_only_fields_are_dropped_at_every_depth():
    version = model_pb2.ModelVersion(format=model_pb2.MODEL_FORMAT_ONNX)
    version.artifact.sha256 = "f" * 64
    dataset_version = dataset_pb2.DatasetVersion(format=dataset_pb2.DATASET_FORMAT_CSV)
    dataset_version.schema.label_column = "label"
    dataset_version.schema.num_classes = 99
    dataset_version.schema.feature_shape.extend([1, 2])

    assert request_fields(version, "v") == {"format": "MODEL_FORMAT_ONNX"}
    assert request_fields(dataset_version, "v") == {"format": "DATASET_FORMAT_CSV",
                                                    "schema": {"label_column": "label"}}


def test_the_identifier_is_kept_only_when_it_names_the_resource_to_change():
    model = model_pb2.Model(name="models/digits", description="d")

    assert "name" not in request_fields(model, "model")
    assert request_fields(model, "model", keep_identifier=True)["name"] == "models/digits"


def test_the_callers_message_is_left_untouched():
    model = model_pb2.Model(name="models/digits")
    model.create_time.seconds = 5

    request_fields(model, "model")

    assert model.name == "models/digits" and model.create_time.seconds == 5


@pytest.mark.parametrize(("seconds", "nanos"), [(10**12, 0), (-(10**12), 0), (0, -1),
                                                (0, 1_000_000_000)])
def test_an_out_of_range_timestamp_names_its_field(seconds, nanos):
    # Every Timestamp of today's contracts is output-only (dropped before checking), so the
    # checker is called directly, as it sees a writable one.
    job = training_job_pb2.TrainingJob()
    job.create_time.seconds, job.create_time.nanos = seconds, nanos

    assert [path for path, _ in invalid_values(job, "training_job")] == [
        "training_job.create_time"]


@pytest.mark.parametrize(("seconds", "nanos"), [(315_576_000_001, 0), (0, 1_000_000_000),
                                                (1, -1)])
def test_an_out_of_range_duration_is_reported(seconds, nanos):
    assert [path for path, _ in invalid_values(Duration(seconds=seconds, nanos=nanos), "d")] == [
        "d"]


def test_values_at_the_edges_of_the_ranges_are_accepted():
    assert not list(invalid_values(Timestamp(seconds=253_402_300_799, nanos=999_999_999)))
    assert not list(invalid_values(Timestamp(seconds=-62_135_596_800)))
    assert not list(invalid_values(Duration(seconds=-315_576_000_000, nanos=-999_999_999)))


def test_an_unknown_enum_number_names_its_field():
    with pytest.raises(InvalidArgument) as caught:
        request_fields(model_pb2.ModelVersion(format=42), "header.model_version")

    assert "unknown ModelFormat value 42" in violations(caught.value)["header.model_version.format"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_metric_names_its_map_key(value):
    version = model_pb2.ModelVersion(format=model_pb2.MODEL_FORMAT_ONNX, metrics={"accuracy": value})

    with pytest.raises(InvalidArgument) as caught:
        request_fields(version, "model_version")

    assert list(violations(caught.value)) == ['model_version.metrics["accuracy"]']


def test_non_finite_numbers_inside_a_struct_and_a_nested_message_are_named():
    job = training_job_pb2.TrainingJob()
    job.spec.optimizer.learning_rate = math.nan
    job.spec.architecture.hyperparameters.update({"layers": [1, {"dropout": math.inf}]})

    with pytest.raises(InvalidArgument) as caught:
        validated_request(job, "training_job")

    assert set(violations(caught.value)) == {
        "training_job.spec.optimizer.learning_rate",
        'training_job.spec.architecture.hyperparameters["layers"][1]["dropout"]'}


def test_every_violation_is_reported_at_once_with_an_invalid_argument():
    deployment = deployment_pb2.Deployment(model="models/m@prod")
    deployment.traffic.add(model_version="models/m/versions/1", percent=100)
    deployment.state = 77  # output-only: ignored, not reported
    version = model_pb2.ModelVersion(format=9, metrics={"a": math.nan})

    assert request_fields(deployment, "deployment")["model"] == "models/m@prod"
    with pytest.raises(InvalidArgument) as caught:
        request_fields(version, "model_version")
    assert caught.value.code == "INVALID_ARGUMENT"
    assert set(violations(caught.value)) == {"model_version.format", 'model_version.metrics["a"]'}


def test_domain_dicts_convert_strictly():
    assert to_message({"display_name": "D"}, model_pb2.Model).display_name == "D"
    with pytest.raises(json_format.ParseError):
        to_message({"display_name": "D", "colour": "red"}, model_pb2.Model)
    with pytest.raises(json_format.ParseError):
        to_message({"format": "MODEL_FORMAT_ONXX"}, model_pb2.ModelVersion)


def test_to_dict_round_trips_a_server_resource():
    version = model_pb2.ModelVersion(name="models/m/versions/1", version_id=1,
                                     format=model_pb2.MODEL_FORMAT_ONNX)
    assert to_message(to_dict(version), model_pb2.ModelVersion) == version
