"""The OpenAI-compatible HTTP endpoint, called with the official `openai` client: chat and
text completions streamed and whole, the model list filtered by the token's scopes, bearer
tokens as on gRPC, and errors as OpenAI-style JSON with their HTTP status. The generation
model is the scripted fake Triton stream of test_generation.py; the real model is exercised
end to end in test_generation_serving.py.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from maas_inference.generation import Generator, PromptFacts, PromptRenderers
from maas_inference.openai_http import Authenticator, OpenAiEndpoint
from maas_runtime.auth import ANONYMOUS_ADMIN, Role, TokenStore, add_token

from tests.inference.test_deployment_manager import manager
from tests.inference.test_generation import (
    CONTEXT,
    GeneratingTriton,
    GenerativeRegistry,
    WordRenderer,
    model_response,
)

SCRIPT = [model_response("Paris", 1), model_response(" is the capital.", 4),
          model_response("", 4, finish="stop")]


@pytest.fixture
async def endpoint(tmp_path):
    triton = GeneratingTriton()
    deployments = manager(tmp_path, GenerativeRegistry(), triton)
    for deployment_id, model in (("chat", "models/llm/versions/1"),
                                 ("secret-chat", "models/llm-secret/versions/1"),
                                 ("digits", "models/digits/versions/1")):
        await deployments.controller.create(deployment_id, {"model": model}, ANONYMOUS_ADMIN)
    generator = Generator(deployments.routes, triton,
                          PromptRenderers(lambda _: PromptFacts(WordRenderer(), CONTEXT)))
    tokens_file = tmp_path / "tokens.json"
    tokens = {"admin": add_token(tokens_file, "admin", Role.ADMIN),
              "team": add_token(tokens_file, "team", Role.VIEWER, ("llm",))}
    http = OpenAiEndpoint(lambda: generator, lambda: deployments.controller,
                          Authenticator(TokenStore(tokens_file)), max_body_bytes=1 << 20)
    port = await http.start("127.0.0.1", 0)

    clients: list[openai.AsyncOpenAI] = []

    def client(token: str = tokens["admin"]) -> openai.AsyncOpenAI:
        clients.append(openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                          api_key=token, max_retries=0))
        return clients[-1]

    yield client, triton, tokens
    for opened in clients:
        await opened.close()
    await http.stop()
    await deployments.close()


async def test_a_streamed_chat_completion_arrives_in_chunks_then_its_usage(endpoint):
    client, triton, _ = endpoint
    triton.script = list(SCRIPT)
    chunks = [chunk async for chunk in await client().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Capital of France?"}],
        stream=True, max_tokens=16, temperature=0, stream_options={"include_usage": True})]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Paris is the capital."
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == 3
    assert triton.streams[0].sent[0].raw_input_contents[0][4:] == (
        b"<user> Capital of France? <assistant>")


async def test_whole_chat_and_text_completions(endpoint):
    client, triton, _ = endpoint
    triton.script = list(SCRIPT)
    chat = await client().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Capital?"}], max_tokens=8)
    assert chat.choices[0].message.content == "Paris is the capital."
    assert chat.choices[0].finish_reason == "stop" and chat.usage.total_tokens == 7

    triton.script = list(SCRIPT)
    completion = await client().completions.create(model="chat", prompt="The capital is",
                                                   max_tokens=8, stop=["\n"], seed=3)
    assert completion.choices[0].text == "Paris is the capital."
    assert triton.streams[-1].sent[0].raw_input_contents[0][4:] == b"The capital is"

    triton.script = list(SCRIPT)
    streamed = [c.choices[0].text async for c in await client().completions.create(
        model="chat", prompt="The capital is", stream=True)]
    assert "".join(streamed) == "Paris is the capital."


async def test_models_lists_the_generative_deployments_the_token_may_see(endpoint):
    client, _, tokens = endpoint
    assert sorted(m.id for m in (await client().models.list()).data) == ["chat", "secret-chat"]
    team = client(tokens["team"])  # scoped to the model "llm"
    assert [m.id async for m in team.models.list()] == ["chat"]
    with pytest.raises(openai.PermissionDeniedError):
        await team.completions.create(model="secret-chat", prompt="hi")


async def test_errors_are_openai_json_with_http_codes(endpoint):
    client, triton, _ = endpoint
    with pytest.raises(openai.AuthenticationError):
        await client("not-a-token").models.list()
    with pytest.raises(openai.NotFoundError):
        await client().chat.completions.create(
            model="ghost", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as caught:
        await client().chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert caught.value.body["param"] == "temperature"
    assert caught.value.body["code"] == "FIELD_INVALID"
    with pytest.raises(openai.BadRequestError) as caught:
        await client().completions.create(model="chat", prompt="", stream=True)
    assert caught.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as caught:
        await client().completions.create(model="chat", prompt="hi", max_tokens=CONTEXT)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:  # FAILED_PRECONDITION
        await client().completions.create(model="digits", prompt="hi")
    assert caught.value.body["code"] == "NOT_GENERATIVE"
    triton.script = [model_response("", 0, error="RESOURCE_EXHAUSTED: queue full")]
    with pytest.raises(openai.RateLimitError) as caught:
        await client().completions.create(model="chat", prompt="hi")
    assert caught.value.response.headers["Retry-After"] == "1"


async def test_a_client_leaving_a_stream_ends_the_triton_call(endpoint):
    client, triton, _ = endpoint
    triton.script = [model_response("one", 1)]  # then the model goes on "generating"
    stream = await client().completions.create(model="chat", prompt="count", stream=True)
    async for chunk in stream:
        assert chunk.choices[0].text == "one"
        break
    await stream.close()  # the HTTP connection goes away
    await asyncio.wait_for(triton.streams[0].closed.wait(), timeout=10)
