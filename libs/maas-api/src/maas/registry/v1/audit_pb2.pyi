import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from maas.common.v1 import field_behavior_pb2 as _field_behavior_pb2
from maas.registry.v1 import dataset_pb2 as _dataset_pb2
from maas.registry.v1 import model_pb2 as _model_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_MODEL_CREATED: _ClassVar[EventType]
    EVENT_TYPE_MODEL_DELETED: _ClassVar[EventType]
    EVENT_TYPE_MODEL_VERSION_CREATED: _ClassVar[EventType]
    EVENT_TYPE_MODEL_VERSION_DELETED: _ClassVar[EventType]
    EVENT_TYPE_ALIAS_MOVED: _ClassVar[EventType]
    EVENT_TYPE_ALIAS_DELETED: _ClassVar[EventType]
    EVENT_TYPE_DATASET_CREATED: _ClassVar[EventType]
    EVENT_TYPE_DATASET_DELETED: _ClassVar[EventType]
    EVENT_TYPE_DATASET_VERSION_CREATED: _ClassVar[EventType]
    EVENT_TYPE_DATASET_VERSION_DELETED: _ClassVar[EventType]
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_MODEL_CREATED: EventType
EVENT_TYPE_MODEL_DELETED: EventType
EVENT_TYPE_MODEL_VERSION_CREATED: EventType
EVENT_TYPE_MODEL_VERSION_DELETED: EventType
EVENT_TYPE_ALIAS_MOVED: EventType
EVENT_TYPE_ALIAS_DELETED: EventType
EVENT_TYPE_DATASET_CREATED: EventType
EVENT_TYPE_DATASET_DELETED: EventType
EVENT_TYPE_DATASET_VERSION_CREATED: EventType
EVENT_TYPE_DATASET_VERSION_DELETED: EventType

class AuditEvent(_message.Message):
    __slots__ = ("name", "event_id", "principal", "method", "resource", "before", "after", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    event_id: int
    principal: str
    method: str
    resource: str
    before: _struct_pb2.Struct
    after: _struct_pb2.Struct
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., event_id: _Optional[int] = ..., principal: _Optional[str] = ..., method: _Optional[str] = ..., resource: _Optional[str] = ..., before: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., after: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LineageNode(_message.Message):
    __slots__ = ("name", "operation", "job")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    name: str
    operation: str
    job: str
    def __init__(self, name: _Optional[str] = ..., operation: _Optional[str] = ..., job: _Optional[str] = ...) -> None: ...

class LineageEdge(_message.Message):
    __slots__ = ("parent", "child")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CHILD_FIELD_NUMBER: _ClassVar[int]
    parent: str
    child: str
    def __init__(self, parent: _Optional[str] = ..., child: _Optional[str] = ...) -> None: ...

class LineageGraph(_message.Message):
    __slots__ = ("root", "nodes", "edges")
    ROOT_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    root: str
    nodes: _containers.RepeatedCompositeFieldContainer[LineageNode]
    edges: _containers.RepeatedCompositeFieldContainer[LineageEdge]
    def __init__(self, root: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[LineageNode, _Mapping]]] = ..., edges: _Optional[_Iterable[_Union[LineageEdge, _Mapping]]] = ...) -> None: ...

class RegistryEvent(_message.Message):
    __slots__ = ("event_id", "type", "resource", "create_time", "model_version", "alias", "model", "dataset_version", "dataset")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    type: EventType
    resource: str
    create_time: _timestamp_pb2.Timestamp
    model_version: _model_pb2.ModelVersion
    alias: _model_pb2.ModelAlias
    model: _model_pb2.Model
    dataset_version: _dataset_pb2.DatasetVersion
    dataset: _dataset_pb2.Dataset
    def __init__(self, event_id: _Optional[int] = ..., type: _Optional[_Union[EventType, str]] = ..., resource: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_version: _Optional[_Union[_model_pb2.ModelVersion, _Mapping]] = ..., alias: _Optional[_Union[_model_pb2.ModelAlias, _Mapping]] = ..., model: _Optional[_Union[_model_pb2.Model, _Mapping]] = ..., dataset_version: _Optional[_Union[_dataset_pb2.DatasetVersion, _Mapping]] = ..., dataset: _Optional[_Union[_dataset_pb2.Dataset, _Mapping]] = ...) -> None: ...
