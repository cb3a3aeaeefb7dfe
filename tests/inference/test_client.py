"""The Triton client's wire helpers, without a server: raw tensors, retargeting, errors."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from maas_inference.triton import RawTensor, TritonModelNotFound, build_infer_request, with_model_name
from maas_inference.triton.client import triton_error
from maas_runtime.errors import DeadlineExceeded, Internal, InvalidArgument, Unavailable
from tritonclient.grpc import service_pb2


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [("<f4", "FP32"), ("<f8", "FP64"), ("<i8", "INT64"), ("<u1", "UINT8"), ("?", "BOOL"), (">f4", "FP32")],
)
def test_raw_tensor_round_trips_numpy_as_little_endian(dtype: str, datatype: str) -> None:
    array = np.arange(6).reshape(2, 3).astype(dtype)
    tensor = RawTensor.from_numpy("x", array)
    assert (tensor.datatype, tensor.shape) == (datatype, (2, 3))
    assert tensor.data == array.astype(array.dtype.newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(tensor.to_numpy(), array)


def test_raw_tensor_refuses_types_without_a_raw_kserve_encoding() -> None:
    with pytest.raises(InvalidArgument):
        RawTensor.from_numpy("text", np.array(["a", "b"], dtype=object))
    with pytest.raises(InvalidArgument):
        RawTensor("text", "BYTES", (1,), b"\x01\x00\x00\x00a").to_numpy()


@pytest.mark.parametrize("new_name", ["mlp", "m" * 300])
def test_with_model_name_overrides_name_and_version_and_keeps_the_payload(new_name: str) -> None:
    features = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    original = build_infer_request(
        "deployments/d1", [RawTensor.from_numpy("features", features)], model_version="7", request_id="r"
    )
    forwarded = service_pb2.ModelInferRequest.FromString(
        with_model_name(original.SerializeToString(), new_name)
    )
    assert forwarded.model_name == new_name
    assert forwarded.model_version == ""
    assert forwarded.id == "r"
    assert forwarded.inputs == original.inputs
    assert forwarded.raw_input_contents == original.raw_input_contents


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, TritonModelNotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, Internal),
        (grpc.StatusCode.UNKNOWN, Internal),
    ],
)
def test_triton_statuses_keep_their_canonical_code(code, expected) -> None:
    error = triton_error(code, "details", model_name="mlp")
    assert isinstance(error, expected)
    assert error.code == code.name if code is not grpc.StatusCode.UNKNOWN else "INTERNAL"
