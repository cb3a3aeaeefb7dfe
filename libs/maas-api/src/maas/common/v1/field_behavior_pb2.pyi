from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class FieldBehavior(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIELD_BEHAVIOR_UNSPECIFIED: _ClassVar[FieldBehavior]
    FIELD_BEHAVIOR_OUTPUT_ONLY: _ClassVar[FieldBehavior]
    FIELD_BEHAVIOR_IDENTIFIER: _ClassVar[FieldBehavior]
FIELD_BEHAVIOR_UNSPECIFIED: FieldBehavior
FIELD_BEHAVIOR_OUTPUT_ONLY: FieldBehavior
FIELD_BEHAVIOR_IDENTIFIER: FieldBehavior
FIELD_BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
field_behavior: _descriptor.FieldDescriptor
