"""Hostile requests built from the generated descriptors: any message type, seeded.

Every field is set or left alone at random; values lean to the extremes a careless or hostile
client sends (out-of-range timestamps, NaN, huge and negative numbers, unknown enum numbers,
long or odd unicode, malformed resource names, random bytes), mixed with names of resources
that exist so that requests also get past the first checks into the deeper code.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

ODD_STRINGS = (
    "", " ", "\x00", "a" * 5000, "\u202e\u0645\u0631\u062d\u0628\u0627", "\U0001f600" * 50,
    "models/", "models/../etc/passwd", "models/a/b/c", "models/digits/versions/0",
    "models/digits/versions/-1", "models/digits/versions/99999999999999999999",
    "models/digits@", "models/digits@@x", "deployments/", "deployments/../x", "datasets/x/y",
    "trainingJobs/", "%s%n%x", "' OR 1=1 --", "${jndi:ldap://x}", "labels.a = \"b\"",
    "format = MODEL_FORMAT_ONNX AND (", "version_id > 1e999", "((((((((", "\\", "Bearer",
    "FP32", "BYTES", "INT64", "no-such", "UPPER", "trailing/", "/leading", "tab\tname",
)
INT_EXTREMES = (0, 1, -1, 2, 7, 64, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 10**12)
UINT_EXTREMES = (0, 1, 2, 64, 2**32 - 1, 2**64 - 1)
FLOAT_EXTREMES = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 0.5, 100.0)
UNKNOWN_ENUM_NUMBERS = (99, -1, 2**31 - 1, 12345)
TIMESTAMPS = ((10**12, -1), (-(10**12), 0), (0, 10**9), (253_402_300_800, 0), (1_700_000_000, 5))
DURATIONS = ((315_576_000_001, 0), (1, -1), (0, 10**9), (-5, -5), (3, 0))

NAME_FIELDS = frozenset({"name", "parent", "model", "deployment", "model_name", "version",
                         "model_version", "resource_prefix", "dataset", "model_id",
                         "dataset_id", "deployment_id", "training_job_id", "alias"})
"""Fields that usually name a resource: given an existing name more often, to get deeper."""

_INT_TYPES = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT32,
              FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED32,
              FieldDescriptor.TYPE_SFIXED64}
_UINT_TYPES = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
               FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64}
_32_BIT = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32,
           FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32}


class HostileMessages:
    """Random messages of any type; `names` are strings worth mixing in (existing resources)."""

    def __init__(self, rng: random.Random, names: Sequence[str], max_depth: int = 4):
        self.rng = rng
        self.names = tuple(names)
        self.max_depth = max_depth
        self.fill_rate = 0.5

    def message(self, descriptor: Descriptor) -> Message:
        """A random `descriptor` message: sparse (few fields, closer to a valid request) or
        dense, chosen at random."""
        self.fill_rate = self.rng.choice((0.25, 0.55))
        message = message_factory.GetMessageClass(descriptor)()
        self.fill(message)
        return message

    def fill(self, message: Message, depth: int = 0) -> None:
        full_name = message.DESCRIPTOR.full_name
        if full_name == "google.protobuf.Timestamp":
            message.seconds, message.nanos = self._pick_pair(TIMESTAMPS)
            return
        if full_name == "google.protobuf.Duration":
            message.seconds, message.nanos = self._pick_pair(DURATIONS)
            return
        if full_name == "google.protobuf.Struct":
            message.update(self.json_object(depth))
            return
        if full_name == "google.protobuf.FieldMask":
            message.paths.extend(self.rng.choice(self.names + ODD_STRINGS)
                                 for _ in range(self.rng.randint(0, 3)))
            return
        # One member per oneof at most (a later one would silently replace an earlier one).
        chosen_members = {oneof.name: self.rng.choice(oneof.fields)
                          for oneof in message.DESCRIPTOR.oneofs}
        for field in message.DESCRIPTOR.fields:
            oneof = field.containing_oneof
            if oneof is not None and chosen_members[oneof.name] is not field:
                continue
            # Names are set more often than not: a request without one stops at the first check.
            rate = 0.9 if field.name in NAME_FIELDS else self.fill_rate
            if self.rng.random() > rate:
                continue
            if field.message_type is not None and depth >= self.max_depth:
                continue
            self._set(message, field, depth)

    def _pick_pair(self, pairs):
        if self.rng.random() < 0.5:
            return self.rng.choice(pairs)
        return self.rng.randint(-(2**40), 2**40), self.rng.randint(-(2**31), 2**31 - 1)

    def _set(self, message: Message, field: FieldDescriptor, depth: int) -> None:
        if field.is_repeated and field.message_type is not None \
                and field.message_type.GetOptions().map_entry:
            self._fill_map(getattr(message, field.name), field.message_type, depth)
        elif field.is_repeated:
            container = getattr(message, field.name)
            for _ in range(self.rng.choice((0, 1, 1, 2, 3, 40))):
                if field.message_type is not None:
                    self.fill(container.add(), depth + 1)
                else:
                    self._try(lambda: container.append(self.scalar(field)))
        elif field.message_type is not None:
            self.fill(getattr(message, field.name), depth + 1)
            getattr(message, field.name).SetInParent()
        else:
            self._try(lambda: setattr(message, field.name, self.scalar(field)))

    def _fill_map(self, container, entry: Descriptor, depth: int) -> None:
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        for _ in range(self.rng.choice((0, 1, 2, 3, 70))):
            key = self.scalar(key_field)
            if value_field.message_type is not None:
                self.fill(container[key], depth + 1)
            else:
                self._try(lambda key=key: container.__setitem__(key, self.scalar(value_field)))

    @staticmethod
    def _try(assign) -> None:
        # A value the Python runtime itself refuses (e.g. a 64-bit number in a 32-bit field)
        # cannot go on the wire either: such a field is simply left unset.
        try:
            assign()
        except (ValueError, TypeError, OverflowError):
            pass

    def scalar(self, field: FieldDescriptor):
        kind, rng = field.type, self.rng
        if kind == FieldDescriptor.TYPE_STRING:
            if field.name in NAME_FIELDS and self.names and rng.random() < 0.6:
                return rng.choice(self.names)
            return self.string()
        if kind == FieldDescriptor.TYPE_BYTES:
            return self.bytes()
        if kind == FieldDescriptor.TYPE_BOOL:
            return rng.random() < 0.5
        if kind == FieldDescriptor.TYPE_ENUM:
            known = [value.number for value in field.enum_type.values]
            return rng.choice(known + list(UNKNOWN_ENUM_NUMBERS))
        if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return rng.choice(FLOAT_EXTREMES) if rng.random() < 0.7 else rng.uniform(-1e6, 1e6)
        bits = 32 if kind in _32_BIT else 64
        if kind in _UINT_TYPES:
            value = rng.choice(UINT_EXTREMES) if rng.random() < 0.7 else rng.randint(0, 1000)
            return value % 2**bits
        value = rng.choice(INT_EXTREMES) if rng.random() < 0.7 else rng.randint(-1000, 1000)
        return max(-(2 ** (bits - 1)), min(2 ** (bits - 1) - 1, value))

    def string(self) -> str:
        roll = self.rng.random()
        if roll < 0.4 and self.names:
            return self.rng.choice(self.names)
        if roll < 0.8:
            return self.rng.choice(ODD_STRINGS)
        alphabet = "abcxyz019-_./@:ÄßЖ中\U0001f525 "
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(1, 40)))

    def bytes(self) -> bytes:
        size = self.rng.choice((0, 1, 3, 4, 16, 256, 257, 64 * 4, 4096))
        if self.rng.random() < 0.3:
            return bytes(size)
        return self.rng.randbytes(size)

    def json_object(self, depth: int) -> dict:
        return {self.string()[:20]: self.json_value(depth + 1)
                for _ in range(self.rng.randint(0, 4))}

    def json_value(self, depth: int):
        roll = self.rng.random()
        if roll < 0.35:
            return self.rng.choice(FLOAT_EXTREMES + (3, -1, 2**53, 128))
        if roll < 0.55:
            return self.string()
        if roll < 0.65:
            return self.rng.choice((True, False, None))
        if depth >= self.max_depth:
            return 1
        if roll < 0.8:
            return [self.json_value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return self.json_object(depth + 1)
