"""maas_text.int8: MiniLM stored with int8 Linear layers and embedding tables, loaded back.

One int8 directory is written per module from the bundled MiniLM (every Linear layer and
embedding table quantized); the tests load it through `SentenceEncoder` as serving does and
hold it to the float encoder's embeddings, then tamper with copies of it: every disagreement
between the manifest, the module tree and the tensors is INVALID_ARGUMENT naming the directory,
before anything is served.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from maas_formats.safetensors_header import read_safetensors_header
from maas_runtime.errors import InvalidArgument
from maas_text import HfDirectory, SentenceEncoder, minilm_directory
from maas_text.int8 import (
    EMBEDDING,
    LINEAR,
    QUANTIZATION_FILE,
    SCHEME,
    quantizable_layers,
    quantize_rows,
    save_int8,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModel

SENTENCES = ["A man is eating food.", "A man eats a meal.", "The stock market fell sharply today.",
             "Une phrase en français, avec des accents: déjà vu."]
KEPT_IN_FLOAT = "encoder.layer.0.output.dense"


@pytest.fixture(scope="module")
def float_encoder() -> SentenceEncoder:
    return SentenceEncoder.load(minilm_directory(), threads=1)


@pytest.fixture(scope="module")
def layers() -> dict[str, str]:
    return quantizable_layers(AutoModel.from_pretrained(str(minilm_directory()), local_files_only=True))


@pytest.fixture(scope="module")
def int8_directory(tmp_path_factory, layers) -> Path:
    """MiniLM with every Linear layer and embedding table int8 except one FFN output layer."""
    target = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(minilm_directory(), target)
    model = AutoModel.from_pretrained(str(target), local_files_only=True)
    save_int8(model, [name for name in layers if name != KEPT_IN_FLOAT], target)
    return target


def _copy(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def test_every_linear_layer_and_embedding_table_is_a_quantizable_layer(layers):
    assert layers["embeddings.word_embeddings"] == EMBEDDING
    assert layers["encoder.layer.5.intermediate.dense"] == LINEAR
    assert sum(kind == LINEAR for kind in layers.values()) == 6 * 6 + 1  # 6 per layer, pooler
    assert sum(kind == EMBEDDING for kind in layers.values()) == 3


def test_rows_are_symmetric_int8_with_the_largest_magnitude_at_127():
    weight = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -3.0]])
    values, scale = quantize_rows(weight)

    assert values.dtype == torch.int8 and scale.dtype == torch.float32
    assert values[0].tolist() == [64, -127, 32] and values[2].tolist() == [127, 64, -127]
    assert values[1].tolist() == [0, 0, 0] and float(scale[1]) > 0  # an all-zero row stays finite
    assert torch.allclose(values.float() * scale[:, None], weight, atol=float(scale.max()) / 2)


def test_the_directory_stores_int8_rows_and_a_manifest_and_is_a_quarter_of_the_bytes(int8_directory, layers):
    manifest = json.loads((int8_directory / QUANTIZATION_FILE).read_text())
    header = read_safetensors_header(int8_directory / "model.safetensors")
    dtypes = {name: entry.dtype for name, entry in header.tensors.items()}

    assert manifest["scheme"] == SCHEME
    assert set(manifest["layers"]) == set(layers) - {KEPT_IN_FLOAT}
    assert dtypes["embeddings.word_embeddings.weight_int8"] == "I8"
    assert dtypes["embeddings.word_embeddings.weight_scale"] == "F32"
    assert "embeddings.word_embeddings.weight" not in dtypes
    assert dtypes[f"{KEPT_IN_FLOAT}.weight"] == "F32" and f"{KEPT_IN_FLOAT}.weight_int8" not in dtypes
    assert dtypes["encoder.layer.3.attention.self.query.bias"] == "F32"
    float_bytes = (minilm_directory() / "model.safetensors").stat().st_size
    assert (int8_directory / "model.safetensors").stat().st_size < 0.3 * float_bytes
    checked = HfDirectory.open(int8_directory)
    assert checked.int8_layers == manifest["layers"] and checked.facts()["quantization"] == SCHEME
    assert "quantization" not in HfDirectory.open(minilm_directory()).facts()


def test_the_int8_encoder_embeds_within_cosine_099_of_the_float_one(int8_directory, float_encoder):
    encoder = SentenceEncoder.load(int8_directory, threads=1)
    expected, actual = float_encoder.embed(SENTENCES), encoder.embed(SENTENCES)

    assert encoder.backend == "torch"
    assert actual.shape == expected.shape and actual.dtype == np.float32
    assert np.allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(actual * expected, axis=1)
    assert cosines.min() >= 0.98 and cosines.mean() >= 0.99
    similarity = actual @ actual.T
    assert similarity[0, 1] > similarity[0, 2] + 0.4  # int8 still ranks the paraphrase first


def test_loading_leaves_the_process_wide_quantized_engine_as_it_was(int8_directory):
    before = torch.backends.quantized.engine
    SentenceEncoder.load(int8_directory, threads=1)
    assert torch.backends.quantized.engine == before


def _rewrite_manifest(value: object) -> Callable[[Path], None]:
    def rewrite(directory: Path) -> None:
        text = value if isinstance(value, str) else json.dumps(value)
        (directory / QUANTIZATION_FILE).write_text(text)
    return rewrite


def _rewrite_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def rewrite(directory: Path) -> None:
        tensors = load_file(str(directory / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(directory / "model.safetensors"))
    return rewrite


def _set(name: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__setitem__(name, value)


def _pop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__delitem__(name)


QUERY = "encoder.layer.2.attention.self.query"
MANIFEST_CASES = {
    "not-json": (_rewrite_manifest("{layers"), "not valid JSON"),
    "other-scheme": (_rewrite_manifest({"scheme": "int4-blocks", "layers": {QUERY: LINEAR}}),
                     "scheme 'int4-blocks'"),
    "no-layers": (_rewrite_manifest({"scheme": SCHEME, "layers": {}}), "layers must map"),
    "unknown-kind": (_rewrite_manifest({"scheme": SCHEME, "layers": {QUERY: "conv"}}), "layers must map"),
}
TENSOR_CASES = {
    "no-such-layer": (_rewrite_manifest({"scheme": SCHEME,
                                         "layers": {"encoder.layer.9.output.dense": LINEAR}}),
                      "no such layer"),
    "wrong-kind": (_rewrite_manifest({"scheme": SCHEME, "layers": {"embeddings.word_embeddings": LINEAR}}),
                   "no such layer"),
    "int8-missing": (_rewrite_tensors(_pop(f"{QUERY}.weight_int8")), "lacks"),
    "float-not-int8": (_rewrite_tensors(_set(f"{QUERY}.weight_int8", torch.zeros(384, 384))),
                       "int8 [384, 384]"),
    "wrong-shape": (_rewrite_tensors(_set(f"{QUERY}.weight_int8", torch.zeros(384, 383, dtype=torch.int8))),
                    "int8 [384, 384]"),
    "zero-scale": (_rewrite_tensors(_set(f"{QUERY}.weight_scale", torch.zeros(384))), "positive and finite"),
    "nan-scale": (_rewrite_tensors(_set(f"{QUERY}.weight_scale", torch.full((384,), float("nan")))),
                  "positive and finite"),
    "bias-missing": (_rewrite_tensors(_pop(f"{QUERY}.bias")), f"{QUERY}.bias"),
    "float-tensor-missing": (_rewrite_tensors(_pop("encoder.layer.1.output.LayerNorm.weight")), "missing"),
    "unexpected-tensor": (_rewrite_tensors(_set("encoder.layer.1.extra", torch.zeros(2))), "unexpected"),
    "float-tensor-reshaped": (_rewrite_tensors(_set("encoder.layer.1.output.LayerNorm.weight",
                                                    torch.zeros(3))), "does not match"),
}


def _assert_tampered_copy_refused(int8_directory: Path, tmp_path: Path,
                                  case: tuple[Callable[[Path], None], str],
                                  load: Callable[[Path], object]) -> None:
    """`load` of a copy of the int8 directory changed by the case's tamper raises
    INVALID_ARGUMENT naming the directory, with the case's words."""
    tamper, words = case
    directory = _copy(int8_directory, tmp_path)
    tamper(directory)
    with pytest.raises(InvalidArgument) as error:
        load(directory)
    assert error.value.field_violations[0].field == "directory"
    assert words in error.value.field_violations[0].description
    assert error.value.reason == "INT8_ENCODER_INVALID"


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=list(MANIFEST_CASES))
def test_a_bad_manifest_is_refused_when_the_directory_is_opened(int8_directory, tmp_path, case):
    _assert_tampered_copy_refused(int8_directory, tmp_path, MANIFEST_CASES[case], HfDirectory.open)


@pytest.mark.parametrize("case", TENSOR_CASES, ids=list(TENSOR_CASES))
def test_tensors_that_disagree_with_the_manifest_are_refused_when_loaded(int8_directory, tmp_path, case):
    _assert_tampered_copy_refused(int8_directory, tmp_path, TENSOR_CASES[case],
                                  lambda directory: SentenceEncoder.load(directory, threads=1))


def test_save_int8_refuses_a_layer_that_is_neither_linear_nor_an_embedding(tmp_path):
    model = AutoModel.from_pretrained(str(minilm_directory()), local_files_only=True)
    with pytest.raises(ValueError, match="encoder.layer.0.output.LayerNorm"):
        save_int8(model, ["encoder.layer.0.output.LayerNorm"], tmp_path)
    assert not list(tmp_path.iterdir())
