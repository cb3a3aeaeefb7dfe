"""The decoupled generation model's Triton configuration: decoupled, one instance, no Triton
batching (the engine batches running streams itself), and the fixed generation I/O
(`text_input` and optional `sampling_parameters` in; `text_output`, `finish_reason` and
`usage` out). The model itself, loaded on a real Triton and streamed through tritonclient
(deltas then a final response with reason and usage, bad parameters answered
"INVALID_ARGUMENT: <field>: ...", the queue bound, cancelled streams freeing their slots), is
tested in tests/drills/test_generation_serving.py with the gateway's tests on one deployed
model."""

from __future__ import annotations

from maas_inference.triton.model_repository import (
    ArtifactFormat,
    TritonModelSpec,
    build_model_config,
)


def test_the_config_is_decoupled_with_one_instance_and_the_fixed_generation_io():
    config = build_model_config(TritonModelSpec(
        name="x", artifact_format=ArtifactFormat.GGUF, inputs=(), outputs=()))
    assert config.model_transaction_policy.decoupled
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [group.count for group in config.instance_group] == [1]
    assert [(i.name, i.optional) for i in config.input] == [("text_input", False),
                                                           ("sampling_parameters", True)]
    assert [o.name for o in config.output] == ["text_output", "finish_reason", "usage"]
    assert config.parameters["maas.artifact_path"].string_value == "model.gguf"
