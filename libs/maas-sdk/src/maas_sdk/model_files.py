"""Model files for upload: a torch `nn.Module` written as TorchScript or ONNX, the signature
of a model inferred by running it on an example input, and the format of a file on disk.

Signatures follow the registry's convention: shapes without the batch dimension, datatypes
by name (`DATA_TYPE_FP32`). torch and onnx are imported only here and only when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from maas_sdk.errors import InvalidArgument
from maas_sdk.tensors import datatype_of

FORMAT_BY_SUFFIX = {
    ".onnx": "MODEL_FORMAT_ONNX",
    ".pt": "MODEL_FORMAT_TORCHSCRIPT",
    ".ts": "MODEL_FORMAT_TORCHSCRIPT",
    ".torchscript": "MODEL_FORMAT_TORCHSCRIPT",
    ".safetensors": "MODEL_FORMAT_MAAS_PACKAGE",
    ".maas": "MODEL_FORMAT_MAAS_PACKAGE",
}
FORMAT_NAMES = {"onnx": "MODEL_FORMAT_ONNX", "torchscript": "MODEL_FORMAT_TORCHSCRIPT",
                "maas-package": "MODEL_FORMAT_MAAS_PACKAGE"}


def model_format(path: Path, declared: str | None = None) -> str:
    """The contract's `ModelFormat` name for `path`: declared (`onnx`, `torchscript`,
    `maas-package` or the enum name) or guessed from the suffix."""
    if declared:
        name = FORMAT_NAMES.get(declared.lower(), declared.upper())
        if name not in FORMAT_NAMES.values():
            raise InvalidArgument.for_field("format", f"unknown format {declared!r}; one of "
                                            f"{', '.join(FORMAT_NAMES)}")
        return name
    guessed = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if guessed is None:
        raise InvalidArgument.for_field("format", f"cannot tell the format of {path.name}; "
                                        f"give one of {', '.join(FORMAT_NAMES)}")
    return guessed


def tensor_spec(name: str, array: np.ndarray) -> dict[str, Any]:
    from maas.common.v1 import tensor_pb2

    return {"name": name, "datatype": tensor_pb2.DataType.Name(datatype_of(array.dtype, name)),
            "shape": list(array.shape[1:])}


def _names(count: int, base: str) -> list[str]:
    return [base] if count == 1 else [f"{base}_{index}" for index in range(count)]


def signature_from_example(module, example_input) -> dict[str, Any]:
    """Run `module` (a torch module or a TorchScript one) on `example_input` (a tensor, an
    array or a tuple of them, batch first) and describe its inputs and outputs."""
    import torch

    examples = example_input if isinstance(example_input, tuple | list) else (example_input,)
    tensors = tuple(torch.as_tensor(np.asarray(item)) if not isinstance(item, torch.Tensor)
                    else item for item in examples)
    with torch.inference_mode():
        outputs = module(*tensors)
    outputs = tuple(outputs) if isinstance(outputs, tuple | list) else (outputs,)
    input_arrays = [tensor.detach().cpu().numpy() for tensor in tensors]
    output_arrays = [tensor.detach().cpu().numpy() for tensor in outputs]
    return {"inputs": [tensor_spec(name, array) for name, array in
                       zip(_names(len(input_arrays), "input"), input_arrays, strict=True)],
            "outputs": [tensor_spec(name, array) for name, array in
                        zip(_names(len(output_arrays), "output"), output_arrays, strict=True)]}


def write_module(module, example_input, directory: Path, file_format: str) -> tuple[Path, str,
                                                                                      dict]:
    """`module` written under `directory` as TorchScript (traced) or ONNX (the dynamo
    exporter, dynamic batch dimension); (path, ModelFormat name, signature)."""
    import torch

    module = module.eval()
    examples = example_input if isinstance(example_input, tuple | list) else (example_input,)
    tensors = tuple(torch.as_tensor(np.asarray(item)) if not isinstance(item, torch.Tensor)
                    else item for item in examples)
    signature = signature_from_example(module, tensors)
    if file_format == "torchscript":
        path = directory / "model.pt"
        with torch.inference_mode():
            traced = torch.jit.trace(module, tensors)
        traced.save(str(path))
        return path, "MODEL_FORMAT_TORCHSCRIPT", signature
    if file_format == "onnx":
        path = directory / "model.onnx"
        batch = torch.export.Dim("batch")
        torch.onnx.export(module, tensors, str(path), dynamo=True, verbose=False,
                          input_names=[spec["name"] for spec in signature["inputs"]],
                          output_names=[spec["name"] for spec in signature["outputs"]],
                          dynamic_shapes=tuple({0: batch} for _ in tensors), external_data=False)
        return path, "MODEL_FORMAT_ONNX", signature
    raise InvalidArgument.for_field("format", f"unknown format {file_format!r}; one of "
                                    "torchscript, onnx")


def signature_from_onnx(path: Path) -> dict[str, Any]:
    """The signature an ONNX graph declares (its first dimension taken as the batch)."""
    import onnx

    datatypes = {onnx.TensorProto.FLOAT: "DATA_TYPE_FP32", onnx.TensorProto.DOUBLE: "DATA_TYPE_FP64",
                 onnx.TensorProto.FLOAT16: "DATA_TYPE_FP16", onnx.TensorProto.INT64: "DATA_TYPE_INT64",
                 onnx.TensorProto.INT32: "DATA_TYPE_INT32", onnx.TensorProto.INT8: "DATA_TYPE_INT8",
                 onnx.TensorProto.UINT8: "DATA_TYPE_UINT8", onnx.TensorProto.BOOL: "DATA_TYPE_BOOL"}
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {initializer.name for initializer in graph.initializer}

    def specs(values) -> list[dict[str, Any]]:
        described = []
        for value in values:
            if value.name in initializers:
                continue
            tensor_type = value.type.tensor_type
            dims = [dim.dim_value if dim.HasField("dim_value") else -1
                    for dim in tensor_type.shape.dim]
            datatype = datatypes.get(tensor_type.elem_type)
            if datatype is None:
                raise InvalidArgument.for_field(
                    "signature", f"ONNX tensor {value.name!r} has an element type this suite "
                    "does not serve; pass signature= explicitly")
            described.append({"name": value.name, "datatype": datatype, "shape": dims[1:]})
        return described

    return {"inputs": specs(graph.input), "outputs": specs(graph.output)}


def signature_from_torchscript(path: Path, example_input) -> dict[str, Any]:
    import torch

    return signature_from_example(torch.jit.load(str(path), map_location="cpu").eval(),
                                  example_input)
