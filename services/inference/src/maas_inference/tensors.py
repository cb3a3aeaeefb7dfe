"""Tensors at the gateway: checked against the signature, forwarded to Triton as raw bytes.

The element bytes are never decoded: a `maas.common.v1.Tensor`'s `raw_data` becomes one of
the KServe request's `raw_input_contents` as is, and Triton's raw outputs come back the same
way. Only names, dtypes, shapes and byte lengths are checked, before Triton sees a request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from maas.common.v1 import tensor_pb2
from maas_runtime.contract_enums import DATA_TYPE_PREFIX
from maas_runtime.errors import InvalidArgument, ViolationCollector
from tritonclient.grpc import service_pb2

ITEM_BYTES = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
    "BF16": 2,
}
ENUM_TO_KSERVE = {value: name.removeprefix(DATA_TYPE_PREFIX)
                  for name, value in tensor_pb2.DataType.items() if value}
KSERVE_TO_ENUM = {name: value for value, name in ENUM_TO_KSERVE.items()}


@dataclass(frozen=True)
class TensorRule:
    name: str
    datatype: str
    """KServe name, e.g. "FP32"."""
    shape: tuple[int, ...]
    """Without the batch dimension; -1 is variable."""
    optional: bool = False
    """A request may leave it out (the generation model's `sampling_parameters`)."""

    def describe(self, batched: bool) -> str:
        dims = ["batch"] * batched + [str(d) if d >= 0 else "*" for d in self.shape]
        return f"{self.name}: {self.datatype}[{', '.join(dims)}]"


@dataclass(frozen=True)
class ServingSignature:
    """A served version's inputs and outputs and batch limit, for request checks."""

    inputs: tuple[TensorRule, ...]
    outputs: tuple[TensorRule, ...]
    max_batch_size: int

    @classmethod
    def from_version(cls, signature: dict, max_batch_size: int) -> ServingSignature:
        """From a registry ModelVersion's signature dict (datatypes like "DATA_TYPE_FP32")."""

        def rules(side):
            return tuple(
                TensorRule(
                    t["name"], t["datatype"].removeprefix(DATA_TYPE_PREFIX),
                    tuple(int(d) for d in t.get("shape", [])), bool(t.get("optional")),
                )
                for t in signature.get(side, [])
            )

        return cls(rules("inputs"), rules("outputs"), max_batch_size)

    @cached_property
    def splits_by_rows(self) -> bool:
        """Requests can be concatenated and replies sliced by rows: batched, fixed-size types
        (asked on every request, so worked out once)."""
        return self.max_batch_size > 0 and all(
            rule.datatype in ITEM_BYTES for rule in (*self.inputs, *self.outputs))

    @cached_property
    def has_text_inputs(self) -> bool:
        """A BYTES input: texts to check (UTF-8, not empty) at the gateway."""
        return any(rule.datatype == "BYTES" for rule in self.inputs)

    def check(self, tensors: Sequence[tuple[str, str, Sequence[int], int | None]], field_path: str) -> int:
        """Check (name, datatype, shape, byte length or None) of each input; return the batch.

        Raises INVALID_ARGUMENT naming the offending field and the expected spec.
        """
        batched = self.max_batch_size > 0
        expected = {rule.name: rule for rule in self.inputs}
        violations = ViolationCollector()
        seen, batch_sizes = set(), set()
        for index, (name, datatype, shape, byte_length) in enumerate(tensors):
            where = f"{field_path}[{index}]"
            rule = expected.get(name)
            if rule is None:
                violations.add(
                    f"{where}.name",
                    f"unknown input {name!r}; the signature has "
                    f"{', '.join(r.describe(batched) for r in self.inputs)}",
                )
                continue
            if name in seen:
                violations.add(f"{where}.name", f"input {name!r} sent twice")
            seen.add(name)
            if datatype != rule.datatype:
                violations.add(
                    f"{where}.datatype", f"is {datatype or 'unset'}; expected {rule.describe(batched)}"
                )
            dims = list(shape)
            body = dims[1:] if batched else dims
            if (
                len(body) != len(rule.shape)
                or any(want not in (-1, got) for want, got in zip(rule.shape, body, strict=False))
                or (batched and not dims)
            ):
                violations.add(f"{where}.shape", f"is {dims}; expected {rule.describe(batched)}")
                continue
            if batched:
                batch = dims[0]
                batch_sizes.add(batch)
                if batch < 1:
                    violations.add(f"{where}.shape", f"the batch is empty; expected {rule.describe(batched)}")
                elif batch > self.max_batch_size:
                    violations.add(
                        f"{where}.shape",
                        f"batch {batch} exceeds the deployment's max_batch_size "
                        f"{self.max_batch_size} ({rule.describe(batched)})",
                    )
            if any(d < 0 for d in dims):
                violations.add(f"{where}.shape", "dimensions must not be negative")
            elif byte_length is not None and datatype in ITEM_BYTES:
                want = math.prod(dims) * ITEM_BYTES[datatype]
                if byte_length != want:
                    violations.add(
                        f"{where}.raw_data",
                        f"has {byte_length} bytes; shape {dims} of {rule.describe(batched)} needs {want}",
                    )
        for rule in self.inputs:
            if rule.name not in seen and not rule.optional:
                violations.add(field_path, f"missing input {rule.describe(batched)}")
        if len(batch_sizes) > 1:
            violations.add(field_path, f"inputs disagree on the batch size: {sorted(batch_sizes)}")
        violations.raise_if_any("request does not match the signature")
        return next(iter(batch_sizes), 1)


def split_bytes_tensor(raw: bytes, field_path: str) -> list[bytes]:
    """The items of a KServe BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument.for_field(field_path, "BYTES tensor ends inside an item length")
        length = int.from_bytes(raw[offset:offset + 4], "little")
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument.for_field(field_path, f"BYTES item of {length} bytes runs past the end")
        items.append(raw[offset:offset + length])
        offset += length
    return items


def check_text_inputs(signature: ServingSignature, request: service_pb2.ModelInferRequest,
                      field_path: str) -> None:
    """Refuse non-UTF-8 or empty texts in a text model's BYTES inputs before Triton sees them
    (INVALID_ARGUMENT naming `<input>[item]`), as maas_text's runtime would."""
    from maas_text.inputs import decode_texts

    text_inputs = {rule.name for rule in signature.inputs if rule.datatype == "BYTES"}
    for index, tensor in enumerate(request.inputs):
        if tensor.name not in text_inputs:
            continue
        if index < len(request.raw_input_contents):
            items = split_bytes_tensor(request.raw_input_contents[index], f"{field_path}[{index}]")
        else:
            items = list(tensor.contents.bytes_contents)
        decode_texts(items, input_name=tensor.name,
                     max_batch=max(signature.max_batch_size, len(items), 1))


def infer_request_from_predict(
    tensors: Sequence[tensor_pb2.Tensor], output_names: Sequence[str], triton_model: str, request_id: str
) -> service_pb2.ModelInferRequest:
    """A KServe ModelInferRequest carrying the Predict tensors' bytes unchanged."""
    request = service_pb2.ModelInferRequest(model_name=triton_model, id=request_id)
    for tensor in tensors:
        request.inputs.add(
            name=tensor.name, datatype=ENUM_TO_KSERVE.get(tensor.datatype, ""), shape=tensor.shape
        )
        request.raw_input_contents.append(tensor.raw_data)
    for name in output_names:
        request.outputs.add(name=name)
    return request


def predict_outputs(response: service_pb2.ModelInferResponse) -> list[tensor_pb2.Tensor]:
    return [
        tensor_pb2.Tensor(
            name=output.name,
            datatype=KSERVE_TO_ENUM.get(output.datatype, 0),
            shape=output.shape,
            raw_data=raw,
        )
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=False)
    ]


def predict_shapes(tensors: Sequence[tensor_pb2.Tensor]):
    return [(t.name, ENUM_TO_KSERVE.get(t.datatype, ""), t.shape, len(t.raw_data)) for t in tensors]


def kserve_shapes(request: service_pb2.ModelInferRequest):
    raw = request.raw_input_contents
    return [
        (t.name, t.datatype, t.shape, len(raw[i]) if i < len(raw) else None)
        for i, t in enumerate(request.inputs)
    ]


def check_output_names(names: Sequence[str], signature: ServingSignature, field_path: str) -> None:
    known = {rule.name for rule in signature.outputs}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InvalidArgument.for_field(
            field_path, f"unknown outputs {unknown}; the signature has {sorted(known)}"
        )
