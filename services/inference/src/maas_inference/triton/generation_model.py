"""Triton Python-backend runtime for generative models (copied as a GGUF/CAUSAL_LM model's `model.py`).

Runs inside Triton's `triton_python_backend_stub` process as a decoupled model
(`model_transaction_policy { decoupled: true }`, one instance): each request gets many
responses through its response sender. `initialize` turns the artifact into a causal-LM
directory beside this file (a CAUSAL_LM zip is validated and unzipped; a GGUF is converted to
bf16 safetensors, which is slow: prefer deploying the bf16 version) and starts one
`maas_llm.GenerationEngine` on a background thread. `execute` only checks each request and
submits it; the engine decodes all running requests together (continuous batching) and hands
each request's responses to a sender thread (a response is a round trip to the server process:
the next forward does not wait for it; one thread keeps each request's responses in order,
sends the groups that piled up meanwhile as one response per request, and a request's first
response before other requests' later ones: `coalesce_backlog`). A
request whose client went away (`is_cancelled()`, also a round trip, asked every
`cancel_poll_seconds`) leaves the batch at its next step.

The I/O contract, shared with the inference gateway and any KServe-v2 ModelStreamInfer client:

* inputs: `text_input` BYTES [1], the prompt text (already rendered with the chat template);
  `sampling_parameters` BYTES [1], optional, a JSON object {max_tokens, temperature, top_p,
  top_k, stop, seed, repetition_penalty}.
* request parameter `maas.tenant` (string), optional: whose stream it is. The engine shares
  its running slots and prefills fairly across tenants (`maas_llm.engine`); requests without
  it share one tenant. The inference gateway always sets it to the caller's tenant.
* every response: `text_output` BYTES [1] (the text since the previous response),
  `finish_reason` BYTES [1] ("" until the last response, then "stop", "length" or
  "cancelled"), `usage` BYTES [1] (JSON {"prompt_tokens", "completion_tokens",
  "time_to_first_token_s"}, cumulative). The last response carries
  TRITONSERVER_RESPONSE_COMPLETE_FINAL.
* errors: one final error response whose message starts with the canonical code:
  "RESOURCE_EXHAUSTED: ..." when the engine's queue is full, "INVALID_ARGUMENT: <field>: ..."
  for a bad prompt or parameter.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from maas_llm.engine import GenerationEngine, TokenGroup

# The Triton parameters model_repository.py writes (spelled the same there).
ARTIFACT_PATH_PARAMETER = "maas.artifact_path"
ARTIFACT_FORMAT_PARAMETER = "maas.artifact_format"
TORCH_THREADS_PARAMETER = "maas.torch_threads"
MAX_RUNNING_PARAMETER = "maas.max_running_streams"
MAX_WAITING_PARAMETER = "maas.max_waiting_streams"
ENGINE_NICE_PARAMETER = "maas.engine_nice"
ENGINE_NICE = 5
"""The forwards run below the server process that relays every response (and the gateway
beside it on the same cores): see `EngineSettings.cpu_nice`."""
GGUF_FORMAT = "gguf"
OPENMP_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
MODEL_DIRECTORY = "causal-lm"

TEXT_INPUT = "text_input"
SAMPLING_INPUT = "sampling_parameters"
TENANT_PARAMETER = "maas.tenant"
TEXT_OUTPUT = "text_output"
FINISH_OUTPUT = "finish_reason"
USAGE_OUTPUT = "usage"


def _triton_utils() -> Any:
    # Exists only inside the stub process; imported lazily so this file imports anywhere.
    import triton_python_backend_utils

    return triton_python_backend_utils


def _bytes_tensor(pb_utils: Any, name: str, text: str) -> Any:
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


def _error_code(pb_utils: Any, canonical: str) -> Any:
    """Triton's own error code nearest the canonical one (the message carries the exact one)."""
    names = {"INVALID_ARGUMENT": "INVALID_ARG", "RESOURCE_EXHAUSTED": "UNAVAILABLE",
             "CANCELLED": "CANCELLED"}
    return getattr(pb_utils.TritonError, names.get(canonical, "INTERNAL"), None)


def _error_response(pb_utils: Any, canonical: str, message: str) -> Any:
    code = _error_code(pb_utils, canonical)
    text = f"{canonical}: {message}"
    error = pb_utils.TritonError(text) if code is None else pb_utils.TritonError(text, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _request_tenant(request: Any) -> str:
    """The `maas.tenant` request parameter ("" when the request has none)."""
    parameters = getattr(request, "parameters", None)
    if parameters is None:
        return ""
    try:
        tenant = json.loads(parameters() or "{}").get(TENANT_PARAMETER, "")
    except ValueError:
        return ""
    return tenant if isinstance(tenant, str) else ""


def _input_text(pb_utils: Any, request: Any, name: str) -> bytes | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        from maas_runtime.errors import InvalidArgument

        raise InvalidArgument.for_field(name, f"must hold exactly one element, got {values.size}")
    value = values[0]
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def coalesce_backlog(
    backlog: list[tuple[Any, TokenGroup]], started: set[int]
) -> list[tuple[Any, TokenGroup]]:
    """The token groups waiting to be sent, one per stream (its groups joined: the text in
    order, the last one's finish reason and cumulative usage; an error group stays apart),
    streams whose first response this is (not in `started`, by `id` of the sender) before
    the others.

    A response is a round trip to the server process and then a message on every hop to the
    caller; a stream whose groups pile up behind the others' is better served by one response
    than by several, and a new stream's first token, the one its caller is waiting for, should
    not wait behind running streams' later ones. Without a backlog nothing changes: one group,
    one response."""
    from maas_llm.engine import TokenGroup

    joined: dict[int, list[tuple[Any, TokenGroup]]] = {}
    for sender, event in backlog:
        queued = joined.setdefault(id(sender), [])
        if queued and not queued[-1][1].final and not event.error:
            previous = queued[-1][1]
            queued[-1] = (sender, TokenGroup(previous.text + event.text, event.finish_reason,
                                             event.usage, event.error))
        else:
            queued.append((sender, event))
    first = [groups for key, groups in joined.items() if key not in started]
    rest = [groups for key, groups in joined.items() if key in started]
    return [item for groups in first + rest for item in groups]


class TritonPythonModel:
    """The decoupled generation model: one engine per model instance."""

    engine: GenerationEngine
    _responses: queue.SimpleQueue[tuple[Any, TokenGroup] | None]
    _sender_thread: threading.Thread

    def initialize(self, args: dict) -> None:
        # Before torch (and its OpenMP) loads in this stub: OpenMP threads waiting between
        # parallel regions sleep instead of spinning, so they leave the CPU to the server and
        # gateway processes that carry every token (2 shared cores: a spinning worker delays
        # them and they in turn stall the forward's next barrier).
        for name, value in OPENMP_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        from maas_llm.directory import unzip_causal_lm
        from maas_llm.engine import EngineSettings, GenerationEngine

        pb_utils = _triton_utils()
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                "the generation model must be decoupled (model_transaction_policy)"
            )
        parameters = {
            key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()
        }
        version_dir = Path(args["model_repository"]) / args["model_version"]
        artifact = version_dir / parameters[ARTIFACT_PATH_PARAMETER]
        target = version_dir / MODEL_DIRECTORY
        if parameters[ARTIFACT_FORMAT_PARAMETER] == GGUF_FORMAT:
            from maas_llm.convert import convert_gguf_to_causal_lm

            directory = convert_gguf_to_causal_lm(artifact, target)
        else:
            directory = unzip_causal_lm(artifact, target)
        threads = int(parameters.get(TORCH_THREADS_PARAMETER, "0") or 0) or (os.cpu_count() or 1)
        settings = EngineSettings(
            max_running=int(parameters.get(MAX_RUNNING_PARAMETER, "8")),
            max_waiting=int(parameters.get(MAX_WAITING_PARAMETER, "32")),
            torch_threads=threads,
            cpu_nice=int(parameters.get(ENGINE_NICE_PARAMETER, "") or ENGINE_NICE),
        )
        self._responses = queue.SimpleQueue()
        self._sender_thread = threading.Thread(
            target=self._send_responses, args=(pb_utils,), name="generation-responses", daemon=True
        )
        self._sender_thread.start()
        self.engine = GenerationEngine.from_directory(directory, settings).start()

    def execute(self, requests: list) -> None:
        from maas_llm.sampling import SamplingParams
        from maas_runtime.errors import InvalidArgument, MaasError

        pb_utils = _triton_utils()
        for request in requests:
            sender = request.get_response_sender()
            try:
                raw_prompt = _input_text(pb_utils, request, TEXT_INPUT)
                if raw_prompt is None:
                    raise InvalidArgument.for_field(TEXT_INPUT, "is required")
                try:
                    prompt = raw_prompt.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidArgument.for_field(TEXT_INPUT, "is not valid UTF-8") from None
                params = SamplingParams.from_json(_input_text(pb_utils, request, SAMPLING_INPUT) or b"")
                is_cancelled = getattr(sender, "is_cancelled", None) or getattr(
                    request, "is_cancelled", None
                )
                self.engine.submit(
                    prompt,
                    params,
                    on_event=functools.partial(self._enqueue, sender),
                    is_cancelled=is_cancelled,
                    tenant=_request_tenant(request),
                )
            except MaasError as error:
                sender.send(
                    _error_response(pb_utils, error.code, error.message),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
        return None

    def _enqueue(self, sender: Any, event: TokenGroup) -> None:
        """Hand one token group to the sender thread (engine thread; never blocks)."""
        self._responses.put((sender, event))

    def _send_responses(self, pb_utils: Any) -> None:
        """The sender thread: send queued token groups until the None sentinel, a backlog at a
        time (`coalesce_backlog`): one response per stream for all its groups waiting, and
        streams that have not had a response yet first."""
        started: set[int] = set()
        while (item := self._responses.get()) is not None:
            backlog = [item]
            stopping = False
            while True:
                try:
                    more = self._responses.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                backlog.append(more)
            for sender, event in coalesce_backlog(backlog, started):
                try:
                    self._send(pb_utils, sender, event)
                except Exception:  # the client went away; the engine drops it on is_cancelled
                    pass
                if event.final:
                    started.discard(id(sender))
                else:
                    started.add(id(sender))
            if stopping:
                return

    def _send(self, pb_utils: Any, sender: Any, event: TokenGroup) -> None:
        """Send one token group; the last one is flagged final."""
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if event.final else 0
        if event.error:
            sender.send(_error_response(pb_utils, "INTERNAL", event.error), flags=flags)
            return
        outputs = [
            _bytes_tensor(pb_utils, TEXT_OUTPUT, event.text),
            _bytes_tensor(pb_utils, FINISH_OUTPUT, event.finish_reason),
            _bytes_tensor(pb_utils, USAGE_OUTPUT, json.dumps(event.usage.as_dict())),
        ]
        sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=flags)

    def finalize(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()  # delivers every stream's final group before it returns
        sender_thread = getattr(self, "_sender_thread", None)
        if sender_thread is not None:
            self._responses.put(None)
            sender_thread.join(10)
