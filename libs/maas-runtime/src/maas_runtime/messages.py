"""Conversions between protobuf messages and the plain dicts domain code works with.

Domain layers hold resources as dicts in the contract's JSON shape (proto field names). The
two directions follow different rules:

- A caller's message goes through `request_fields` (or `validated_request` when the servicer
  reads fields itself): fields marked `(maas.common.v1.field_behavior) = OUTPUT_ONLY` are
  dropped at every depth (AIP-203: ignored, never parsed into the domain), the IDENTIFIER
  `name` is kept only where it names the resource to change, and every remaining value is
  checked: Timestamps and Durations in range, enum numbers the contract knows, floating-point
  numbers finite. A bad value is an `InvalidArgument` naming its dotted field path.
- A domain dict goes through `to_message`, strictly: an unknown key or enum name is a server
  bug and raises loudly instead of being dropped or turned into `*_UNSPECIFIED`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from maas.common.v1 import field_behavior_pb2

from maas_runtime.errors import InvalidArgument, ViolationCollector

# The ranges RFC 3339 and the protobuf JSON mapping can represent (timestamp.proto,
# duration.proto): 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z, ±10,000 years.
TIMESTAMP_SECONDS_RANGE = (-62_135_596_800, 253_402_300_799)
DURATION_SECONDS_LIMIT = 315_576_000_000
NANOS_LIMIT = 999_999_999

_FLOATING_TYPES = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_OUTPUT_ONLY = field_behavior_pb2.FIELD_BEHAVIOR_OUTPUT_ONLY
_IDENTIFIER = field_behavior_pb2.FIELD_BEHAVIOR_IDENTIFIER

M = TypeVar("M", bound=Message)


def to_message(resource: Mapping[str, Any], message_type: type[M]) -> M:
    """A `message_type` built from a domain dict in the contract's JSON shape.

    Strict: an unknown key or enum name raises `json_format.ParseError` (a server bug,
    INTERNAL), so a misspelling can never pass as a default value.
    """
    return json_format.ParseDict(resource, message_type())


def struct_value_to_python(value: struct_pb2.Value) -> Any:
    """A Struct value as plain Python; integral numbers become int (Struct only has doubles,
    and a layer width of 128.0 is meant as 128)."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() else number
    if kind == "struct_value":
        return {key: struct_value_to_python(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [struct_value_to_python(item) for item in value.list_value.values]
    if kind == "null_value":
        return None
    return getattr(value, kind) if kind else None


def to_dict(message: Message) -> dict[str, Any]:
    """A message the server trusts (its own, or a peer service's answer) as a dict with proto
    field names (defaults omitted). Requests go through `request_fields` instead."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def request_fields(message: Message, field_path: str, *,
                   keep_identifier: bool = False) -> dict[str, Any]:
    """A resource sent by a caller as a domain dict: server-set fields dropped, values checked.

    `field_path` is where `message` sits in the request (e.g. "model"), so violations name
    the full path ("model.create_time"). `keep_identifier` keeps the resource's `name` for
    Update methods, where it says which resource to change; Create ignores it.
    """
    return to_dict(validated_request(message, field_path, keep_identifier=keep_identifier))


def validated_request(message: M, field_path: str = "", *,
                      keep_identifier: bool = False) -> M:
    """A copy of `message` without its server-set fields, every remaining value checked."""
    cleaned = type(message)()
    cleaned.CopyFrom(message)
    drop_server_fields(cleaned, keep_identifier=keep_identifier)
    violations = ViolationCollector()
    for path, description in invalid_values(cleaned, field_path):
        violations.add(path, description)
    violations.raise_if_any()
    return cleaned


def parse_request(message_type: type[M], data: bytes) -> M:
    """A request parsed from its wire bytes by the servicer itself (registered on raw bytes),
    so what grpc's own parsing would answer with INTERNAL is an `InvalidArgument` naming the
    field: a string that is not UTF-8 (proto3 strings must be), or bytes that are no message
    of the type at all (`request`)."""
    try:
        return message_type.FromString(data)
    except DecodeError:
        path = _invalid_utf8_path(message_type.DESCRIPTOR, data, "")
        if path is not None:
            raise InvalidArgument.for_field(path, "is not valid UTF-8 text",
                                            reason="TEXT_NOT_UTF8") from None
        raise InvalidArgument.for_field(
            "request", f"is not a serialized {message_type.DESCRIPTOR.full_name}",
            reason="REQUEST_UNPARSABLE") from None


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(data):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    raise IndexError("truncated varint")


def _invalid_utf8_path(descriptor: Any, data: bytes, field_path: str) -> str | None:
    """The path of the first string field whose bytes are not UTF-8, read from the wire
    format (length-delimited fields only; None when there is none or the bytes are torn)."""
    seen: dict[int, int] = {}
    position = 0
    try:
        while position < len(data):
            key, position = _varint(data, position)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, position = _varint(data, position)
            elif wire_type in (1, 5):
                position += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, position = _varint(data, position)
                chunk, position = data[position:position + length], position + length
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                index = seen[number] = seen.get(number, -1) + 1
                path = _join(field_path, field.name) + (f"[{index}]" if field.is_repeated
                                                        else "")
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return path
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    found = _invalid_utf8_path(field.message_type, chunk, path)
                    if found is not None:
                        return found
            else:
                return None
    except IndexError:
        return None
    return None


def field_behaviors(field: FieldDescriptor) -> tuple[int, ...]:
    """The `(maas.common.v1.field_behavior)` annotations of a field."""
    return tuple(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def drop_server_fields(message: Message, *, keep_identifier: bool = False) -> None:
    """Clear every OUTPUT_ONLY field (and IDENTIFIER unless kept) of `message`, recursively.

    Only the top level's identifier may be kept: a nested resource's name is never the one
    a request changes.
    """
    for field, value in message.ListFields():
        behaviors = field_behaviors(field)
        if _OUTPUT_ONLY in behaviors or (_IDENTIFIER in behaviors and not keep_identifier):
            message.ClearField(field.name)
            continue
        for nested in _nested_messages(field, value):
            drop_server_fields(nested)


def _nested_messages(field: FieldDescriptor, value: Any) -> Iterator[Message]:
    if field.message_type is None:
        return
    if _is_map(field):
        if field.message_type.fields_by_name["value"].message_type is not None:
            yield from value.values()
    elif field.is_repeated:
        yield from value
    else:
        yield value


def _is_map(field: FieldDescriptor) -> bool:
    return (field.is_repeated and field.message_type is not None
            and field.message_type.GetOptions().map_entry)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _key(key: object) -> str:
    return f"[{json.dumps(key, ensure_ascii=False)}]"


def invalid_values(message: Message, field_path: str = "") -> Iterator[tuple[str, str]]:
    """Every (field path, description) of a value the contract cannot hold, depth first."""
    full_name = message.DESCRIPTOR.full_name
    if full_name == "google.protobuf.Timestamp":
        yield from _timestamp_violations(message, field_path)
        return
    if full_name == "google.protobuf.Duration":
        yield from _duration_violations(message, field_path)
        return
    if full_name == "google.protobuf.Value":
        yield from _struct_value_violations(message, field_path)
        return
    if full_name == "google.protobuf.Struct":
        for key, item in message.fields.items():
            yield from _struct_value_violations(item, field_path + _key(key))
        return
    for field, value in message.ListFields():
        path = _join(field_path, field.name)
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                yield from _single_value_violations(value_field, item, path + _key(key))
        elif field.is_repeated:
            for index, item in enumerate(value):
                yield from _single_value_violations(field, item, f"{path}[{index}]")
        else:
            yield from _single_value_violations(field, value, path)


def _single_value_violations(field: FieldDescriptor, value: Any, path: str) -> Iterator[tuple[str, str]]:
    if field.message_type is not None:
        yield from invalid_values(value, path)
    elif field.enum_type is not None:
        if value not in field.enum_type.values_by_number:
            yield path, f"unknown {field.enum_type.name} value {value}"
    elif field.type in _FLOATING_TYPES and not math.isfinite(value):
        yield path, f"must be a finite number, got {value}"


def _timestamp_violations(message: Message, path: str) -> Iterator[tuple[str, str]]:
    low, high = TIMESTAMP_SECONDS_RANGE
    if not low <= message.seconds <= high:
        yield path, (f"seconds {message.seconds} is outside 0001-01-01..9999-12-31 "
                     f"({low}..{high})")
    elif not 0 <= message.nanos <= NANOS_LIMIT:
        yield path, f"nanos {message.nanos} is outside 0..{NANOS_LIMIT}"


def _duration_violations(message: Message, path: str) -> Iterator[tuple[str, str]]:
    if abs(message.seconds) > DURATION_SECONDS_LIMIT:
        yield path, f"seconds {message.seconds} is beyond ±{DURATION_SECONDS_LIMIT}"
    elif abs(message.nanos) > NANOS_LIMIT:
        yield path, f"nanos {message.nanos} is beyond ±{NANOS_LIMIT}"
    elif message.seconds * message.nanos < 0:
        yield path, "seconds and nanos must have the same sign"


def _struct_value_violations(value: Message, path: str) -> Iterator[tuple[str, str]]:
    kind = value.WhichOneof("kind")
    if kind == "number_value" and not math.isfinite(value.number_value):
        yield path, f"must be a finite number, got {value.number_value}"
    elif kind == "struct_value":
        for key, item in value.struct_value.fields.items():
            yield from _struct_value_violations(item, path + _key(key))
    elif kind == "list_value":
        for index, item in enumerate(value.list_value.values):
            yield from _struct_value_violations(item, f"{path}[{index}]")
