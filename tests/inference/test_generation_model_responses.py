"""The generation model's sender side, without Triton: the token groups waiting to be sent
are joined per stream, a stream's first response goes before running streams' later ones,
and the tenant a request names is read from its `maas.tenant` parameter."""

from __future__ import annotations

import json

from maas_inference.triton.generation_model import _request_tenant, coalesce_backlog
from maas_llm.engine import TokenGroup, Usage


def group(text: str, tokens: int, finish: str = "", error: str = "") -> TokenGroup:
    return TokenGroup(text, finish, Usage(5, tokens, 0.1), error)


def test_a_backlog_is_one_response_per_stream_new_streams_first():
    running, newcomer, other = object(), object(), object()
    backlog = [(running, group(" 1,", 1)), (other, group(" a", 3)), (running, group(" 2,", 2)),
               (newcomer, group(" Paris", 1)), (running, group(" 3,", 3, "length"))]
    sent = coalesce_backlog(backlog, started={id(running), id(other)})
    assert [(sender, event.text, event.finish_reason, event.usage.completion_tokens)
            for sender, event in sent] == [
        (newcomer, " Paris", "", 1),
        (running, " 1, 2, 3,", "length", 3),  # the text in order, the last reason and usage
        (other, " a", "", 3),
    ]


def test_without_a_backlog_each_group_is_sent_as_it_came_and_errors_stay_apart():
    stream = object()
    assert coalesce_backlog([(stream, group("x", 1))], started=set()) == [(stream, group("x", 1))]
    failed = coalesce_backlog([(stream, group("x", 1)), (stream, group("", 1, "error", "boom"))],
                              started={id(stream)})
    assert [event.error for _, event in failed] == ["", "boom"]


class _Request:
    def __init__(self, parameters: str) -> None:
        self._parameters = parameters

    def parameters(self) -> str:
        return self._parameters


def test_the_tenant_comes_from_the_requests_parameter_or_is_empty():
    assert _request_tenant(_Request(json.dumps({"maas.tenant": "acme"}))) == "acme"
    assert _request_tenant(_Request("{}")) == ""
    assert _request_tenant(_Request(json.dumps({"maas.tenant": 3}))) == ""
    assert _request_tenant(object()) == ""
