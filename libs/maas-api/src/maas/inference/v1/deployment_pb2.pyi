import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from maas.common.v1 import field_behavior_pb2 as _field_behavior_pb2
from maas.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeploymentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPLOYMENT_STATE_UNSPECIFIED: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_CREATING: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_READY: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_ROLLING_OUT: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_FAILED: _ClassVar[DeploymentState]
    DEPLOYMENT_STATE_UNAVAILABLE: _ClassVar[DeploymentState]
DEPLOYMENT_STATE_UNSPECIFIED: DeploymentState
DEPLOYMENT_STATE_CREATING: DeploymentState
DEPLOYMENT_STATE_READY: DeploymentState
DEPLOYMENT_STATE_ROLLING_OUT: DeploymentState
DEPLOYMENT_STATE_FAILED: DeploymentState
DEPLOYMENT_STATE_UNAVAILABLE: DeploymentState

class Deployment(_message.Message):
    __slots__ = ("name", "model", "track_alias", "traffic", "shadow", "serving", "state", "message", "serving_versions", "shadow_stats", "create_time", "update_time", "etag", "served_versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRACK_ALIAS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_STATS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    SERVED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    track_alias: bool
    traffic: _containers.RepeatedCompositeFieldContainer[TrafficTarget]
    shadow: ShadowConfig
    serving: ServingConfig
    state: DeploymentState
    message: str
    serving_versions: _containers.RepeatedScalarFieldContainer[str]
    shadow_stats: ShadowStats
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    etag: str
    served_versions: _containers.RepeatedCompositeFieldContainer[ServedVersion]
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., track_alias: _Optional[bool] = ..., traffic: _Optional[_Iterable[_Union[TrafficTarget, _Mapping]]] = ..., shadow: _Optional[_Union[ShadowConfig, _Mapping]] = ..., serving: _Optional[_Union[ServingConfig, _Mapping]] = ..., state: _Optional[_Union[DeploymentState, str]] = ..., message: _Optional[str] = ..., serving_versions: _Optional[_Iterable[str]] = ..., shadow_stats: _Optional[_Union[ShadowStats, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ..., served_versions: _Optional[_Iterable[_Union[ServedVersion, _Mapping]]] = ...) -> None: ...

class ServedVersion(_message.Message):
    __slots__ = ("model_version", "percent", "shadow", "inputs", "outputs", "max_batch_size", "runtime")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    percent: int
    shadow: bool
    inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    max_batch_size: int
    runtime: str
    def __init__(self, model_version: _Optional[str] = ..., percent: _Optional[int] = ..., shadow: _Optional[bool] = ..., inputs: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., runtime: _Optional[str] = ...) -> None: ...

class TrafficTarget(_message.Message):
    __slots__ = ("model_version", "percent")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    percent: int
    def __init__(self, model_version: _Optional[str] = ..., percent: _Optional[int] = ...) -> None: ...

class ShadowConfig(_message.Message):
    __slots__ = ("model_version", "percent")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    percent: int
    def __init__(self, model_version: _Optional[str] = ..., percent: _Optional[int] = ...) -> None: ...

class ShadowStats(_message.Message):
    __slots__ = ("compared", "argmax_agreed", "max_abs_diff", "errors")
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_AGREED_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    compared: int
    argmax_agreed: int
    max_abs_diff: float
    errors: int
    def __init__(self, compared: _Optional[int] = ..., argmax_agreed: _Optional[int] = ..., max_abs_diff: _Optional[float] = ..., errors: _Optional[int] = ...) -> None: ...

class ServingConfig(_message.Message):
    __slots__ = ("max_batch_size", "dynamic_batching", "max_queue_delay_microseconds", "preferred_batch_sizes", "instance_count")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_BATCHING_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MICROSECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    dynamic_batching: bool
    max_queue_delay_microseconds: int
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    instance_count: int
    def __init__(self, max_batch_size: _Optional[int] = ..., dynamic_batching: _Optional[bool] = ..., max_queue_delay_microseconds: _Optional[int] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ..., instance_count: _Optional[int] = ...) -> None: ...
