"""Sampling parameters are checked strictly: every bad value, and unknown keys, are refused
naming the field, as the Triton model answers them ("INVALID_ARGUMENT: <field>: ...")."""

from __future__ import annotations

import pytest
from maas_llm.sampling import MAX_STOP_STRINGS, SamplingParams
from maas_runtime.errors import InvalidArgument


def test_an_empty_object_gives_the_defaults_and_values_round_trip():
    assert SamplingParams.from_json("") == SamplingParams()
    params = SamplingParams.from_json(
        '{"max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 3, "stop": ["\\n"], '
        '"seed": 7, "repetition_penalty": 1.2}'
    )
    assert params.greedy and params.max_tokens == 5 and params.stop == ("\n",) and params.seed == 7
    assert SamplingParams.from_json(params.to_json()) == params


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ('{"max_tokens": 0}', "max_tokens"),
        ('{"max_tokens": 1.5}', "max_tokens"),
        ('{"max_tokens": true}', "max_tokens"),
        ('{"temperature": -0.1}', "temperature"),
        ('{"temperature": "hot"}', "temperature"),
        ('{"top_p": 0}', "top_p"),
        ('{"top_p": 1.5}', "top_p"),
        ('{"top_k": -1}', "top_k"),
        ('{"seed": -3}', "seed"),
        ('{"repetition_penalty": 0}', "repetition_penalty"),
        ('{"stop": [""]}', "stop"),
        ('{"stop": [1]}', "stop"),
        ('{"stop": ' + str(["x"] * (MAX_STOP_STRINGS + 1)).replace("'", '"') + "}", "stop"),
        ('{"temprature": 0.5}', "temprature"),
        ("[1, 2]", "sampling_parameters"),
        ("{not json", "sampling_parameters"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(document, field):
    with pytest.raises(InvalidArgument) as caught:
        SamplingParams.from_json(document)
    assert caught.value.field_violations[0].field == field
    assert caught.value.message.startswith(f"{field}: ")


def test_non_utf8_parameters_are_refused():
    with pytest.raises(InvalidArgument) as caught:
        SamplingParams.from_json(b"\xff\xfe{}")
    assert caught.value.field_violations[0].field == "sampling_parameters"
