"""The contracts' enum value names, taken from the generated descriptors in this one place.

Domain code holds enum values by name, as the JSON mapping writes them ("MODEL_FORMAT_ONNX").
Every name it uses comes from here, and each constant is looked up in the generated
descriptors, so a name the contract does not have fails at import instead of turning into
`*_UNSPECIFIED` somewhere downstream. tests/runtime/test_contract_enums.py checks that no
other module spells one out by hand.
"""

from __future__ import annotations

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from maas.common.v1 import job_pb2, tensor_pb2
from maas.inference.v1 import deployment_pb2
from maas.registry.v1 import audit_pb2, dataset_pb2, model_pb2


def value_names(enum_type: EnumTypeWrapper) -> tuple[str, ...]:
    """Every value name of a generated enum except its `*_UNSPECIFIED` zero, in order."""
    return tuple(value.name for value in enum_type.DESCRIPTOR.values if value.number != 0)


def value_prefix(enum_type: EnumTypeWrapper) -> str:
    """The prefix all value names of an enum share, e.g. "DATA_TYPE_" (from its zero value)."""
    return enum_type.Name(0).removesuffix("UNSPECIFIED")


def _name(enum_type: EnumTypeWrapper, number: int) -> str:
    return enum_type.Name(number)


# maas.registry.v1.ModelFormat
MODEL_FORMAT_MAAS_PACKAGE = _name(model_pb2.ModelFormat, model_pb2.MODEL_FORMAT_MAAS_PACKAGE)
MODEL_FORMAT_TORCHSCRIPT = _name(model_pb2.ModelFormat, model_pb2.MODEL_FORMAT_TORCHSCRIPT)
MODEL_FORMAT_ONNX = _name(model_pb2.ModelFormat, model_pb2.MODEL_FORMAT_ONNX)
MODEL_FORMAT_HF_TRANSFORMER = _name(model_pb2.ModelFormat, model_pb2.MODEL_FORMAT_HF_TRANSFORMER)
MODEL_FORMAT_GGUF = _name(model_pb2.ModelFormat, model_pb2.MODEL_FORMAT_GGUF)
MODEL_FORMAT_CAUSAL_LM = _name(model_pb2.ModelFormat, model_pb2.MODEL_FORMAT_CAUSAL_LM)

# maas.registry.v1.DatasetFormat
DATASET_FORMAT_NPZ = _name(dataset_pb2.DatasetFormat, dataset_pb2.DATASET_FORMAT_NPZ)
DATASET_FORMAT_CSV = _name(dataset_pb2.DatasetFormat, dataset_pb2.DATASET_FORMAT_CSV)
DATASET_FORMAT_TEXT_CSV = _name(dataset_pb2.DatasetFormat, dataset_pb2.DATASET_FORMAT_TEXT_CSV)

# maas.registry.v1.EventType
EVENT_TYPE_MODEL_CREATED = _name(audit_pb2.EventType, audit_pb2.EVENT_TYPE_MODEL_CREATED)
EVENT_TYPE_MODEL_DELETED = _name(audit_pb2.EventType, audit_pb2.EVENT_TYPE_MODEL_DELETED)
EVENT_TYPE_MODEL_VERSION_CREATED = _name(audit_pb2.EventType,
                                         audit_pb2.EVENT_TYPE_MODEL_VERSION_CREATED)
EVENT_TYPE_MODEL_VERSION_DELETED = _name(audit_pb2.EventType,
                                         audit_pb2.EVENT_TYPE_MODEL_VERSION_DELETED)
EVENT_TYPE_ALIAS_MOVED = _name(audit_pb2.EventType, audit_pb2.EVENT_TYPE_ALIAS_MOVED)
EVENT_TYPE_ALIAS_DELETED = _name(audit_pb2.EventType, audit_pb2.EVENT_TYPE_ALIAS_DELETED)
EVENT_TYPE_DATASET_CREATED = _name(audit_pb2.EventType, audit_pb2.EVENT_TYPE_DATASET_CREATED)
EVENT_TYPE_DATASET_DELETED = _name(audit_pb2.EventType, audit_pb2.EVENT_TYPE_DATASET_DELETED)
EVENT_TYPE_DATASET_VERSION_CREATED = _name(audit_pb2.EventType,
                                           audit_pb2.EVENT_TYPE_DATASET_VERSION_CREATED)
EVENT_TYPE_DATASET_VERSION_DELETED = _name(audit_pb2.EventType,
                                           audit_pb2.EVENT_TYPE_DATASET_VERSION_DELETED)

# maas.inference.v1.DeploymentState
DEPLOYMENT_STATE_CREATING = _name(deployment_pb2.DeploymentState,
                                  deployment_pb2.DEPLOYMENT_STATE_CREATING)
DEPLOYMENT_STATE_READY = _name(deployment_pb2.DeploymentState,
                               deployment_pb2.DEPLOYMENT_STATE_READY)
DEPLOYMENT_STATE_ROLLING_OUT = _name(deployment_pb2.DeploymentState,
                                     deployment_pb2.DEPLOYMENT_STATE_ROLLING_OUT)
DEPLOYMENT_STATE_FAILED = _name(deployment_pb2.DeploymentState,
                                deployment_pb2.DEPLOYMENT_STATE_FAILED)
DEPLOYMENT_STATE_UNAVAILABLE = _name(deployment_pb2.DeploymentState,
                                     deployment_pb2.DEPLOYMENT_STATE_UNAVAILABLE)

# maas.common.v1.DataType: the tensor element types, and the prefix of their names (the KServe
# v2 datatype is the name without it, e.g. "FP32").
DATA_TYPES = value_names(tensor_pb2.DataType)
DATA_TYPE_PREFIX = value_prefix(tensor_pb2.DataType)

# maas.common.v1.JobState: job states are stored by their short name ("RUNNING").
JOB_STATE_PREFIX = value_prefix(job_pb2.JobState)
