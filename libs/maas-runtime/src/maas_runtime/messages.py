"""Conversions between protobuf messages and the plain dicts domain code works with.

Domain layers hold resources as dicts in the contract's JSON shape (proto field names), so
servicers convert with these two functions and nothing else.
"""

from __future__ import annotations

from google.protobuf import json_format


def to_message(resource: dict, message_type):
    """A `message_type` built from a dict in the contract's JSON shape (unknown keys ignored)."""
    return json_format.ParseDict(resource, message_type(), ignore_unknown_fields=True)


def to_dict(message) -> dict:
    """A message as a dict with proto field names (defaults omitted)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
