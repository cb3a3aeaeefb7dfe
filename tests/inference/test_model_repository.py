"""Triton model directories: generated config.pbtxt, safe names, atomic writes (no Triton)."""

from __future__ import annotations

import pytest
from maas_inference.triton import (
    ArtifactFormat,
    BatchingPolicy,
    InstanceKind,
    ModelRepository,
    TensorSpec,
    TritonModelSpec,
    build_model_config,
    validate_triton_model_name,
)
from maas_inference.triton.model_repository import (
    CONFIG_FILE,
    parse_config_pbtxt,
    runtime_source,
)
from maas_runtime.errors import InvalidArgument, NotFound
from tritonclient.grpc import model_config_pb2

FEATURES = TensorSpec("features", "FP32", (64,))
LOGITS = TensorSpec("logits", "FP32", (10,))


def mlp_spec(name: str = "digits-mlp", **options) -> TritonModelSpec:
    fields = {"inputs": (FEATURES,), "outputs": (LOGITS,), **options}
    return TritonModelSpec(name=name, artifact_format=ArtifactFormat.MAAS_PACKAGE, **fields)


def test_config_carries_signature_batching_instances_and_artifact() -> None:
    spec = mlp_spec(
        batching=BatchingPolicy(
            max_batch_size=32, max_queue_delay_microseconds=250, preferred_batch_sizes=(8, 16)
        ),
        instance_count=2,
    )
    config = build_model_config(spec)
    assert config.name == "digits-mlp"
    assert config.backend == "python"
    assert config.max_batch_size == 32
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("features", model_config_pb2.TYPE_FP32, [64])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("logits", model_config_pb2.TYPE_FP32, [10])
    ]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)
    ]
    assert config.parameters["maas.artifact_path"].string_value == "model.safetensors"
    assert config.parameters["maas.artifact_format"].string_value == "maas-package"
    assert config.parameters["maas.torch_threads"].string_value == "1"


def test_without_batching_the_batch_dimension_is_explicit_and_no_batcher() -> None:
    config = build_model_config(mlp_spec(batching=BatchingPolicy(max_batch_size=0, dynamic_batching=False)))
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [-1, 64]
    assert not config.HasField("dynamic_batching")


def test_datatypes_map_from_kserve_names_and_variable_dims_stay() -> None:
    spec = TritonModelSpec(
        name="mixed",
        artifact_format=ArtifactFormat.TORCHSCRIPT,
        inputs=(TensorSpec("ids", "INT64", (-1,)), TensorSpec("text", "BYTES", (1,))),
        outputs=(TensorSpec("scores", "FP16", (3,)),),
        instance_kind=InstanceKind.GPU,
    )
    config = build_model_config(spec)
    assert [t.data_type for t in config.input] == [
        model_config_pb2.TYPE_INT64,
        model_config_pb2.TYPE_STRING,
    ]
    assert list(config.input[0].dims) == [-1]
    assert config.output[0].data_type == model_config_pb2.TYPE_FP16
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert config.parameters["maas.artifact_path"].string_value == "model.pt"


@pytest.mark.parametrize(
    "name",
    ["../escape", "a/b", "..", ".hidden", "", "a" * 129, "a..b", "with space", "a\\b", "ünï"],
)
def test_unsafe_model_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_triton_model_name(name)
    assert caught.value.field_violations[0].field == "triton_model_name"


@pytest.mark.parametrize("name", ["digits-mlp", "d_1.v2", "A9", "x" * 128])
def test_safe_model_names_pass(name: str) -> None:
    assert validate_triton_model_name(name) == name


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (mlp_spec(inputs=()), "signature.inputs"),
        (mlp_spec(inputs=(TensorSpec("x", "FLOAT", (64,)),)), "signature.inputs[0].datatype"),
        (mlp_spec(inputs=(TensorSpec("x", "FP32", (0,)),)), "signature.inputs[0].shape"),
        (mlp_spec(outputs=(TensorSpec("features", "FP32", (10,)),)), "signature.outputs[0].name"),
        (mlp_spec(batching=BatchingPolicy(max_batch_size=-1)), "batching.max_batch_size"),
        (mlp_spec(batching=BatchingPolicy(max_batch_size=0)), "batching.dynamic_batching"),
        (
            mlp_spec(batching=BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(16,))),
            "batching.preferred_batch_sizes",
        ),
        (
            mlp_spec(batching=BatchingPolicy(max_queue_delay_microseconds=-5)),
            "batching.max_queue_delay_microseconds",
        ),
        (mlp_spec(instance_count=0), "instance_count"),
        (mlp_spec(torch_threads=0), "torch_threads"),
    ],
)
def test_invalid_specs_name_the_field(spec: TritonModelSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        build_model_config(spec)
    assert field in [violation.field for violation in caught.value.field_violations]


def test_write_model_lays_out_the_python_backend_directory(tmp_path) -> None:
    artifact = tmp_path / "download.bin"
    artifact.write_bytes(b"weights-v1")
    repository = ModelRepository(tmp_path / "repo")
    model_dir = repository.write_model(mlp_spec(), artifact)

    assert model_dir == tmp_path / "repo" / "digits-mlp"
    assert (model_dir / "1" / "model.safetensors").read_bytes() == b"weights-v1"
    assert (model_dir / "1" / "model.py").read_bytes() == runtime_source()
    assert b"class TritonPythonModel" in runtime_source()
    assert parse_config_pbtxt((model_dir / CONFIG_FILE).read_text()) == build_model_config(mlp_spec())
    assert repository.read_config("digits-mlp") == build_model_config(mlp_spec())
    assert repository.model_names() == ["digits-mlp"]
    # Nothing but the model directory is left behind (no staging or retired directories).
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["digits-mlp"]


def test_rewriting_a_model_replaces_it_whole(tmp_path) -> None:
    repository = ModelRepository(tmp_path / "repo")
    first, second = tmp_path / "one", tmp_path / "two"
    first.write_bytes(b"v1")
    second.write_bytes(b"v2")
    repository.write_model(mlp_spec(), first)
    repository.write_model(mlp_spec(instance_count=3), second)

    assert (repository.model_dir("digits-mlp") / "1" / "model.safetensors").read_bytes() == b"v2"
    assert repository.read_config("digits-mlp").instance_group[0].count == 3
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["digits-mlp"]


def test_invalid_spec_or_missing_artifact_writes_nothing(tmp_path) -> None:
    repository = ModelRepository(tmp_path / "repo")
    artifact = tmp_path / "weights"
    artifact.write_bytes(b"w")
    with pytest.raises(InvalidArgument):
        repository.write_model(mlp_spec(name="../outside"), artifact)
    with pytest.raises(NotFound):
        repository.write_model(mlp_spec(), tmp_path / "missing")
    assert repository.model_names() == []
    assert not (tmp_path / "outside").exists()


def test_remove_model(tmp_path) -> None:
    repository = ModelRepository(tmp_path / "repo")
    artifact = tmp_path / "weights"
    artifact.write_bytes(b"w")
    repository.write_model(mlp_spec(), artifact)
    assert repository.remove_model("digits-mlp") is True
    assert repository.remove_model("digits-mlp") is False
    assert not repository.has_model("digits-mlp")
    with pytest.raises(NotFound):
        repository.read_config("digits-mlp")


def test_spec_from_a_maas_formats_signature(tmp_path) -> None:
    from maas_formats import ModelSignature, TensorSignature

    signature = ModelSignature(
        inputs=(TensorSignature("features", "FP32", (64,)),),
        outputs=(TensorSignature("logits", "FP32", (10,)),),
    )
    spec = TritonModelSpec.from_signature("digits-mlp", "maas-package", signature)
    assert spec == mlp_spec()
