"""The GGUF header is read as data: the shipped SmolLM2 file's facts, and every kind of damaged,
truncated or hostile file refused with INVALID_ARGUMENT (reason GGUF_INVALID) naming the problem."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from gguf import GGUFReader
from maas_formats import validate_model_artifact
from maas_llm.gguf import read_gguf_header
from maas_llm.models import smollm2_gguf_path
from maas_runtime.errors import InvalidArgument


def gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(*, version: int = 3, entries: bytes = b"", entry_count: int = 0,
               tensors: bytes = b"", tensor_count: int = 0, data: bytes = b"") -> bytes:
    """A hand-built GGUF file, for headers no correct writer would emit."""
    header = b"GGUF" + struct.pack("<IQQ", version, tensor_count, entry_count) + entries + tensors
    padding = b"\x00" * (-len(header) % 32)
    return header + padding + data


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(InvalidArgument) as caught:
        read_gguf_header(path)
    assert caught.value.reason == "GGUF_INVALID"
    assert caught.value.field_violations[0].field == "artifact"
    return caught.value.message


def test_the_shipped_smollm2_header_gives_architecture_context_vocabulary_and_quantization():
    header = read_gguf_header(smollm2_gguf_path())
    assert header.architecture == "llama"
    assert header.context_length == 8192
    assert header.vocabulary_size == 49152
    assert header.file_type == "MOSTLY_Q4_1"
    assert header.chat_template.startswith("{% for message in messages %}")
    assert "<|im_start|>" in header.chat_template
    assert header.parameter_count == 134_515_008
    facts = header.facts()
    assert facts["chat_template"] == "present" and facts["quantization"] == "MOSTLY_Q4_1"


def test_the_header_agrees_with_the_gguf_packages_own_reader():
    path = smollm2_gguf_path()
    header = read_gguf_header(path)
    reference = GGUFReader(path)
    assert len(header.tensors) == len(reference.tensors)
    for ours, theirs in zip(header.tensors, reference.tensors, strict=True):
        assert ours.name == theirs.name
        assert ours.element_count == int(theirs.n_elements)
        assert ours.byte_length == int(theirs.n_bytes)
        assert header.data_offset + ours.offset == int(theirs.data_offset)
    assert set(header.metadata) == {key for key in reference.fields if not key.startswith("GGUF.")}


@pytest.mark.parametrize("cut", [3, 10, 30, 5_000, 1_000_000, 98_000_000])
def test_a_truncated_file_is_refused_at_any_length(tmp_path, cut):
    with open(smollm2_gguf_path(), "rb") as source:
        path = write(tmp_path, source.read(cut))
    message = refusal(path)
    assert "truncated" in message or "magic" in message


def test_bytes_that_are_not_gguf_are_refused_on_the_magic(tmp_path):
    assert "magic bytes 'GGUF'" in refusal(write(tmp_path, b"PK\x03\x04 not a gguf at all" * 10))
    assert "magic" in refusal(write(tmp_path, b""))


def test_an_unknown_version_is_refused(tmp_path):
    assert "version 7 is not supported" in refusal(write(tmp_path, gguf_bytes(version=7)))


def test_counts_beyond_the_limits_are_refused_before_anything_is_allocated(tmp_path):
    assert "tensors (limit" in refusal(write(tmp_path, gguf_bytes(tensor_count=2**60)))
    assert "metadata entries (limit" in refusal(write(tmp_path, gguf_bytes(entry_count=2**40)))
    huge_string = gguf_string("k") + struct.pack("<I", 8) + struct.pack("<Q", 2**62)
    assert "claims" in refusal(write(tmp_path, gguf_bytes(entries=huge_string, entry_count=1)))
    huge_array = gguf_string("k") + struct.pack("<IIQ", 9, 4, 2**50)
    assert "elements (limit" in refusal(write(tmp_path, gguf_bytes(entries=huge_array, entry_count=1)))


def test_an_unknown_value_type_and_a_repeated_key_are_refused(tmp_path):
    unknown = gguf_string("general.name") + struct.pack("<I", 99)
    assert "unknown value type 99" in refusal(write(tmp_path, gguf_bytes(entries=unknown, entry_count=1)))
    entry = gguf_string("general.name") + struct.pack("<I", 8) + gguf_string("x")
    assert "appears twice" in refusal(write(tmp_path, gguf_bytes(entries=entry * 2, entry_count=2)))


def test_a_key_that_is_not_utf8_is_refused(tmp_path):
    entry = struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<I", 4) + struct.pack("<I", 1)
    assert "not valid UTF-8" in refusal(write(tmp_path, gguf_bytes(entries=entry, entry_count=1)))


def test_a_tensor_whose_data_runs_past_the_end_of_the_file_is_refused(tmp_path):
    # One F32 tensor of 1024 elements (4096 bytes) but only 16 bytes of data.
    tensor = gguf_string("w") + struct.pack("<I", 1) + struct.pack("<Q", 1024) + struct.pack("<IQ", 0, 0)
    path = write(tmp_path, gguf_bytes(tensors=tensor, tensor_count=1, data=b"\x00" * 16))
    assert "runs past the end" in refusal(path)


def test_a_small_well_formed_file_reads_back_its_metadata_and_tensors(tmp_path):
    entries = (gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")
               + gguf_string("llama.context_length") + struct.pack("<II", 4, 256))
    tensor = gguf_string("w") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 2) + struct.pack("<IQ", 0, 0)
    path = write(tmp_path, gguf_bytes(entries=entries, entry_count=2, tensors=tensor, tensor_count=1,
                                      data=b"\x00" * 32))
    header = read_gguf_header(path)
    assert header.architecture == "llama" and header.context_length == 256
    assert header.parameter_count == 8 and header.tensors[0].type_name == "F32"


def test_the_registry_validator_records_the_header_as_gguf_labels():
    facts = validate_model_artifact(smollm2_gguf_path(), "gguf")
    assert facts.format_name == "gguf"
    assert facts.parameter_count == 134_515_008
    assert facts.labels["gguf.architecture"] == "llama"
    assert facts.labels["gguf.context_length"] == "8192"
    assert facts.labels["gguf.vocabulary_size"] == "49152"
    assert facts.labels["gguf.quantization"] == "MOSTLY_Q4_1"
    assert facts.labels["gguf.chat_template"] == "present"
    assert all(len(value) <= 63 for value in facts.labels.values())


def test_a_gguf_declared_as_onnx_is_a_format_mismatch_naming_both():
    with pytest.raises(InvalidArgument) as caught:
        validate_model_artifact(smollm2_gguf_path(), "onnx")
    assert caught.value.reason == "FORMAT_MISMATCH"
    assert caught.value.metadata == {"declared_format": "onnx", "artifact_format": "gguf"}
