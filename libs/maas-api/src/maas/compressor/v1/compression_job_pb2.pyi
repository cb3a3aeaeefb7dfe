import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from maas.common.v1 import architecture_pb2 as _architecture_pb2
from maas.common.v1 import field_behavior_pb2 as _field_behavior_pb2
from maas.common.v1 import job_pb2 as _job_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PruneScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRUNE_SCOPE_UNSPECIFIED: _ClassVar[PruneScope]
    PRUNE_SCOPE_GLOBAL: _ClassVar[PruneScope]
    PRUNE_SCOPE_PER_LAYER: _ClassVar[PruneScope]

class QuantizationDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUANTIZATION_DTYPE_UNSPECIFIED: _ClassVar[QuantizationDtype]
    QUANTIZATION_DTYPE_INT8: _ClassVar[QuantizationDtype]
    QUANTIZATION_DTYPE_FP16: _ClassVar[QuantizationDtype]
    QUANTIZATION_DTYPE_BF16: _ClassVar[QuantizationDtype]
    QUANTIZATION_DTYPE_INT4: _ClassVar[QuantizationDtype]

class QuantizationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUANTIZATION_MODE_UNSPECIFIED: _ClassVar[QuantizationMode]
    QUANTIZATION_MODE_DYNAMIC: _ClassVar[QuantizationMode]
    QUANTIZATION_MODE_STATIC: _ClassVar[QuantizationMode]
    QUANTIZATION_MODE_AUTO: _ClassVar[QuantizationMode]

class FusionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUSION_METHOD_UNSPECIFIED: _ClassVar[FusionMethod]
    FUSION_METHOD_UNIFORM: _ClassVar[FusionMethod]
    FUSION_METHOD_WEIGHTED: _ClassVar[FusionMethod]
    FUSION_METHOD_GREEDY_SOUP: _ClassVar[FusionMethod]
PRUNE_SCOPE_UNSPECIFIED: PruneScope
PRUNE_SCOPE_GLOBAL: PruneScope
PRUNE_SCOPE_PER_LAYER: PruneScope
QUANTIZATION_DTYPE_UNSPECIFIED: QuantizationDtype
QUANTIZATION_DTYPE_INT8: QuantizationDtype
QUANTIZATION_DTYPE_FP16: QuantizationDtype
QUANTIZATION_DTYPE_BF16: QuantizationDtype
QUANTIZATION_DTYPE_INT4: QuantizationDtype
QUANTIZATION_MODE_UNSPECIFIED: QuantizationMode
QUANTIZATION_MODE_DYNAMIC: QuantizationMode
QUANTIZATION_MODE_STATIC: QuantizationMode
QUANTIZATION_MODE_AUTO: QuantizationMode
FUSION_METHOD_UNSPECIFIED: FusionMethod
FUSION_METHOD_UNIFORM: FusionMethod
FUSION_METHOD_WEIGHTED: FusionMethod
FUSION_METHOD_GREEDY_SOUP: FusionMethod

class CompressionJob(_message.Message):
    __slots__ = ("name", "spec", "state", "create_time", "start_time", "end_time", "report", "model_version", "error", "creator", "metrics", "resume_count", "epoch")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATOR_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    RESUME_COUNT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: CompressionSpec
    state: _job_pb2.JobState
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    report: CompressionReport
    model_version: str
    error: _job_pb2.JobError
    creator: str
    metrics: _containers.ScalarMap[str, float]
    resume_count: int
    epoch: int
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[CompressionSpec, _Mapping]] = ..., state: _Optional[_Union[_job_pb2.JobState, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., report: _Optional[_Union[CompressionReport, _Mapping]] = ..., model_version: _Optional[str] = ..., error: _Optional[_Union[_job_pb2.JobError, _Mapping]] = ..., creator: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., resume_count: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class CompressionSpec(_message.Message):
    __slots__ = ("source_model_version", "steps", "evaluation_dataset", "max_accuracy_drop", "output", "resources", "seed", "min_mean_cosine", "min_similarity_spearman")
    SOURCE_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_DATASET_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MIN_MEAN_COSINE_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILARITY_SPEARMAN_FIELD_NUMBER: _ClassVar[int]
    source_model_version: str
    steps: _containers.RepeatedCompositeFieldContainer[CompressionStep]
    evaluation_dataset: str
    max_accuracy_drop: float
    output: CompressionOutput
    resources: _job_pb2.JobResources
    seed: int
    min_mean_cosine: float
    min_similarity_spearman: float
    def __init__(self, source_model_version: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[CompressionStep, _Mapping]]] = ..., evaluation_dataset: _Optional[str] = ..., max_accuracy_drop: _Optional[float] = ..., output: _Optional[_Union[CompressionOutput, _Mapping]] = ..., resources: _Optional[_Union[_job_pb2.JobResources, _Mapping]] = ..., seed: _Optional[int] = ..., min_mean_cosine: _Optional[float] = ..., min_similarity_spearman: _Optional[float] = ...) -> None: ...

class CompressionStep(_message.Message):
    __slots__ = ("prune", "quantize", "distill", "fuse", "convert")
    PRUNE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    DISTILL_FIELD_NUMBER: _ClassVar[int]
    FUSE_FIELD_NUMBER: _ClassVar[int]
    CONVERT_FIELD_NUMBER: _ClassVar[int]
    prune: PruneStep
    quantize: QuantizeStep
    distill: DistillStep
    fuse: FuseStep
    convert: ConvertStep
    def __init__(self, prune: _Optional[_Union[PruneStep, _Mapping]] = ..., quantize: _Optional[_Union[QuantizeStep, _Mapping]] = ..., distill: _Optional[_Union[DistillStep, _Mapping]] = ..., fuse: _Optional[_Union[FuseStep, _Mapping]] = ..., convert: _Optional[_Union[ConvertStep, _Mapping]] = ...) -> None: ...

class PruneStep(_message.Message):
    __slots__ = ("amount", "structured", "finetune_epochs", "scope", "learning_rate")
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    amount: float
    structured: bool
    finetune_epochs: int
    scope: PruneScope
    learning_rate: float
    def __init__(self, amount: _Optional[float] = ..., structured: _Optional[bool] = ..., finetune_epochs: _Optional[int] = ..., scope: _Optional[_Union[PruneScope, str]] = ..., learning_rate: _Optional[float] = ...) -> None: ...

class QuantizeStep(_message.Message):
    __slots__ = ("dtype", "mode", "per_channel", "calibration_samples", "accuracy_aware", "tolerance", "format")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PER_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_AWARE_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    dtype: QuantizationDtype
    mode: QuantizationMode
    per_channel: bool
    calibration_samples: int
    accuracy_aware: bool
    tolerance: float
    format: str
    def __init__(self, dtype: _Optional[_Union[QuantizationDtype, str]] = ..., mode: _Optional[_Union[QuantizationMode, str]] = ..., per_channel: _Optional[bool] = ..., calibration_samples: _Optional[int] = ..., accuracy_aware: _Optional[bool] = ..., tolerance: _Optional[float] = ..., format: _Optional[str] = ...) -> None: ...

class DistillStep(_message.Message):
    __slots__ = ("student_kind", "student_hyperparameters_json", "temperature", "alpha", "epochs", "learning_rate", "student", "batch_size", "teacher_layers")
    STUDENT_KIND_FIELD_NUMBER: _ClassVar[int]
    STUDENT_HYPERPARAMETERS_JSON_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEACHER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    student_kind: str
    student_hyperparameters_json: str
    temperature: float
    alpha: float
    epochs: int
    learning_rate: float
    student: _architecture_pb2.ArchitectureSpec
    batch_size: int
    teacher_layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, student_kind: _Optional[str] = ..., student_hyperparameters_json: _Optional[str] = ..., temperature: _Optional[float] = ..., alpha: _Optional[float] = ..., epochs: _Optional[int] = ..., learning_rate: _Optional[float] = ..., student: _Optional[_Union[_architecture_pb2.ArchitectureSpec, _Mapping]] = ..., batch_size: _Optional[int] = ..., teacher_layers: _Optional[_Iterable[int]] = ...) -> None: ...

class FuseStep(_message.Message):
    __slots__ = ("model_versions", "weights", "method")
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    model_versions: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    method: FusionMethod
    def __init__(self, model_versions: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ..., method: _Optional[_Union[FusionMethod, str]] = ...) -> None: ...

class ConvertStep(_message.Message):
    __slots__ = ("opset",)
    OPSET_FIELD_NUMBER: _ClassVar[int]
    opset: int
    def __init__(self, opset: _Optional[int] = ...) -> None: ...

class CompressionOutput(_message.Message):
    __slots__ = ("model_id", "alias")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    alias: str
    def __init__(self, model_id: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...

class ModelMeasurement(_message.Message):
    __slots__ = ("size_bytes", "parameters", "nonzero_parameters", "accuracy", "latency_ms", "latency_ms_batch32", "runtime", "latency_ms_all_threads", "latency_ms_batch32_all_threads", "weights_bytes")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    NONZERO_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_BATCH32_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_ALL_THREADS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_BATCH32_ALL_THREADS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    parameters: int
    nonzero_parameters: int
    accuracy: float
    latency_ms: float
    latency_ms_batch32: float
    runtime: str
    latency_ms_all_threads: float
    latency_ms_batch32_all_threads: float
    weights_bytes: int
    def __init__(self, size_bytes: _Optional[int] = ..., parameters: _Optional[int] = ..., nonzero_parameters: _Optional[int] = ..., accuracy: _Optional[float] = ..., latency_ms: _Optional[float] = ..., latency_ms_batch32: _Optional[float] = ..., runtime: _Optional[str] = ..., latency_ms_all_threads: _Optional[float] = ..., latency_ms_batch32_all_threads: _Optional[float] = ..., weights_bytes: _Optional[int] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("kind", "details", "duration_seconds")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    details: _struct_pb2.Struct
    duration_seconds: float
    def __init__(self, kind: _Optional[str] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class CompressionReport(_message.Message):
    __slots__ = ("before", "after", "gate_passed", "size_ratio", "accuracy_drop", "steps", "speedup_batch1", "speedup_batch32", "mean_cosine", "similarity_spearman")
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    GATE_PASSED_FIELD_NUMBER: _ClassVar[int]
    SIZE_RATIO_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SPEEDUP_BATCH1_FIELD_NUMBER: _ClassVar[int]
    SPEEDUP_BATCH32_FIELD_NUMBER: _ClassVar[int]
    MEAN_COSINE_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_SPEARMAN_FIELD_NUMBER: _ClassVar[int]
    before: ModelMeasurement
    after: ModelMeasurement
    gate_passed: bool
    size_ratio: float
    accuracy_drop: float
    steps: _containers.RepeatedCompositeFieldContainer[StepReport]
    speedup_batch1: float
    speedup_batch32: float
    mean_cosine: float
    similarity_spearman: float
    def __init__(self, before: _Optional[_Union[ModelMeasurement, _Mapping]] = ..., after: _Optional[_Union[ModelMeasurement, _Mapping]] = ..., gate_passed: _Optional[bool] = ..., size_ratio: _Optional[float] = ..., accuracy_drop: _Optional[float] = ..., steps: _Optional[_Iterable[_Union[StepReport, _Mapping]]] = ..., speedup_batch1: _Optional[float] = ..., speedup_batch32: _Optional[float] = ..., mean_cosine: _Optional[float] = ..., similarity_spearman: _Optional[float] = ...) -> None: ...
