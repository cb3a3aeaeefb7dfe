"""Generation checks that need no Triton: request validation with field paths (before any
model is reached), fitting a prompt to the context, the prompt rendered from a generative
version's artifact (the real SmolLM2 chat template and tokenizer), the request the gateway
sends the Triton model, and how the model's responses and errors are read. Everything that
involves Triton is asserted against the real model in tests/drills/test_generation_serving.py
(and its fast smoke, tests/inference/test_generation_smoke.py).
"""

from __future__ import annotations

import json
import struct

import pytest
from maas.inference.v1 import inference_service_pb2 as inf
from maas_inference.generation import (
    GenerationLimits,
    GenerationRequest,
    fit_to_context,
    load_prompt_facts,
    model_error,
    read_model_step,
    sampling_parameters,
    triton_generate_request,
    validate_sampling,
)
from maas_inference.openai_http import error_response, generation_request
from maas_inference.routing import ServedModel
from maas_inference.tensors import ServingSignature
from maas_llm.prompts import ChatMessage
from maas_runtime import errors
from maas_runtime.messages import parse_request
from tritonclient.grpc import service_pb2

from tests.support.llm import smollm2_causal_lm_zip

LIMITS = GenerationLimits()
CONTEXT = 64


def violated_fields(caught: pytest.ExceptionInfo) -> list[str]:
    return [v.field for v in caught.value.field_violations]


@pytest.mark.parametrize(("fields", "field_path"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"stop": ("a", "b", "c", "d", "e")}, "stop"),
    ({"stop": ("x" * 65,)}, "stop[0]"),
    ({"stop": ("",)}, "stop[0]"),
    ({"prompt": None, "messages": ()}, "conversation.messages"),
    ({"prompt": None, "messages": (ChatMessage("robot", "hi"),)},
     "conversation.messages[0].role"),
])
def test_bad_requests_are_invalid_argument_naming_the_field(fields, field_path):
    request = GenerationRequest("deployments/chat", **{"prompt": "hello", **fields})
    with pytest.raises(errors.InvalidArgument) as caught:
        validate_sampling(request, LIMITS)
    assert field_path in violated_fields(caught)


def test_every_offending_field_is_named_at_once():
    request = GenerationRequest("deployments/chat", prompt="", max_tokens=0, temperature=-1)
    with pytest.raises(errors.InvalidArgument) as caught:
        validate_sampling(request, LIMITS)
    assert violated_fields(caught) == ["prompt", "max_tokens", "temperature"]


def test_a_good_request_passes():
    validate_sampling(GenerationRequest(
        "deployments/chat", messages=(ChatMessage("system", "Be brief."),
                                      ChatMessage("user", "Hello")),
        max_tokens=8, temperature=0, top_p=0.9, top_k=40, stop=("\n",), seed=7,
        repetition_penalty=1.1), LIMITS)


def test_the_prompt_must_leave_room_in_the_context_and_max_tokens_must_fit_it():
    prompt = GenerationRequest("deployments/chat", prompt="x")
    with pytest.raises(errors.InvalidArgument) as caught:
        fit_to_context(prompt, CONTEXT, CONTEXT, LIMITS)
    assert violated_fields(caught) == ["prompt"] and caught.value.reason == "PROMPT_TOO_LONG"
    conversation = GenerationRequest("deployments/chat",
                                     messages=(ChatMessage("user", "x"),))
    with pytest.raises(errors.InvalidArgument) as caught:
        fit_to_context(conversation, CONTEXT + 5, CONTEXT, LIMITS)
    assert violated_fields(caught) == ["conversation"]
    with pytest.raises(errors.InvalidArgument) as caught:
        fit_to_context(GenerationRequest("deployments/chat", prompt="x", max_tokens=59),
                       6, CONTEXT, LIMITS)
    assert violated_fields(caught) == ["max_tokens"]
    assert caught.value.reason == "MAX_TOKENS_BEYOND_CONTEXT"
    assert fit_to_context(GenerationRequest("deployments/chat", prompt="x", max_tokens=58),
                          6, CONTEXT, LIMITS) == 58
    # Unset: the default, capped by the room left.
    assert fit_to_context(prompt, 6, CONTEXT, LIMITS) == CONTEXT - 6
    assert fit_to_context(prompt, 6, 4096, GenerationLimits(default_max_tokens=100)) == 100


def test_text_that_is_not_utf8_is_refused_naming_its_field():
    cases = {
        "prompt": inf.GenerateRequest(deployment="deployments/chat", prompt="ab"),
        "stop[1]": inf.GenerateRequest(deployment="deployments/chat", prompt="x",
                                       stop=["x", "ab"]),
        "conversation.messages[0].content": inf.GenerateRequest(
            deployment="deployments/chat", conversation=inf.Conversation(
                messages=[inf.ChatMessage(role="user", content="ab")])),
    }
    for field_path, message in cases.items():
        broken = message.SerializeToString().replace(b"ab", b"\xff\xfe")
        with pytest.raises(errors.InvalidArgument) as caught:
            parse_request(inf.GenerateRequest, broken)
        assert violated_fields(caught) == [field_path]
        assert caught.value.reason == "TEXT_NOT_UTF8"


def test_a_conversation_is_rendered_with_the_versions_own_chat_template(tmp_path):
    """The prompt facts come from the version's CAUSAL_LM artifact: SmolLM2's ChatML template,
    its tokenizer and its context length."""
    served = ServedModel("models/smollm/versions/1", "chat.smollm.v1",
                         ServingSignature((), (), 0), artifact=smollm2_causal_lm_zip())
    facts = load_prompt_facts(served, tmp_path / "prompts")
    assert facts.context_length == 8192
    prompt = facts.renderer.render((ChatMessage("system", "Be brief."),
                                    ChatMessage("user", "Hello")))
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                      "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert 5 < facts.renderer.count_tokens(prompt) < 30
    # A second gateway start reads the unpacked directory again; without a system turn the
    # template supplies its own.
    again = load_prompt_facts(served, tmp_path / "prompts")
    assert again.renderer.render((ChatMessage("user", "Hello"),)).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_the_request_sent_to_the_model_carries_the_prompt_and_the_sampling():
    request = GenerationRequest("deployments/chat", prompt="capital of France?",
                                temperature=0, stop=("\n",), seed=7)
    sent = triton_generate_request("chat.llm.v1", "capital of France?",
                                   sampling_parameters(request, 8), "r1", "acme")
    assert (sent.model_name, sent.id) == ("chat.llm.v1", "r1")
    assert sent.parameters["maas.tenant"].string_param == "acme"  # the model shares slots by it
    assert [(i.name, i.datatype, list(i.shape)) for i in sent.inputs] == [
        ("text_input", "BYTES", [1]), ("sampling_parameters", "BYTES", [1])]
    assert sent.raw_input_contents[0] == struct.pack("<I", 18) + b"capital of France?"
    assert json.loads(sent.raw_input_contents[1][4:]) == {
        "max_tokens": 8, "temperature": 0, "top_p": 1.0, "top_k": 0, "stop": ["\n"],
        "seed": 7, "repetition_penalty": 1.0}
    assert sent.parameters["triton_enable_empty_final_response"].bool_param
    defaults = json.loads(triton_generate_request(
        "m", "x", sampling_parameters(GenerationRequest("d", prompt="x"), 3), "r2"
    ).raw_input_contents[1][4:])
    assert (defaults["temperature"], defaults["top_p"], defaults["seed"]) == (1.0, 1.0, None)


def model_response(text: str, completion_tokens: int, finish: str = "",
                   final: bool = False) -> service_pb2.ModelStreamInferResponse:
    response = service_pb2.ModelStreamInferResponse()
    reply = response.infer_response
    usage = json.dumps({"prompt_tokens": 3, "completion_tokens": completion_tokens}).encode()
    for name, value in (("text_output", text.encode()), ("finish_reason", finish.encode()),
                        ("usage", usage)):
        reply.outputs.add(name=name, datatype="BYTES", shape=[1])
        reply.raw_output_contents.append(struct.pack("<I", len(value)) + value)
    reply.parameters["triton_final_response"].bool_param = final
    return response


def test_the_models_responses_are_read_as_steps():
    step = read_model_step(model_response(" Paris", 2), "chat")
    assert (step.text, step.finish_reason, step.usage["completion_tokens"], step.final) == (
        " Paris", "", 2, False)
    last = read_model_step(model_response("", 4, "stop", final=True), "chat")
    assert (last.finish_reason, last.final) == ("stop", True)
    unreadable = model_response("x", 1)
    unreadable.infer_response.raw_output_contents[2] = struct.pack("<I", 3) + b"{]!"
    with pytest.raises(errors.Internal) as caught:
        read_model_step(unreadable, "chat")
    assert caught.value.reason == "MODEL_RESPONSE_UNREADABLE"


@pytest.mark.parametrize(("message", "error_type", "field_path"), [
    ("RESOURCE_EXHAUSTED: 32 streams are waiting", errors.ResourceExhausted, None),
    ("INVALID_ARGUMENT: top_k: must be below the vocabulary", errors.InvalidArgument, "top_k"),
    ("the engine crashed", errors.Unavailable, None),
])
def test_the_models_errors_keep_their_codes(message, error_type, field_path):
    error = model_error(message, "chat")
    assert type(error) is error_type
    if field_path:
        assert [v.field for v in error.field_violations] == [field_path]
    with pytest.raises(error_type):
        read_model_step(service_pb2.ModelStreamInferResponse(error_message=message), "chat")


def test_openai_bodies_become_generation_requests_or_errors_naming_the_parameter():
    chat = generation_request({"model": "chat", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_completion_tokens": 5, "stop": "\n", "temperature": 0}, chat=True)
    assert chat.messages == (ChatMessage("user", "Hi"),) and chat.prompt is None
    assert (chat.max_tokens, chat.stop, chat.temperature) == (5, ("\n",), 0)
    completion = generation_request({"model": "chat", "prompt": ["1, 2,"]}, chat=False)
    assert (completion.deployment, completion.prompt) == ("deployments/chat", "1, 2,")
    for body, param in (([], "body"), ({"prompt": "x"}, "model"),
                        ({"model": "chat", "prompt": "x", "n": 2}, "n"),
                        ({"model": "chat", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
                        ({"model": "chat", "prompt": "x", "stop": [1]}, "stop"),
                        ({"model": "chat", "messages": [{"content": "x"}]}, "messages[0]"),
                        ({"model": "chat", "messages": [{"role": "user", "content": 3}]},
                         "messages[0].content")):
        with pytest.raises(errors.InvalidArgument) as caught:
            generation_request(body, chat="messages" in body)
        assert violated_fields(caught) == [param], body


def test_errors_become_openai_json_with_their_http_status():
    reply = error_response(errors.InvalidArgument.for_field("temperature", "must be 0 or more",
                                                            reason="FIELD_INVALID"))
    assert reply.status == 400
    assert json.loads(reply.body)["error"] == {
        "message": json.loads(reply.body)["error"]["message"], "type": "invalid_request_error",
        "param": "temperature", "code": "FIELD_INVALID"}
    busy = error_response(model_error("RESOURCE_EXHAUSTED: queue full", "chat"))
    assert (busy.status, busy.headers["Retry-After"]) == (429, "1")
    assert json.loads(busy.body)["error"]["type"] == "rate_limit_error"
