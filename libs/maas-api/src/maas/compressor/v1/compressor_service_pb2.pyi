from maas.common.v1 import access_pb2 as _access_pb2
from maas.common.v1 import job_pb2 as _job_pb2
from maas.compressor.v1 import compression_job_pb2 as _compression_job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateCompressionJobRequest(_message.Message):
    __slots__ = ("compression_job_id", "compression_job")
    COMPRESSION_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_JOB_FIELD_NUMBER: _ClassVar[int]
    compression_job_id: str
    compression_job: _compression_job_pb2.CompressionJob
    def __init__(self, compression_job_id: _Optional[str] = ..., compression_job: _Optional[_Union[_compression_job_pb2.CompressionJob, _Mapping]] = ...) -> None: ...

class GetCompressionJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListCompressionJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "filter")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    filter: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., filter: _Optional[str] = ...) -> None: ...

class ListCompressionJobsResponse(_message.Message):
    __slots__ = ("compression_jobs", "next_page_token")
    COMPRESSION_JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    compression_jobs: _containers.RepeatedCompositeFieldContainer[_compression_job_pb2.CompressionJob]
    next_page_token: str
    def __init__(self, compression_jobs: _Optional[_Iterable[_Union[_compression_job_pb2.CompressionJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelCompressionJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchCompressionJobRequest(_message.Message):
    __slots__ = ("name", "after_sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    after_sequence: int
    def __init__(self, name: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...
