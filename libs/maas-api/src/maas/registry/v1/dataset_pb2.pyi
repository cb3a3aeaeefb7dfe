import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from maas.common.v1 import field_behavior_pb2 as _field_behavior_pb2
from maas.registry.v1 import artifact_pb2 as _artifact_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DatasetFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATASET_FORMAT_UNSPECIFIED: _ClassVar[DatasetFormat]
    DATASET_FORMAT_NPZ: _ClassVar[DatasetFormat]
    DATASET_FORMAT_CSV: _ClassVar[DatasetFormat]
    DATASET_FORMAT_TEXT_CSV: _ClassVar[DatasetFormat]
DATASET_FORMAT_UNSPECIFIED: DatasetFormat
DATASET_FORMAT_NPZ: DatasetFormat
DATASET_FORMAT_CSV: DatasetFormat
DATASET_FORMAT_TEXT_CSV: DatasetFormat

class DatasetSchema(_message.Message):
    __slots__ = ("feature_columns", "label_column", "feature_shape", "num_classes")
    FEATURE_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    LABEL_COLUMN_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    feature_columns: _containers.RepeatedScalarFieldContainer[str]
    label_column: str
    feature_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    def __init__(self, feature_columns: _Optional[_Iterable[str]] = ..., label_column: _Optional[str] = ..., feature_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "display_name", "description", "labels", "create_time", "update_time", "etag", "latest_version_id")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    description: str
    labels: _containers.ScalarMap[str, str]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    etag: str
    latest_version_id: int
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ..., latest_version_id: _Optional[int] = ...) -> None: ...

class DatasetVersion(_message.Message):
    __slots__ = ("name", "version_id", "format", "artifact", "schema", "row_count", "labels", "lineage", "description", "create_time", "creator")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    version_id: int
    format: DatasetFormat
    artifact: _artifact_pb2.ArtifactInfo
    schema: DatasetSchema
    row_count: int
    labels: _containers.ScalarMap[str, str]
    lineage: _artifact_pb2.Lineage
    description: str
    create_time: _timestamp_pb2.Timestamp
    creator: str
    def __init__(self, name: _Optional[str] = ..., version_id: _Optional[int] = ..., format: _Optional[_Union[DatasetFormat, str]] = ..., artifact: _Optional[_Union[_artifact_pb2.ArtifactInfo, _Mapping]] = ..., schema: _Optional[_Union[DatasetSchema, _Mapping]] = ..., row_count: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., lineage: _Optional[_Union[_artifact_pb2.Lineage, _Mapping]] = ..., description: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., creator: _Optional[str] = ...) -> None: ...
