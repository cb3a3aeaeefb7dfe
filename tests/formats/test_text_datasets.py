"""Text CSV datasets: one UTF-8 text column and a label, bounded, each problem named by line.

The registry validates uploads with these checks and the trainer loads the same file with
`load_text_dataset`, so a text dataset that validated loads into the same rows and classes.
"""

from __future__ import annotations

import numpy as np
import pytest
from maas_formats import (
    TEXT_CSV,
    datasets as datasets_module,
    load_dataset,
    load_text_dataset,
    validate_dataset,
)
from maas_runtime.errors import InvalidArgument


def _write(tmp_path, content: bytes | str, name: str = "texts.csv"):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _violation(error: pytest.ExceptionInfo[InvalidArgument]) -> tuple[str, str]:
    (violation,) = error.value.field_violations
    return violation.field, violation.description


def test_a_text_csv_is_measured_as_one_string_per_row_with_named_classes(tmp_path):
    path = _write(tmp_path, 'text,label\n"Hello, world",greeting\nbye now,farewell\n'
                            '"a quoted\nline break",greeting\n')
    facts = validate_dataset(path, TEXT_CSV, ["text"], "label")
    assert (facts.row_count, facts.feature_shape, facts.num_classes) == (3, (), 2)
    assert facts.class_names == ("farewell", "greeting")
    texts, labels, names = load_text_dataset(path, "text", "label")
    assert texts == ["Hello, world", "bye now", "a quoted\nline break"]
    assert labels.tolist() == [1, 0, 1] and labels.dtype == np.int64
    assert names == ("farewell", "greeting")


def test_integer_labels_stay_class_indices(tmp_path):
    path = _write(tmp_path, "label,text\n2,x\n0,y\n")
    _texts, labels, names = load_text_dataset(path, "text", "label")
    assert labels.tolist() == [2, 0] and names == ()


def test_a_missing_text_column_is_named_in_the_schema(tmp_path):
    path = _write(tmp_path, "body,label\nhello,a\n")
    with pytest.raises(InvalidArgument) as error:
        validate_dataset(path, TEXT_CSV, ["text"], "label")
    field, description = _violation(error)
    assert field == "schema.feature_columns" and "'text' is not in the CSV header" in description


def test_a_text_dataset_names_exactly_one_text_column(tmp_path):
    path = _write(tmp_path, "a,b,label\nx,y,1\n")
    with pytest.raises(InvalidArgument) as error:
        validate_dataset(path, TEXT_CSV, ["a", "b"], "label")
    field, description = _violation(error)
    assert field == "schema.feature_columns" and "exactly one feature column" in description


@pytest.mark.parametrize(("content", "words", "reason"), [
    (b"text,label\nfine,a\n   ,b\n", "line 3: text column 'text' is empty", "EMPTY_TEXT"),
    (b"text,label\nfine,a\ncaf\xe9 latin-1,b\n", "line 3, column 'text': not UTF-8 text",
     "NOT_UTF8"),
    (b"text,label\nfine,\xff\xfe\n", "line 2, column 'label': not UTF-8 text", "NOT_UTF8"),
])
def test_bad_rows_are_refused_naming_line_and_column(tmp_path, content, words, reason):
    path = _write(tmp_path, content)
    with pytest.raises(InvalidArgument) as error:
        validate_dataset(path, TEXT_CSV, ["text"], "label")
    field, description = _violation(error)
    assert field == "artifact" and words in description
    assert error.value.reason == reason


def test_row_count_and_text_length_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_module, "MAX_TEXT_ROWS", 3)
    monkeypatch.setattr(datasets_module, "MAX_TEXT_CHARACTERS", 10)
    rows = _write(tmp_path, "text,label\n" + "".join(f"t{i},a\n" for i in range(4)))
    with pytest.raises(InvalidArgument) as error:
        validate_dataset(rows, TEXT_CSV, ["text"], "label")
    assert error.value.reason == "TOO_MANY_ROWS" and "more than 3 rows" in _violation(error)[1]
    long_text = _write(tmp_path, "text,label\n" + "x" * 11 + ",a\n", "long.csv")
    with pytest.raises(InvalidArgument) as error:
        load_text_dataset(long_text, "text", "label")
    assert error.value.reason == "TEXT_TOO_LONG"
    assert "line 2, column 'text': 11 characters; the limit is 10" in _violation(error)[1]


def test_the_default_row_limit_is_enforced_on_a_real_file(tmp_path):
    limit = datasets_module.MAX_TEXT_ROWS
    path = _write(tmp_path, "text,label\n" + "w,a\n" * (limit + 1))
    with pytest.raises(InvalidArgument) as error:
        validate_dataset(path, TEXT_CSV, ["text"], "label")
    assert error.value.reason == "TOO_MANY_ROWS"


def test_numeric_loading_refuses_a_text_dataset(tmp_path):
    path = _write(tmp_path, "text,label\nhello,a\n")
    with pytest.raises(InvalidArgument) as error:
        load_dataset(path, TEXT_CSV, ["text"], "label")
    assert _violation(error)[0] == "format"
