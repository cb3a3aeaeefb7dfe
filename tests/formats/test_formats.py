"""Domain tests of maas-formats: every rejection is an InvalidArgument naming what is wrong.

The registry turns these exceptions into INVALID_ARGUMENT with `BadRequest` field violations,
so the tests assert the exception type, the violation's field path and the words that tell
the uploader what to fix — not merely that "something" was raised.
"""

from __future__ import annotations

import io
import json
import stat
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from maas_formats import (
    ArchitectureSpec,
    FrameworkInfo,
    ModelManifest,
    SignatureSpec,
    TensorSignature,
    TensorSignatureSpec,
    WeightTensorSpec,
    load_dataset,
    load_model_package,
    read_safetensors_header,
    signature_from_manifest,
    validate_dataset,
    validate_hf_transformer,
    validate_model_artifact,
    validate_model_package,
    validate_onnx,
    validate_torchscript,
    write_model_package,
)
from maas_formats.manifest import format_field_path
from maas_formats.opaque import MAX_CONFIG_JSON_BYTES
from maas_runtime.errors import FieldViolation, InvalidArgument, ResourceExhausted

from tests.support.artifacts import varint

# --- helpers -------------------------------------------------------------------------------


def make_manifest(**overrides) -> ModelManifest:
    fields = {
        "architecture": ArchitectureSpec(kind="mlp", hyperparameters={"hidden": [8]}),
        "signature": SignatureSpec(
            inputs=[TensorSignatureSpec(name="input__0", datatype="FP32", shape=[4])],
            outputs=[TensorSignatureSpec(name="output__0", datatype="FP32", shape=[3])],
        ),
        "preprocessing": {"scale": 16.0},
        "labels": ["a", "b", "c"],
        "framework": FrameworkInfo(name="numpy", version=np.__version__),
    }
    fields.update(overrides)
    return ModelManifest(**fields)


def make_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "fc.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "fc.bias": np.arange(3, dtype=np.float32),
        "steps": np.array([7], dtype=np.int64),
    }


def manifest_document(**overrides) -> dict:
    """A valid manifest as JSON-ready data, listing the tensors of make_weights()."""
    document = json.loads(make_manifest().model_dump_json())
    document["tensors"] = {
        "fc.weight": {"dtype": "F32", "shape": [3, 4]},
        "fc.bias": {"dtype": "F32", "shape": [3]},
        "steps": {"dtype": "I64", "shape": [1]},
    }
    document.update(overrides)
    return document


def save_with_manifest_text(path: Path, manifest_text: str | None) -> Path:
    """Write make_weights() with an arbitrary (possibly wrong) manifest string."""
    metadata = None if manifest_text is None else {"maas.manifest": manifest_text}
    safetensors.numpy.save_file(make_weights(), path, metadata=metadata)
    return path


def raw_safetensors(
    header: object, data: bytes = b"", *, declared_length: int | None = None
) -> bytes:
    """Bytes of a hand-built safetensors file, for headers no correct writer would emit."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(header_bytes) if declared_length is None else declared_length
    return struct.pack("<Q", length) + header_bytes + data


def only_violation(error: pytest.ExceptionInfo[InvalidArgument]) -> FieldViolation:
    assert error.value.code == "INVALID_ARGUMENT"
    assert len(error.value.field_violations) == 1, error.value.field_violations
    return error.value.field_violations[0]


def violation_fields(error: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in error.value.field_violations]


class CountingReader:
    """A binary file wrapper that records how many bytes were read and in what chunk sizes."""

    def __init__(self, inner: io.BufferedIOBase, max_chunk: int | None = None) -> None:
        self.inner = inner
        self.bytes_read = 0
        self.max_chunk = max_chunk

    def read(self, size: int = -1) -> bytes:
        if self.max_chunk is not None:
            size = min(size, self.max_chunk)
        data = self.inner.read(size)
        self.bytes_read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()


# --- safetensors header --------------------------------------------------------------------


def test_header_lists_every_tensor_with_dtype_shape_and_offsets(tmp_path):
    path = tmp_path / "model.safetensors"
    write_model_package(path, make_manifest(), make_weights())

    header = read_safetensors_header(path)

    assert {name: (e.dtype, e.shape) for name, e in header.tensors.items()} == {
        "fc.weight": ("F32", (3, 4)),
        "fc.bias": ("F32", (3,)),
        "steps": ("I64", (1,)),
    }
    assert path.stat().st_size == 8 + header.header_length + header.data_length
    assert sum(e.byte_length for e in header.tensors.values()) == header.data_length
    assert header.parameter_count == 12 + 3 + 1
    assert "maas.manifest" in header.metadata


def test_header_is_read_without_reading_tensor_data(tmp_path):
    path = tmp_path / "big.safetensors"
    big = {"w": np.ones((1024, 1024), dtype=np.float32)}  # 4 MiB of data
    write_model_package(path, make_manifest(), big)

    with path.open("rb") as stream:
        reader = CountingReader(stream)
        header = read_safetensors_header(reader)
    assert reader.bytes_read == 8 + header.header_length
    assert header.data_length == 4 * 1024 * 1024

    with path.open("rb") as stream:
        reader = CountingReader(stream)
        info = validate_model_package(reader)
    assert reader.bytes_read == 8 + info.header.header_length


def test_header_survives_streams_that_return_short_reads(tmp_path):
    path = tmp_path / "model.safetensors"
    write_model_package(path, make_manifest(), make_weights())
    with path.open("rb") as stream:
        header = read_safetensors_header(CountingReader(stream, max_chunk=3))
    assert set(header.tensors) == {"fc.weight", "fc.bias", "steps"}


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

CORRUPT_FILES: dict[str, tuple[bytes, str]] = {
    "shorter than the length prefix": (b"\x05\x00\x00", "too short"),
    "length beyond the file": (raw_safetensors(b"{}", declared_length=1000), "exceeds the file"),
    "length beyond the limit": (
        raw_safetensors(b"{}", declared_length=2**40),
        "exceeds the limit",
    ),
    "header not JSON": (raw_safetensors(b"{not json"), "not valid JSON"),
    "header not UTF-8": (raw_safetensors(b'{"\xff": 1}'), "not UTF-8"),
    "header a JSON array": (raw_safetensors(b"[1, 2]"), "must be a JSON object"),
    "header with NaN": (raw_safetensors(b'{"a": NaN}'), "not valid JSON"),
    "duplicate tensor name": (
        raw_safetensors(b'{"w": %s, "w": %s}' % ((json.dumps(F32_2).encode(),) * 2), bytes(8)),
        "duplicate key 'w'",
    ),
    "unknown dtype": (
        raw_safetensors({"w": {**F32_2, "dtype": "F33"}}, bytes(8)),
        "tensor 'w' has unknown dtype 'F33'",
    ),
    "negative dimension": (
        raw_safetensors({"w": {**F32_2, "shape": [-2]}}, bytes(8)),
        "tensor 'w' shape must be a list of non-negative integers",
    ),
    "boolean dimension": (
        raw_safetensors({"w": {**F32_2, "shape": [True]}}, bytes(8)),
        "tensor 'w' shape must be a list of non-negative integers",
    ),
    "missing data_offsets": (
        raw_safetensors({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)),
        "tensor 'w' lacks data_offsets",
    ),
    "unknown entry key": (
        raw_safetensors({"w": {**F32_2, "extra": 1}}, bytes(8)),
        "tensor 'w' has unknown keys extra",
    ),
    "offsets beyond the file": (
        raw_safetensors({"fc.weight": F32_2}, bytes(4)),
        "tensor 'fc.weight' data_offsets [0, 8] exceed the file",
    ),
    "descending offsets": (
        raw_safetensors({"w": {**F32_2, "data_offsets": [8, 0]}}, bytes(8)),
        "not an ascending range",
    ),
    "size disagrees with shape": (
        raw_safetensors({"w": {**F32_2, "shape": [3]}}, bytes(8)),
        "tensor 'w' occupies 8 bytes but shape [3] of F32 needs 12",
    ),
    "overlapping tensors": (
        raw_safetensors(
            {"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}},
            bytes(12),
        ),
        "tensor 'b' data_offsets [4, 12] overlap tensor 'a'",
    ),
    "gap between tensors": (
        raw_safetensors(
            {"a": F32_2, "b": {**F32_2, "data_offsets": [12, 20]}},
            bytes(20),
        ),
        "4 bytes before tensor 'b' (offset 8) belong to no tensor",
    ),
    "trailing bytes": (raw_safetensors({"w": F32_2}, bytes(10)), "2 trailing bytes"),
    "half-byte dtype with odd count": (
        raw_safetensors({"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, bytes(2)),
        "does not fill whole bytes",
    ),
    "metadata value not a string": (
        raw_safetensors({"__metadata__": {"maas.manifest": {"a": 1}}}),
        "__metadata__ entry 'maas.manifest' must be a string",
    ),
}


@pytest.mark.parametrize("content, expected", CORRUPT_FILES.values(), ids=CORRUPT_FILES.keys())
def test_corrupt_header_is_invalid_argument_on_the_artifact(tmp_path, content, expected):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(content)

    with pytest.raises(InvalidArgument) as error:
        read_safetensors_header(path)

    violation = only_violation(error)
    assert violation.field == "artifact"
    assert violation.description.startswith("safetensors header: ")
    assert expected in violation.description
    # The same file is also refused as a model package, by the same check.
    with pytest.raises(InvalidArgument):
        validate_model_artifact(path, "maas-package")


def test_truncated_package_is_rejected_naming_the_cut_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    write_model_package(path, make_manifest(), {"only": np.zeros(16, dtype=np.float32)})
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(InvalidArgument) as error:
        validate_model_package(path)

    assert "tensor 'only' data_offsets" in only_violation(error).description
    assert "exceed the file" in only_violation(error).description


def test_hand_built_valid_header_agrees_with_the_reference_reader(tmp_path):
    # Our checks must not reject what safetensors itself accepts, including mixed alignment
    # order and zero-element tensors.
    path = tmp_path / "ok.safetensors"
    header = {
        "b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]},
        "a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
        "empty": {"dtype": "F32", "shape": [0, 5], "data_offsets": [16, 16]},
    }
    path.write_bytes(raw_safetensors(header, bytes(16)))

    parsed = read_safetensors_header(path)

    reference = safetensors.numpy.load_file(path)
    assert {n: (str(a.dtype), a.shape) for n, a in reference.items()} == {
        "a": ("int64", (1,)),
        "b": ("float16", (2, 2)),
        "empty": ("float32", (0, 5)),
    }
    assert {n: e.shape for n, e in parsed.tensors.items()} == {
        "a": (1,),
        "b": (2, 2),
        "empty": (0, 5),
    }


# --- model packages ------------------------------------------------------------------------


def test_package_round_trip_keeps_weights_and_fills_manifest_tensors(tmp_path):
    path = tmp_path / "model.safetensors"
    weights = make_weights()
    weights["transposed"] = np.arange(6, dtype=np.float64).reshape(2, 3).T  # not contiguous
    stale = make_manifest(tensors={"old": WeightTensorSpec(dtype="F32", shape=[1])})

    written = write_model_package(path, stale, weights)
    manifest, loaded = load_model_package(path)

    assert manifest == written
    assert manifest.tensors == {
        "fc.weight": WeightTensorSpec(dtype="F32", shape=[3, 4]),
        "fc.bias": WeightTensorSpec(dtype="F32", shape=[3]),
        "steps": WeightTensorSpec(dtype="I64", shape=[1]),
        "transposed": WeightTensorSpec(dtype="F64", shape=[3, 2]),
    }
    assert manifest.preprocessing == {"scale": 16.0}
    assert manifest.labels == ["a", "b", "c"]
    assert set(loaded) == set(weights)
    for name, array in weights.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)
    assert not list(tmp_path.glob(".*partial")), "temporary file left behind"


def test_signature_comes_from_the_manifest(tmp_path):
    path = tmp_path / "model.safetensors"
    write_model_package(path, make_manifest(), make_weights())

    facts = validate_model_artifact(path, "maas-package")

    assert facts.format_name == "maas-package"
    assert facts.parameter_count == 16
    assert facts.signature == signature_from_manifest(facts.manifest)
    assert facts.signature.inputs == (TensorSignature("input__0", "FP32", (4,)),)
    assert facts.signature.outputs == (TensorSignature("output__0", "FP32", (3,)),)


def test_package_without_manifest_is_rejected(tmp_path):
    path = save_with_manifest_text(tmp_path / "bare.safetensors", None)

    with pytest.raises(InvalidArgument) as error:
        validate_model_package(path)

    violation = only_violation(error)
    assert violation.field == "artifact.manifest"
    assert "'maas.manifest'" in violation.description


@pytest.mark.parametrize(
    "manifest_text, field, words",
    [
        ("{not json", "artifact.manifest", "Invalid JSON"),
        (
            json.dumps(
                manifest_document(
                    signature={
                        "inputs": [{"name": "x", "datatype": "FP33", "shape": [4]}],
                        "outputs": [{"name": "y", "datatype": "FP32", "shape": [3]}],
                    }
                )
            ),
            "artifact.manifest.signature.inputs[0].datatype",
            "'FP32'",
        ),
        (
            json.dumps(manifest_document(owner="me")),
            "artifact.manifest.owner",
            "Extra inputs are not permitted",
        ),
        (
            json.dumps(manifest_document(format_version=2)),
            "artifact.manifest.format_version",
            "1",
        ),
        (
            json.dumps(
                manifest_document(
                    signature={
                        "inputs": [{"name": "x", "datatype": "FP32", "shape": [0]}],
                        "outputs": [{"name": "y", "datatype": "FP32", "shape": [3]}],
                    }
                )
            ),
            "artifact.manifest.signature.inputs[0].shape[0]",
            "-1 for a variable size",
        ),
        (
            json.dumps(
                manifest_document(
                    signature={
                        "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
                        "outputs": [{"name": "x", "datatype": "FP32", "shape": [3]}],
                    }
                )
            ),
            "artifact.manifest.signature",
            "tensor name 'x' is used twice",
        ),
        (
            json.dumps(manifest_document(architecture={"kind": "mlp", "hyperparameters": []})),
            "artifact.manifest.architecture.hyperparameters",
            "Input should be an object",
        ),
        (
            json.dumps({k: v for k, v in manifest_document().items() if k != "signature"}),
            "artifact.manifest.signature",
            "Field required",
        ),
    ],
    ids=[
        "not-json",
        "unknown-datatype",
        "extra-field",
        "future-version",
        "zero-dimension",
        "duplicate-names",
        "wrong-type",
        "missing-signature",
    ],
)
def test_invalid_manifest_names_the_field(tmp_path, manifest_text, field, words):
    path = save_with_manifest_text(tmp_path / "model.safetensors", manifest_text)

    with pytest.raises(InvalidArgument) as error:
        validate_model_package(path)

    violations = {v.field: v.description for v in error.value.field_violations}
    assert field in violations, violations
    assert words in violations[field]


def test_manifest_schema_is_strict_about_types(tmp_path):
    document = manifest_document()
    document["tensors"]["steps"]["shape"] = [1.0]  # a float where an int belongs
    path = save_with_manifest_text(tmp_path / "model.safetensors", json.dumps(document))

    with pytest.raises(InvalidArgument) as error:
        validate_model_package(path)

    assert violation_fields(error) == ['artifact.manifest.tensors["steps"].shape[0]']


@pytest.mark.parametrize(
    "tensors, field, words",
    [
        (
            {"fc.weight": {"dtype": "F16", "shape": [3, 4]}},
            'artifact.manifest.tensors["fc.weight"].dtype',
            "tensor 'fc.weight': manifest says F16, weights hold F32",
        ),
        (
            {"fc.weight": {"dtype": "F32", "shape": [4, 3]}},
            'artifact.manifest.tensors["fc.weight"].shape',
            "tensor 'fc.weight': manifest says shape [4, 3], weights hold [3, 4]",
        ),
        (
            {"fc.ghost": {"dtype": "F32", "shape": [1]}},
            'artifact.manifest.tensors["fc.ghost"]',
            "tensor 'fc.ghost' is listed in the manifest but absent from the weights",
        ),
    ],
    ids=["dtype", "shape", "absent-from-weights"],
)
def test_manifest_disagreeing_with_weights_names_the_tensor(tmp_path, tensors, field, words):
    document = manifest_document()
    document["tensors"].update(tensors)
    path = save_with_manifest_text(tmp_path / "model.safetensors", json.dumps(document))

    with pytest.raises(InvalidArgument) as error:
        validate_model_package(path)

    assert error.value.field_violations == (FieldViolation(field, words),)


def test_weight_missing_from_manifest_is_named(tmp_path):
    document = manifest_document()
    del document["tensors"]["fc.bias"]
    path = save_with_manifest_text(tmp_path / "model.safetensors", json.dumps(document))

    with pytest.raises(InvalidArgument) as error:
        validate_model_package(path)

    violation = only_violation(error)
    assert violation.field == "artifact.manifest.tensors"
    assert "'fc.bias' is missing from the manifest" in violation.description


def test_field_paths_quote_dict_keys_but_not_fields():
    assert (
        format_field_path("artifact.manifest", ("tensors", "a.b", "shape", 0))
        == 'artifact.manifest.tensors["a.b"].shape[0]'
    )
    assert (
        format_field_path("m", ("signature", "outputs", 2, "datatype"))
        == "m.signature.outputs[2].datatype"
    )


def test_writer_refuses_what_safetensors_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="cannot be stored"):
        write_model_package(
            tmp_path / "x.safetensors", make_manifest(), {"w": np.array(["a"], dtype=object)}
        )
    assert not list(tmp_path.iterdir()), "a failed write must leave no file behind"


# --- TorchScript ---------------------------------------------------------------------------


# torch 2.13 deprecates torch.jit.script/save, but TorchScript is still an accepted format.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_accepted_and_plain_checkpoint_rejected(tmp_path):
    torch = pytest.importorskip("torch")
    scripted = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), scripted)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(torch.nn.Linear(2, 3).state_dict(), checkpoint)

    validate_torchscript(scripted)
    assert validate_model_artifact(scripted, "torchscript").signature is None

    with pytest.raises(InvalidArgument) as error:
        validate_torchscript(checkpoint)
    violation = only_violation(error)
    assert violation.field == "artifact"
    assert "no <archive>/code/ entry" in violation.description


def test_torchscript_must_be_a_zip(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(InvalidArgument) as error:
        validate_model_artifact(path, "torchscript")
    assert "must be a zip archive" in only_violation(error).description


# --- ONNX ----------------------------------------------------------------------------------


def length_delimited(field_number: int, payload: bytes) -> bytes:
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload


def onnx_bytes(graph: bytes | None = b"\x0a\x04main") -> bytes:
    model = b"\x08" + varint(9)  # ir_version = 9
    model += length_delimited(2, b"pytorch")  # producer_name
    if graph is not None:
        model += length_delimited(7, graph)
    model += length_delimited(8, b"\x10\x11")  # opset_import { version: 17 }
    return model


def test_onnx_model_proto_is_accepted(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_bytes())
    validate_onnx(path)
    assert validate_model_artifact(path, "onnx").format_name == "onnx"


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "empty"),
        (b"PK\x03\x04 a zip, not onnx", "does not start with the ir_version field"),
        (onnx_bytes()[:-1], "runs past the end of the file"),
        (onnx_bytes(graph=None), "has no graph"),
        (b"\x08\xff\xff", "ends inside a varint"),
        (b"\x08\x01" * 100_001, "more than 100000 top-level fields"),
    ],
    ids=["empty", "wrong-magic", "truncated", "no-graph", "broken-varint", "field-flood"],
)
def test_onnx_sanity_check_rejects(tmp_path, content, words):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(InvalidArgument) as error:
        validate_onnx(path)
    violation = only_violation(error)
    assert violation.field == "artifact"
    assert words in violation.description


# --- Hugging Face zip ----------------------------------------------------------------------


def safetensors_bytes() -> bytes:
    return safetensors.numpy.save({"embed.weight": np.zeros((4, 2), dtype=np.float32)})


def make_hf_zip(path: Path, members: dict[str, bytes | zipfile.ZipInfo]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def good_hf_members(prefix: str = "") -> dict[str, bytes]:
    return {
        f"{prefix}config.json": json.dumps({"model_type": "bert"}).encode(),
        f"{prefix}tokenizer.json": b"{}",
        f"{prefix}model.safetensors": safetensors_bytes(),
    }


@pytest.mark.parametrize("prefix", ["", "my-model/"])
def test_hf_zip_with_safetensors_is_accepted(tmp_path, prefix):
    path = make_hf_zip(tmp_path / "hf.zip", good_hf_members(prefix))

    info = validate_hf_transformer(path)
    facts = validate_model_artifact(path, "hf-transformer")

    assert info.root == prefix
    assert info.config == {"model_type": "bert"}
    assert list(info.weights) == [f"{prefix}model.safetensors"]
    assert facts.archive_root == prefix
    assert facts.parameter_count == 8


def test_hf_zip_with_pickled_weights_is_rejected_naming_them(tmp_path):
    members = good_hf_members()
    members["pytorch_model.bin"] = b"\x80\x04pickle"
    members["optimizer.PT"] = b"\x80\x04pickle"
    path = make_hf_zip(tmp_path / "hf.zip", members)

    with pytest.raises(InvalidArgument) as error:
        validate_model_artifact(path, "hf-transformer")

    descriptions = [v.description for v in error.value.field_violations]
    assert violation_fields(error) == ["artifact", "artifact"]
    assert any("'pytorch_model.bin' is a pickle-capable" in d for d in descriptions)
    assert any("'optimizer.PT' is a pickle-capable" in d for d in descriptions)


@pytest.mark.parametrize(
    "member, words",
    [
        ("../evil.json", "escapes the archive with '..'"),
        ("weights/../../evil.json", "escapes the archive with '..'"),
        ("/etc/cron.d/evil", "absolute path"),
        ("C:/evil.json", "absolute path"),
    ],
)
def test_hf_zip_slip_member_is_rejected(tmp_path, member, words):
    members = good_hf_members()
    members[member] = b"{}"
    path = make_hf_zip(tmp_path / "hf.zip", members)
    assert member in zipfile.ZipFile(path).namelist()  # the writer kept the hostile name

    with pytest.raises(InvalidArgument) as error:
        validate_hf_transformer(path)

    violation = only_violation(error)
    assert violation.field == "artifact"
    assert repr(member) in violation.description and words in violation.description


def test_hf_zip_symlink_member_is_rejected(tmp_path):
    path = make_hf_zip(tmp_path / "hf.zip", good_hf_members())
    link = zipfile.ZipInfo("config-link.json")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(link, "/etc/passwd")

    with pytest.raises(InvalidArgument) as error:
        validate_hf_transformer(path)
    assert "'config-link.json' is a symbolic link" in only_violation(error).description


@pytest.mark.parametrize(
    "change, words",
    [
        ({"config.json": None}, "no config.json"),
        ({"config.json": b"[1, 2]"}, "config.json must hold a JSON object"),
        ({"config.json": b"{oops"}, "config.json is not valid JSON"),
        ({"model.safetensors": None}, "no .safetensors weights"),
        (
            {"model.safetensors": safetensors_bytes()[:-4]},
            "member 'model.safetensors' safetensors header: tensor 'embed.weight' data_offsets",
        ),
    ],
    ids=["no-config", "config-not-object", "config-not-json", "no-weights", "corrupt-weights"],
)
def test_hf_zip_contents_are_checked(tmp_path, change, words):
    members = {**good_hf_members(), **change}
    path = make_hf_zip(tmp_path / "hf.zip", {k: v for k, v in members.items() if v is not None})

    with pytest.raises(InvalidArgument) as error:
        validate_hf_transformer(path)
    assert words in only_violation(error).description


def test_hf_oversized_config_is_resource_exhausted(tmp_path):
    members = good_hf_members()
    members["config.json"] = b"{" + b" " * MAX_CONFIG_JSON_BYTES + b"}"  # deflates to ~16 KiB
    path = make_hf_zip(tmp_path / "hf.zip", members)

    with pytest.raises(ResourceExhausted) as error:
        validate_hf_transformer(path)
    assert error.value.code == "RESOURCE_EXHAUSTED"
    assert "config.json" in error.value.message


def test_hf_upload_that_is_not_a_zip_is_rejected(tmp_path):
    path = tmp_path / "hf.zip"
    path.write_bytes(safetensors_bytes())
    with pytest.raises(InvalidArgument) as error:
        validate_hf_transformer(path)
    assert "must be a zip archive" in only_violation(error).description


def test_unknown_model_format_is_a_format_violation(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"x")
    with pytest.raises(InvalidArgument) as error:
        validate_model_artifact(path, "pickle")
    assert only_violation(error).field == "format"


# --- NPZ datasets --------------------------------------------------------------------------


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def digits_like(rows: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "images": rng.random((rows, 1, 8, 8), dtype=np.float32),
        "targets": (np.arange(rows) % 3).astype(np.int64),
    }


def test_npz_facts_and_load(tmp_path):
    arrays = digits_like()
    path = write_npz(tmp_path / "d.npz", **arrays)

    facts = validate_dataset(path, "npz", ["images"], "targets")
    features, labels = load_dataset(path, "npz", ["images"], "targets")

    assert (facts.row_count, facts.feature_shape, facts.num_classes) == (10, (1, 8, 8), 3)
    assert features.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(features, arrays["images"])
    np.testing.assert_array_equal(labels, arrays["targets"])


def test_npz_object_array_is_rejected_without_unpickling(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.array([{"x": 1}, None], dtype=object), targets=np.array([0, 1]))

    with pytest.raises(InvalidArgument) as error:
        validate_dataset(path, "npz", ["images"], "targets")
    assert "object array" in only_violation(error).description
    with pytest.raises(InvalidArgument):
        load_dataset(path, "npz", ["images"], "targets")


@pytest.mark.parametrize(
    "arrays, columns, field, words",
    [
        (
            {"targets": np.zeros(3, dtype=np.int64)},
            (["images"], "targets"),
            "schema.feature_columns",
            "array 'images' is not in the archive (it holds: targets)",
        ),
        (
            {"images": np.zeros((3, 2), dtype=np.float32)},
            (["images"], "targets"),
            "schema.label_column",
            "array 'targets' is not in the archive",
        ),
        (
            {"images": np.zeros((3, 2), np.float32), "targets": np.zeros(4, np.int64)},
            (["images"], "targets"),
            "artifact",
            "array 'images' has 3 rows but 'targets' has 4",
        ),
        (
            {"images": np.array([["a", "b"]]), "targets": np.zeros(1, np.int64)},
            (["images"], "targets"),
            "schema.feature_columns",
            "non-numeric dtype",
        ),
        (
            {"images": np.zeros((2, 2), np.float32), "targets": np.array([0.0, 1.0])},
            (["images"], "targets"),
            "schema.label_column",
            "labels must be integer class indices",
        ),
        (
            {"images": np.zeros((2, 2), np.float32), "targets": np.array([0, -1])},
            (["images"], "targets"),
            "artifact",
            "negative class indices",
        ),
        (
            {"images": np.array([[0.0, np.nan]], np.float32), "targets": np.zeros(1, np.int64)},
            (["images"], "targets"),
            "artifact",
            "NaN, infinity",
        ),
        (
            {"images": np.zeros((2, 2), np.float32), "targets": np.zeros(2, np.int64)},
            (["images", "more"], "targets"),
            "schema.feature_columns",
            "exactly one feature array",
        ),
    ],
    ids=[
        "missing-features",
        "missing-labels",
        "row-mismatch",
        "strings",
        "float-labels",
        "negative",
        "nan",
        "two-arrays",
    ],
)
def test_npz_schema_problems_name_the_field(tmp_path, arrays, columns, field, words):
    path = write_npz(tmp_path / "d.npz", **arrays)

    with pytest.raises(InvalidArgument) as error:
        validate_dataset(path, "npz", *columns)

    violations = {v.field: v.description for v in error.value.field_violations}
    assert field in violations, violations
    assert words in violations[field]


def test_npz_validation_streams_instead_of_loading(tmp_path):
    rows = 4096
    arrays = {
        "x": np.ones((rows, 4096), dtype=np.float32),  # 64 MiB of features
        "y": np.zeros(rows, dtype=np.int64),
    }
    path = write_npz(tmp_path / "big.npz", **arrays)
    del arrays

    tracemalloc.start()
    try:
        facts = validate_dataset(path, "npz", ["x"], "y")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert facts.row_count == rows
    assert peak < 32 * 1024 * 1024, f"validation peaked at {peak} bytes for a 64 MiB array"


# --- CSV datasets --------------------------------------------------------------------------


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


IRIS_LIKE = (
    "sepal_length,sepal_width,species,id\n"
    "5.1,3.5,0,a\n"
    "4.9,3.0,0,b\n"
    "6.2,2.9,1,c\n"
    '"7.7",2.6,2,"d, quoted"\n'
    "\n"
)


def test_csv_counts_rows_and_classes(tmp_path):
    path = write_csv(tmp_path / "d.csv", IRIS_LIKE)

    facts = validate_dataset(path, "csv", ["sepal_length", "sepal_width"], "species")
    features, labels = load_dataset(path, "csv", ["sepal_length", "sepal_width"], "species")

    assert (facts.row_count, facts.feature_shape, facts.num_classes) == (4, (2,), 3)
    assert facts.class_names == ()
    assert features.dtype == np.float32 and features.shape == (4, 2)
    np.testing.assert_allclose(features[3], [7.7, 2.6], rtol=1e-6)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 1, 2]


def test_csv_class_names_are_numbered_in_sorted_order(tmp_path):
    path = write_csv(tmp_path / "d.csv", "x,kind\n1,virginica\n2,setosa\n3,virginica\n")

    facts = validate_dataset(path, "csv", ["x"], "kind")
    _, labels = load_dataset(path, "csv", ["x"], "kind")

    assert facts.num_classes == 2
    assert facts.class_names == ("setosa", "virginica")
    assert labels.tolist() == [1, 0, 1]


def test_csv_missing_columns_are_each_named(tmp_path):
    path = write_csv(tmp_path / "d.csv", IRIS_LIKE)

    with pytest.raises(InvalidArgument) as error:
        validate_dataset(path, "csv", ["sepal_length", "petal_length", "petal_width"], "genus")

    assert error.value.field_violations == (
        FieldViolation("schema.feature_columns", "column 'petal_length' is not in the CSV header"),
        FieldViolation("schema.feature_columns", "column 'petal_width' is not in the CSV header"),
        FieldViolation("schema.label_column", "column 'genus' is not in the CSV header"),
    )


@pytest.mark.parametrize(
    "text, words",
    [
        ("a,b,y\n1,2,0\n3,oops,1\n", "line 3, column 'b': 'oops' is not a number"),
        ("a,b,y\n1,2,0\n1,2,0\n4,5\n", "line 4: 2 fields, the header has 3"),
        ("a,b,y\n1,2,0\n1,nan,0\n", "line 3, column 'b': 'nan' is not a finite float32"),
        ("a,b,y\n1,2,0\n1,1e39,0\n", "is not a finite float32"),
        ("a,b,y\n1,2,\n", "line 2: label column 'y' is empty"),
        ("a,b,y\n", "no data rows"),
        ("", "CSV is empty"),
        ("a,a,y\n1,2,0\n", "names a column more than once: a"),
        ('a,b,y\n1,"2,0\n', "malformed CSV"),
    ],
    ids=[
        "not-a-number",
        "field-count",
        "nan",
        "overflow",
        "empty-label",
        "header-only",
        "empty",
        "duplicate-header",
        "unterminated-quote",
    ],
)
def test_csv_bad_content_is_reported_with_its_line(tmp_path, text, words):
    path = write_csv(tmp_path / "d.csv", text)

    with pytest.raises(InvalidArgument) as error:
        validate_dataset(path, "csv", ["a", "b"], "y")

    violation = only_violation(error)
    assert violation.field == "artifact"
    assert words in violation.description


def test_csv_that_is_not_utf8_is_invalid_argument(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"a,y\n\xff\xfe,1\n")
    with pytest.raises(InvalidArgument) as error:
        validate_dataset(path, "csv", ["a"], "y")
    assert "not UTF-8" in only_violation(error).description


def test_csv_validation_streams_the_file(tmp_path):
    path = tmp_path / "big.csv"
    with path.open("w") as out:
        out.write("a,b,c,d,y\n")
        out.writelines(f"0.5,0.25,1.0,2.0,{i % 4}\n" for i in range(200_000))
    assert path.stat().st_size > 3_000_000

    tracemalloc.start()
    try:
        facts = validate_dataset(path, "csv", ["a", "b", "c", "d"], "y")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (facts.row_count, facts.num_classes) == (200_000, 4)
    assert peak < 1_000_000, f"validation peaked at {peak} bytes for a 4 MB file"


@pytest.mark.parametrize(
    "format_name, features, label, field, words",
    [
        ("parquet", ["a"], "y", "format", "unknown dataset format 'parquet'"),
        ("csv", [], "y", "schema.feature_columns", "at least one is required"),
        ("csv", ["a", "a"], "y", "schema.feature_columns", "listed more than once: a"),
        ("csv", ["a", "y"], "y", "schema.label_column", "'y' is also a feature column"),
        ("csv", ["a"], "", "schema.label_column", "is required"),
    ],
)
def test_dataset_schema_is_checked_before_the_file(
    tmp_path, format_name, features, label, field, words
):
    path = write_csv(tmp_path / "d.csv", "a,y\n1,0\n")
    with pytest.raises(InvalidArgument) as error:
        validate_dataset(path, format_name, features, label)
    violation = only_violation(error)
    assert violation.field == field
    assert words in violation.description


# --- torch ---------------------------------------------------------------------------------


def test_torch_state_dict_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from maas_formats.torch_io import load_torch_state_dict, save_torch_package

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    path = tmp_path / "linear.safetensors"

    written = save_torch_package(path, make_manifest(), layer.state_dict())
    restored_state = load_torch_state_dict(path)
    restored = torch.nn.Linear(4, 3)
    restored.load_state_dict(restored_state)

    assert written.tensors == {
        "weight": WeightTensorSpec(dtype="F32", shape=[3, 4]),
        "bias": WeightTensorSpec(dtype="F32", shape=[3]),
    }
    assert validate_model_package(path).manifest == written
    for name, tensor in layer.state_dict().items():
        assert torch.equal(restored_state[name], tensor)
    probe = torch.randn(2, 4)
    assert torch.equal(restored(probe), layer(probe))


def test_torch_tied_weights_and_bf16_are_saved(tmp_path):
    torch = pytest.importorskip("torch")
    from maas_formats.torch_io import load_torch_package, save_torch_package

    shared = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    state = {"embed.weight": shared, "head.weight": shared, "head.bias": shared[0]}
    path = tmp_path / "tied.safetensors"

    written = save_torch_package(path, make_manifest(), state)
    manifest, restored = load_torch_package(path)

    assert manifest == written
    assert {n: s.dtype for n, s in written.tensors.items()} == dict.fromkeys(state, "BF16")
    for name, tensor in state.items():
        assert torch.equal(restored[name], tensor)
    # NumPy has no bfloat16: the numpy loader says so instead of failing obscurely.
    with pytest.raises(InvalidArgument) as error:
        load_model_package(path)
    assert "BF16, which NumPy cannot hold" in only_violation(error).description


def test_importing_maas_formats_needs_neither_torch_nor_grpc():
    code = (
        "import sys, maas_formats, maas_formats.torch_io\n"
        "print(sorted(m for m in ('torch', 'grpc') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
