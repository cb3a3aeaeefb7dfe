"""numpy arrays ↔ the wire's tensors (dtype + shape + raw little-endian bytes).

Conversions are table lookups, no reflection per call: an input array becomes a `Tensor`
with its bytes taken as they lie in memory (one `tobytes` of a C-contiguous little-endian
array, the only copy protobuf needs), and an output is a read-only `np.frombuffer` view of
the reply's bytes, no copy at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from maas.common.v1 import tensor_pb2

from maas_sdk.errors import FieldViolation, InvalidArgument

NUMPY_BY_DATATYPE: dict[int, np.dtype] = {
    tensor_pb2.DATA_TYPE_BOOL: np.dtype(np.bool_),
    tensor_pb2.DATA_TYPE_UINT8: np.dtype("<u1"),
    tensor_pb2.DATA_TYPE_UINT16: np.dtype("<u2"),
    tensor_pb2.DATA_TYPE_UINT32: np.dtype("<u4"),
    tensor_pb2.DATA_TYPE_UINT64: np.dtype("<u8"),
    tensor_pb2.DATA_TYPE_INT8: np.dtype("<i1"),
    tensor_pb2.DATA_TYPE_INT16: np.dtype("<i2"),
    tensor_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DATA_TYPE_FP16: np.dtype("<f2"),
    tensor_pb2.DATA_TYPE_FP32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_FP64: np.dtype("<f8"),
}
DATATYPE_BY_NUMPY: dict[np.dtype, int] = {dtype: code for code, dtype in NUMPY_BY_DATATYPE.items()}
DATATYPE_NAMES = {name.removeprefix("DATA_TYPE_").lower(): number
                  for name, number in tensor_pb2.DataType.items() if number}


def datatype_of(dtype: np.dtype, field_path: str) -> int:
    code = DATATYPE_BY_NUMPY.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if code is None:
        raise InvalidArgument.for_field(field_path, f"numpy dtype {dtype} has no wire datatype")
    return code


def to_tensor(name: str, array: np.ndarray) -> tensor_pb2.Tensor:
    """The wire tensor of `array` (made C-contiguous and little-endian only when it is not)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return tensor_pb2.Tensor(name=name, datatype=datatype_of(array.dtype, f"inputs[{name}]"),  # type: ignore[arg-type]
                             shape=array.shape, raw_data=np.ascontiguousarray(array).tobytes())


def from_tensor(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """A read-only view of the tensor's bytes with its dtype and shape."""
    dtype = NUMPY_BY_DATATYPE.get(tensor.datatype)
    if dtype is None:
        raise InvalidArgument.for_field(
            f"outputs[{tensor.name}]",
            f"datatype {tensor_pb2.DataType.Name(tensor.datatype)} has no numpy equivalent")
    return np.frombuffer(tensor.raw_data, dtype).reshape(tuple(tensor.shape))


def named_inputs(inputs: np.ndarray | Mapping[str, Any], input_names: Sequence[str],
                 deployment: str) -> dict[str, np.ndarray]:
    """`inputs` as name → array: a dict as given, a single array under the one input name."""
    if isinstance(inputs, Mapping):
        return {name: np.asarray(value) for name, value in inputs.items()}
    if len(input_names) != 1:
        raise InvalidArgument(
            f"{deployment} takes {len(input_names)} inputs ({', '.join(input_names)}): "
            "pass a dict of name → array",
            field_violations=[FieldViolation("inputs", "one array needs a single-input signature")],
            reason="INPUTS_NOT_NAMED")
    return {input_names[0]: np.asarray(inputs)}
