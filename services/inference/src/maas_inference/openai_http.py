"""The OpenAI-compatible HTTP endpoint of the inference service: chat and text completions
(streamed as server-sent events or whole) and the model list, over generative deployments.

An aiohttp server in the service's own event loop, on its own port (`openai_port`, off when
unset). A model is a deployment id. Callers present the same bearer tokens as on gRPC
(`maas_runtime.auth.TokenStore`), need the viewer role as Generate does, and see only the
deployments their model scopes allow. Every answer of the `Generator` is translated here and
nothing else is decided: errors keep the suite's codes, as OpenAI-style JSON bodies with the
matching HTTP status.
"""

from __future__ import annotations

import contextlib
import json
import math
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from maas_llm.prompts import ChatMessage
from maas_runtime import errors
from maas_runtime.auth import ANONYMOUS_ADMIN, Principal, Role, TokenStore

from maas_inference.controller import DeploymentController
from maas_inference.generation import GenerationEnd, GenerationRequest, Generator, TextDelta

_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
                "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
                "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429,
                "CANCELLED": 499, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
                "DEADLINE_EXCEEDED": 504}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 409: "conflict_error",
                429: "rate_limit_error"}


def error_response(error: errors.MaasError) -> web.Response:
    """An OpenAI-style error body: message, type, param (the first offending field), code
    (the suite's reason); Retry-After when the error says when to retry."""
    status = _HTTP_STATUS.get(error.code, 500)
    param = error.field_violations[0].field if error.field_violations else None
    headers = {}
    if error.retry_delay_seconds is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_delay_seconds)))
    body = {"error": {"message": error.message, "type": _ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": error.reason}}
    return web.json_response(body, status=status, headers=headers)


class Authenticator:
    """Who calls: the bearer token looked up as gRPC looks it up (anonymous admin when the
    service runs without auth), holding at least the viewer role."""

    def __init__(self, tokens: TokenStore | None) -> None:
        self._tokens = tokens

    def principal(self, request: web.Request) -> Principal:
        principal = (self._tokens.authenticate(request.headers.get("Authorization"))
                     if self._tokens is not None else ANONYMOUS_ADMIN)
        principal.require(Role.VIEWER, "generate")
        return principal


def _field(body: dict, name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise errors.InvalidArgument.for_field(name, "has the wrong type", reason="FIELD_TYPE")
    if not isinstance(value, kinds):
        raise errors.InvalidArgument.for_field(name, "has the wrong type", reason="FIELD_TYPE")
    return value


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                       and isinstance(part.get("text"), str) for part in value):
        return "".join(part["text"] for part in value)
    raise errors.InvalidArgument.for_field(where, "must be text (a string or text parts)",
                                           reason="FIELD_TYPE")


def generation_request(body: Any, *, chat: bool) -> GenerationRequest:
    """The generation an OpenAI request body asks for (its field names in violations)."""
    if not isinstance(body, dict):
        raise errors.InvalidArgument.for_field("body", "must be a JSON object",
                                               reason="BODY_NOT_JSON")
    model = _field(body, "model", str, "")
    if not model:
        raise errors.InvalidArgument.for_field("model", "is required (a deployment id)",
                                               reason="FIELD_REQUIRED")
    if _field(body, "n", int, 1) != 1:
        raise errors.InvalidArgument.for_field("n", "only 1 choice is generated",
                                               reason="FIELD_UNSUPPORTED")
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    if chat:
        raw_messages = _field(body, "messages", list, [])
        turns = []
        for index, message in enumerate(raw_messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise errors.InvalidArgument.for_field(
                    f"messages[{index}]", "must be an object with a role and a content",
                    reason="FIELD_TYPE")
            turns.append(ChatMessage(message["role"],
                                     _content(message.get("content"),
                                              f"messages[{index}].content")))
        messages = tuple(turns)
    else:
        raw_prompt = body.get("prompt")
        if isinstance(raw_prompt, list) and len(raw_prompt) == 1:
            raw_prompt = raw_prompt[0]
        if raw_prompt is not None and not isinstance(raw_prompt, str):
            raise errors.InvalidArgument.for_field("prompt", "must be one string",
                                                   reason="FIELD_TYPE")
        prompt = raw_prompt or ""
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(item, str) for item in stops):
        raise errors.InvalidArgument.for_field("stop", "must be a string or a list of strings",
                                               reason="FIELD_TYPE")
    max_tokens = _field(body, "max_completion_tokens", int) if chat else None
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int)
    number = (int, float)
    temperature = _field(body, "temperature", number)
    top_p = _field(body, "top_p", number)
    penalty = _field(body, "repetition_penalty", number)
    return GenerationRequest(
        deployment=f"deployments/{model}", prompt=prompt, messages=messages,
        max_tokens=max_tokens,
        temperature=None if temperature is None else float(temperature),
        top_p=None if top_p is None else float(top_p), top_k=_field(body, "top_k", int, 0),
        stop=stops, seed=_field(body, "seed", int),
        repetition_penalty=None if penalty is None else float(penalty))


def _usage(end: GenerationEnd) -> dict:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.total_tokens}


class OpenAiEndpoint:
    """The aiohttp application and its handlers."""

    def __init__(self, generator: Callable[[], Generator | None],
                 controller: Callable[[], DeploymentController | None],
                 authenticator: Authenticator, max_body_bytes: int) -> None:
        self._generator = generator
        self._controller = controller
        self._auth = authenticator
        self.app = web.Application(client_max_size=max_body_bytes,
                                   middlewares=[self._errors])
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_get("/v1/models", self._models)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int,
                    tls_files: tuple[Path, Path] | None = None) -> int:
        """Serve on host:port (0: a free port), over TLS with `tls_files` (certificate, key)
        as the gRPC port is; the port bound."""
        # A caller that goes away cancels its handler: the generation ends at once.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        context = None
        if tls_files is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls_files)
        site = web.TCPSite(self._runner, host, port, ssl_context=context)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except errors.MaasError as error:
            return error_response(error)
        except web.HTTPException as http_error:
            if http_error.status == 413:
                return error_response(errors.InvalidArgument.for_field(
                    "body", "is too large", reason="BODY_TOO_LARGE"))
            raise

    def _serving(self) -> tuple[Generator, DeploymentController]:
        generator, controller = self._generator(), self._controller()
        if generator is None or controller is None:
            raise errors.Unavailable("the inference service is starting; retry shortly",
                                     reason="SERVICE_STARTING")
        return generator, controller

    async def _body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise errors.InvalidArgument.for_field("body", "is not JSON",
                                                   reason="BODY_NOT_JSON") from None

    async def _models(self, request: web.Request) -> web.Response:
        principal = self._auth.principal(request)
        generator, controller = self._serving()
        deployments = await controller.visible(principal)
        data = []
        for deployment in deployments:
            deployment_id = deployment["name"].removeprefix("deployments/")
            if generator.generative(deployment_id):
                data.append({"id": deployment_id, "object": "model",
                             "created": _epoch(deployment.get("create_time", "")),
                             "owned_by": "maas"})
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        principal = self._auth.principal(request)
        generator, _ = self._serving()
        body = await self._body(request)
        generation = generation_request(body, chat=chat)
        stream = _field(body, "stream", bool, False)
        options = _field(body, "stream_options", dict, {})
        shape = _Shape(chat, body["model"])
        # Left early (the caller went away): the generation, and its Triton call, end now.
        async with contextlib.aclosing(generator.generate(generation, principal)) as events:
            if stream:
                return await self._stream(request, events, shape,
                                          bool(options.get("include_usage")))
            text, end = [], None
            async for event in events:
                if isinstance(event, TextDelta):
                    text.append(event.text)
                else:
                    end = event
        if end is None:
            raise errors.Internal("the generation ended without its final message",
                                  reason="GENERATION_UNFINISHED")
        return web.json_response(shape.whole("".join(text), end))

    async def _stream(self, request: web.Request,
                      events: AsyncGenerator[TextDelta | GenerationEnd, None], shape: _Shape,
                      include_usage: bool) -> web.StreamResponse:
        """Server-sent events; the first event is awaited before the response starts, so a
        refusal (validation, admission, a model at capacity) is still an HTTP error."""
        first = await anext(events)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            event: TextDelta | GenerationEnd | None = first
            while event is not None:
                for chunk in shape.chunks(event, include_usage):
                    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                event = await anext(events, None)
        except errors.MaasError as error:  # after the start: an error event, as OpenAI does
            body = json.loads(error_response(error).text or "{}")
            await response.write(f"data: {json.dumps(body)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


class _Shape:
    """The JSON shapes of one completion (chat or text), whole or in chunks."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._started = False

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}

    def whole(self, text: str, end: GenerationEnd) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": end.finish_reason.value, "logprobs": None}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [
                {"index": 0, "text": text, "finish_reason": end.finish_reason.value,
                 "logprobs": None}])
        return {**body, "usage": _usage(end)}

    def chunks(self, event: TextDelta | GenerationEnd, include_usage: bool) -> list[dict]:
        finish = event.finish_reason.value if isinstance(event, GenerationEnd) else None
        text = event.text if isinstance(event, TextDelta) else ""
        if self.chat:
            delta: dict = {} if finish else {"content": text}
            if not self._started:
                delta["role"] = "assistant"
                self._started = True
            choice: dict = {"index": 0, "delta": delta, "finish_reason": finish,
                            "logprobs": None}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            kind = "text_completion"
        chunks = [self._envelope(kind, [choice])]
        if isinstance(event, GenerationEnd) and include_usage:
            chunks.append({**self._envelope(kind, []), "usage": _usage(event)})
        return chunks


def _epoch(timestamp: str) -> int:
    try:
        return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
