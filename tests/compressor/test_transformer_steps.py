"""The encoder steps on the bundled all-MiniLM-L6-v2, called directly with a recording context:
an HF_TRANSFORMER zip loads as a torch encoder, convert exports the pooled normalized
embedding to ONNX (dynamic batch and sequence) that serves the same vectors, the int8 search
stores the MatMuls and the embedding tables in int8 within the cosine minimum, distillation
into 3 layers improves on the untrained student, and the measurements compare encoders."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from maas_compressor.hf_models import (
    RUNTIME_ONNXRUNTIME,
    RUNTIME_TORCH,
    corpus_sentences,
    embed,
    load_hf,
    mean_cosine,
    measure_encoder,
    probe_sentences,
    similarity_spearman,
    training_sentences,
    validation_sentences,
    weights_path,
)
from maas_compressor.measure import artifact_of
from maas_compressor.steps.base import DataSplits, HfForm, ModelUnderCompression
from maas_compressor.steps.convert import convert
from maas_compressor.steps.distill import distill
from maas_compressor.steps.quantize import quantize
from maas_compressor.steps.transformer import choose_student_layers
from maas_formats.safetensors_header import read_safetensors_header
from maas_runtime.contract_enums import MODEL_FORMAT_HF_TRANSFORMER
from maas_runtime.errors import FailedPrecondition, InvalidArgument
from maas_text import minilm_directory, zip_directory
from maas_text.encoder import SentenceEncoder
from transformers import AutoModel, AutoTokenizer

from tests.compressor.torch_helpers import RecordingContext

_NO_DATA = DataSplits(*(np.zeros((0, 1), np.float32) for _ in range(4)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def context(workdir: Path) -> RecordingContext:
    workdir.mkdir(parents=True, exist_ok=True)
    return RecordingContext(data=_NO_DATA, workdir=workdir)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> ModelUnderCompression:
    """MiniLM as the job stages it: the HF_TRANSFORMER zip, unzipped."""
    root = tmp_path_factory.mktemp("minilm")
    return load_hf(zip_directory(minilm_directory(), root / "source.zip"), root / "source")


@pytest.fixture(scope="module")
def reference(minilm: ModelUnderCompression) -> np.ndarray:
    assert isinstance(minilm.form, HfForm)
    return embed(minilm.form, probe_sentences())


@pytest.fixture(scope="module")
def converted(minilm: ModelUnderCompression, tmp_path_factory: pytest.TempPathFactory):
    ctx = context(tmp_path_factory.mktemp("convert"))
    return convert(minilm, {}, ctx), ctx


@pytest.fixture(scope="module")
def quantized(converted, tmp_path_factory: pytest.TempPathFactory):
    ctx = context(tmp_path_factory.mktemp("quantize"))
    return quantize(converted[0].model, {"dtype": "int8", "min_mean_cosine": 0.99}, ctx)


def test_the_corpus_splits_into_disjoint_training_and_probe_sentences():
    corpus, training, probe = corpus_sentences(), training_sentences(), probe_sentences()
    assert len(corpus) > 1500
    assert len(probe) == 64
    assert not set(probe) & set(training)


def test_an_hf_transformer_zip_loads_as_a_torch_encoder_and_zips_back_with_its_tokenizer(
        minilm: ModelUnderCompression, tmp_path: Path):
    assert isinstance(minilm.form, HfForm) and minilm.form.runtime == RUNTIME_TORCH
    assert minilm.signature.outputs[0].shape == (384,)
    artifact, format_name = artifact_of(minilm, tmp_path)
    assert format_name == MODEL_FORMAT_HF_TRANSFORMER
    with zipfile.ZipFile(artifact) as archive:
        assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(archive.namelist())


def test_convert_exports_the_pooled_normalized_embedding_with_dynamic_batch_and_sequence(
        converted, minilm: ModelUnderCompression):
    result, _ = converted
    form = result.model.form
    assert isinstance(form, HfForm) and form.runtime == RUNTIME_ONNXRUNTIME
    assert not (form.directory / "model.safetensors").exists()
    assert (form.directory / "tokenizer.json").exists()
    graph = onnx.load(str(weights_path(form)), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    output_dims = graph.output[0].type.tensor_type.shape.dim
    assert len(output_dims) == 2 and output_dims[0].dim_param and output_dims[1].dim_value == 384
    assert all(dim.dim_param for dim in graph.input[0].type.tensor_type.shape.dim)
    assert result.details["mean_cosine"] >= 0.9999
    assert result.details["max_abs_difference"] < 1e-4
    # Served through maas_text's onnxruntime path, any batch and length gives torch's vectors.
    texts = ["short", "a considerably longer sentence that pads the others in its batch", "x y z"]
    assert isinstance(minilm.form, HfForm)
    onnx_vectors = SentenceEncoder.load(form.directory).embed(texts)
    torch_vectors = SentenceEncoder.load(minilm.form.directory).embed(texts)
    assert np.allclose(onnx_vectors, torch_vectors, atol=1e-4)
    assert np.allclose(np.linalg.norm(onnx_vectors, axis=1), 1.0, atol=1e-5)


def test_int8_stores_matmuls_and_embedding_tables_in_int8_within_the_cosine_minimum(
        quantized, converted, reference: np.ndarray):
    form = quantized.model.form
    assert isinstance(form, HfForm) and form.runtime == RUNTIME_ONNXRUNTIME
    graph = onnx.load(str(weights_path(form))).graph
    # onnxruntime stores a Gather's table as uint8 (asymmetric), a MatMul's weight as int8.
    eight_bit = {i.name for i in graph.initializer if len(i.dims) == 2
                 and i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in eight_bit]
    matmuls = [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] in eight_bit]
    tables = {i.name: list(i.dims) for i in graph.initializer if i.name in {n.input[0] for n in gathers}}
    assert [30522, 384] in tables.values()
    assert not [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                and list(i.dims) == [30522, 384]]
    assert len(matmuls) >= 30
    fp32_bytes = weights_path(converted[0].model.form).stat().st_size
    assert weights_path(form).stat().st_size * 2 <= fp32_bytes
    assert quantized.details["size_ratio"] <= 0.5
    assert mean_cosine(reference, embed(form, probe_sentences())) >= 0.99
    assert quantized.details["mean_cosine"] >= 0.99


def test_quantize_refuses_an_already_int8_encoder_and_a_dtype_encoders_do_not_take(quantized, tmp_path):
    with pytest.raises(FailedPrecondition, match="already quantized"):
        quantize(quantized.model, {"dtype": "int8"}, context(tmp_path))
    with pytest.raises(InvalidArgument) as error:
        quantize(quantized.model, {"dtype": "int4"}, context(tmp_path))
    assert error.value.field_violations[0].field == "dtype"


@pytest.fixture(scope="module")
def torch_int8(minilm: ModelUnderCompression, tmp_path_factory: pytest.TempPathFactory):
    ctx = context(tmp_path_factory.mktemp("torch-int8"))
    return quantize(minilm, {"dtype": "int8", "format": "torch", "min_mean_cosine": 0.99}, ctx)


def test_torch_int8_stores_every_linear_and_embedding_table_int8_within_the_cosine_minimum(
        torch_int8, minilm: ModelUnderCompression, reference: np.ndarray):
    form = torch_int8.model.form
    assert isinstance(form, HfForm) and form.runtime == RUNTIME_TORCH
    header = read_safetensors_header(weights_path(form))
    int8_tensors = {name for name, entry in header.tensors.items() if entry.dtype == "I8"}
    assert "embeddings.word_embeddings.weight_int8" in int8_tensors
    assert len(int8_tensors) == 6 * 6 + 1 + 3  # every Linear (6 a layer, the pooler), 3 tables
    assert not any(entry.dtype == "F32" and len(entry.shape) == 2 and entry.shape[0] >= 384
                   for entry in header.tensors.values())  # no float matrix left
    assert torch_int8.details["format"] == "torch" and torch_int8.details["layers_kept_in_float"] == []
    assert torch_int8.details["size_ratio"] <= 0.3
    assert weights_path(form).stat().st_size <= 0.3 * weights_path(minilm.form).stat().st_size
    assert torch_int8.details["mean_cosine"] >= 0.99
    assert mean_cosine(reference, embed(form, probe_sentences())) >= 0.99
    assert SentenceEncoder.load(form.directory).backend == "torch"


def test_a_stricter_minimum_keeps_the_most_sensitive_roles_in_float(minilm: ModelUnderCompression,
                                                                     tmp_path: Path, reference: np.ndarray):
    result = quantize(minilm, {"dtype": "int8", "format": "torch", "min_mean_cosine": 0.995},
                      context(tmp_path))
    details, form = result.details, result.model.form
    kept = details["layers_kept_in_float"]
    assert kept and details["mean_cosine"] >= 0.995
    assert max(details["sensitivity"], key=details["sensitivity"].get) in {
        re.sub(r"\.layer\.\d+\.", ".layer.*.", name) for name in kept}
    header = read_safetensors_header(weights_path(form))
    dtypes = {name: entry.dtype for name, entry in header.tensors.items()}
    assert all(dtypes[f"{name}.weight"] == "F32" and f"{name}.weight_int8" not in dtypes for name in kept)
    assert mean_cosine(reference, embed(form, probe_sentences())) >= 0.995


def test_an_int8_torch_encoder_is_a_result_that_no_step_takes_again(torch_int8, tmp_path: Path):
    for step, params in ((quantize, {"dtype": "int8", "format": "torch"}), (quantize, {"dtype": "int8"}),
                         (convert, {}), (distill, {})):
        with pytest.raises(FailedPrecondition) as error:
            step(torch_int8.model, params, context(tmp_path))
        assert error.value.reason == "ALREADY_QUANTIZED"


def test_torch_int8_refuses_bad_parameters_and_an_onnx_source(minilm: ModelUnderCompression, converted,
                                                              tmp_path: Path):
    for params, field in (({"dtype": "int8", "format": "tflite"}, "format"),
                          ({"dtype": "int8", "format": "torch", "per_channel": False}, "per_channel"),
                          ({"dtype": "int8", "format": "torch", "min_mean_cosine": 1.5}, "min_mean_cosine"),
                          ({"dtype": "fp16", "format": "torch"}, "dtype")):
        with pytest.raises(InvalidArgument) as error:
            quantize(minilm, params, context(tmp_path))
        assert error.value.field_violations[0].field == field
    with pytest.raises(FailedPrecondition) as refused:
        quantize(converted[0].model, {"dtype": "int8", "format": "torch"}, context(tmp_path))
    assert refused.value.reason == "STEP_NEEDS_TORCH_MODEL"


def test_distillation_into_three_layers_improves_on_the_untrained_student(
        minilm: ModelUnderCompression, tmp_path: Path, reference: np.ndarray):
    result = distill(minilm, {"layers": [1, 3, 5], "epochs": 1, "training_sentences": 256,
                              "learning_rate": 2e-4, "docstring_share": 0}, context(tmp_path))
    form = result.model.form
    assert isinstance(form, HfForm) and form.runtime == RUNTIME_TORCH
    assert result.details["spearman"] > result.details["spearman_untrained"]
    assert result.details["validation_spearman"] > result.details["validation_spearman_untrained"]
    assert result.details["steps"] == 8 and result.details["teacher_layers_kept"] == [1, 3, 5]
    student = SentenceEncoder.load(form.directory)
    vectors = student.embed(probe_sentences())
    assert similarity_spearman(reference, vectors) == pytest.approx(result.details["spearman"], abs=1e-3)
    assert (form.directory / "tokenizer.json").exists()
    import json
    assert json.loads((form.directory / "config.json").read_text())["num_hidden_layers"] == 3


def test_the_student_keeps_the_teacher_layers_whose_untrained_student_ranks_best(
        minilm: ModelUnderCompression):
    assert isinstance(minilm.form, HfForm)
    teacher = AutoModel.from_pretrained(str(minilm.form.directory), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm.form.directory), local_files_only=True)
    sentences = validation_sentences(24)
    batch = dict(tokenizer(sentences, padding=True, truncation=True, return_tensors="pt"))
    expected = embed(minilm.form, sentences)
    layers, scores = choose_student_layers(teacher, "mean", batch, expected)
    assert len(scores) == 20  # every 3 of 6 layers
    assert scores[",".join(map(str, layers))] == max(scores.values())
    assert scores["0,1,2"] < max(scores.values())  # not simply the first half of the teacher


def test_distill_refuses_layers_the_teacher_does_not_have_and_an_onnx_teacher(
        minilm: ModelUnderCompression, converted, tmp_path: Path):
    with pytest.raises(InvalidArgument) as error:
        distill(minilm, {"layers": [0, 7]}, context(tmp_path))
    assert error.value.field_violations[0].field == "layers"
    for field, value in (("docstring_share", 1), ("docstring_share", 1.5), ("docstring_share", -0.1),
                         ("docstring_share", "half"), ("dropout", 1), ("dropout", -0.5), ("dropout", True)):
        with pytest.raises(InvalidArgument) as error:
            distill(minilm, {field: value}, context(tmp_path))
        assert error.value.field_violations[0].field == field
    with pytest.raises(FailedPrecondition, match="torch"):
        distill(converted[0].model, {}, context(tmp_path))


def test_measure_encoder_reports_size_latency_cosine_and_spearman(quantized, reference, tmp_path):
    form = quantized.model.form
    measured = measure_encoder(form, reference, probe_sentences(), tmp_path, repeats=1,
                               thread_counts=(1,))
    assert measured.runtime == RUNTIME_ONNXRUNTIME
    assert 0 < measured.weights_bytes < measured.artifact_bytes
    assert set(measured.latency_ms) == {"b1_t1", "b32_t1"}
    assert all(value > 0 for value in measured.latency_ms.values())
    assert 0.99 <= measured.mean_cosine <= 1.0 + 1e-6
    assert 0.9 < measured.similarity_spearman <= 1.0
