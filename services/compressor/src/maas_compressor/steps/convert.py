"""The convert step: a torch model becomes an ONNX graph, verified in onnxruntime.

Export uses torch's dynamo exporter (`torch.export` + onnxscript) with a dynamic batch
dimension and the signature's tensor names as the graph's input and output names (the serving
path feeds tensors by name). The manifest's preprocessing is baked into the graph in front of
the network, so the ONNX file takes the same raw inputs a client sends to the torch package
and returns the same logits (the Triton runtime applies `(x * scale - mean) / std` to a
package's inputs; a graph has nobody to do it for it).

The exported graph is then run in onnxruntime on the evaluation split and compared with torch:
the report carries the opset, the largest absolute logit difference and the fraction of
examples whose predicted class agrees. A model whose ops the exporter cannot handle (or
whose control flow depends on the data) fails with FailedPrecondition and the exporter's
reason, as does a graph whose outputs disagree with torch.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import torch
from maas_runtime.errors import FailedPrecondition, InvalidArgument

from maas_compressor.onnx_models import default_opset, predict_onnx, strip_exporter_metadata
from maas_compressor.steps.base import (
    HfForm,
    ModelUnderCompression,
    OnnxForm,
    StepContext,
    StepResult,
    TorchForm,
)
from maas_compressor.torch_models import predict_torch

DEFAULT_OPSET = 18
# onnxscript's torchlib translates aten ops for these default-domain opsets.
SUPPORTED_OPSETS = range(18, 24)
# Agreement the export must reach on the evaluation data: float rounding in another runtime
# may flip an argmax that sits on a tie, never more than a sliver of examples.
MIN_ARGMAX_AGREEMENT = 0.99
MAX_RELATIVE_LOGIT_DIFFERENCE = 1e-3
EXPORT_EXAMPLES = 2  # a batch of one would let the exporter specialise the batch dimension
EXPORTER_REASON_CHARACTERS = 1500


class PreprocessedInputs(torch.nn.Module):
    """The network behind the manifest's preprocessing `(x * scale - mean) / std`, with the
    same semantics as the Triton runtime's (a number, or one value per element of an example
    flattened row-major), so the exported graph takes raw inputs."""

    scale: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, network: torch.nn.Module, preprocessing: Mapping[str, Any], example_shape: tuple[int, ...]
    ):
        super().__init__()
        self.network = network
        example_size = math.prod(example_shape)

        def constant(key: str, default: float) -> torch.Tensor:
            value = torch.tensor(preprocessing.get(key, default), dtype=torch.float32)
            if value.numel() == 1:
                return value.reshape(())
            if value.numel() != example_size:
                raise FailedPrecondition(
                    f"preprocessing.{key} has {value.numel()} values; an example has {example_size}",
                    reason="PREPROCESSING_SIZE_MISMATCH",
                )
            return value.reshape(example_shape)

        self.register_buffer("scale", constant("scale", 1.0))
        self.register_buffer("mean", constant("mean", 0.0))
        self.register_buffer("std", constant("std", 1.0))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.network((inputs * self.scale - self.mean) / self.std)


def opset_parameter(params: Mapping[str, Any]) -> int:
    """The requested opset (0 or absent means the default), checked against what exports."""
    opset = params.get("opset") or DEFAULT_OPSET
    if not isinstance(opset, int) or isinstance(opset, bool) or opset not in SUPPORTED_OPSETS:
        raise InvalidArgument.for_field(
            "opset",
            f"{opset!r} is not an opset the exporter supports "
            f"({SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})",
        )
    return opset


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_RAISING_CALL_MARKER = "The following call raised this error:"


def _exporter_reason(error: BaseException) -> str:
    """The innermost cause's first line (an unsupported aten op, a data-dependent guard) and,
    when torch.export names it, the line of the model's code that raised it. The exporter
    wraps that cause in generic errors with pages of advice, which the report leaves out."""
    innermost = error
    while (innermost.__cause__ or innermost.__context__) is not None:
        innermost = innermost.__cause__ or innermost.__context__  # type: ignore[assignment]
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(innermost)).splitlines()]
    lines = [line for line in lines if line]
    reason = f"{type(innermost).__name__}: {lines[0] if lines else ''}"
    if _RAISING_CALL_MARKER in lines:
        marker = lines.index(_RAISING_CALL_MARKER)
        reason += " (at " + " ".join(lines[marker + 1 : marker + 3]) + ")"
    return reason[:EXPORTER_REASON_CHARACTERS]


def export_onnx(model: ModelUnderCompression, form: TorchForm, opset: int, ctx: StepContext) -> OnnxForm:
    """Exports the torch form (preprocessing in front) to `<workdir>/converted-opset<N>.onnx`."""
    if len(model.signature.inputs) != 1 or len(model.signature.outputs) != 1:
        raise FailedPrecondition(
            "convert exports models with one input and one output; this signature has "
            f"{len(model.signature.inputs)} and {len(model.signature.outputs)}",
            reason="SINGLE_INPUT_OUTPUT_REQUIRED",
        )
    input_name, output_name = model.signature.inputs[0].name, model.signature.outputs[0].name
    example_shape = tuple(ctx.data.eval_x.shape[1:])
    network = form.module.eval()
    if model.preprocessing:
        network = PreprocessedInputs(network, model.preprocessing, example_shape).eval()
    example = torch.from_numpy(np.ascontiguousarray(ctx.data.eval_x[:EXPORT_EXAMPLES], np.float32))
    target = ctx.workdir / f"converted-opset{opset}.onnx"
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                network,
                (example,),
                dynamo=True,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                verbose=False,
                optimize=True,
                report=False,
            )
            if program is None:  # only the legacy exporter writes without returning
                raise RuntimeError("the dynamo exporter returned no program")
            program.save(str(target), external_data=False)
        strip_exporter_metadata(target)
    except FailedPrecondition:
        raise
    except Exception as error:  # the exporter raises many unrelated types for one cause
        raise FailedPrecondition(
            f"the model cannot be exported to ONNX: {_exporter_reason(error)}",
            reason="ONNX_EXPORT_FAILED",
        ) from error
    return OnnxForm(path=target, opset=default_opset(onnx.load(str(target), load_external_data=False)))


def verify_against_torch(
    model: ModelUnderCompression, form: TorchForm, exported: OnnxForm, x: np.ndarray
) -> dict[str, float]:
    """Max abs logit difference and argmax agreement of the graph against torch on `x`;
    FailedPrecondition when the graph computes something else."""
    expected = predict_torch(form, x, preprocessing=model.preprocessing)
    actual = predict_onnx(exported, x)
    if actual.shape != expected.shape:
        raise FailedPrecondition(
            f"the ONNX graph returns shape {list(actual.shape)}, torch {list(expected.shape)}",
            reason="ONNX_OUTPUT_SHAPE_MISMATCH",
        )
    max_abs_difference = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    agreement = float(np.mean(actual.argmax(axis=1) == expected.argmax(axis=1))) if len(x) else 1.0
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    if agreement < MIN_ARGMAX_AGREEMENT or max_abs_difference > MAX_RELATIVE_LOGIT_DIFFERENCE * scale:
        raise FailedPrecondition(
            f"the exported graph disagrees with torch on the evaluation data: max abs difference "
            f"{max_abs_difference:.3g}, argmax agreement {agreement:.4f}",
            reason="ONNX_VERIFICATION_FAILED",
        )
    return {"max_abs_difference": max_abs_difference, "argmax_agreement": agreement}


def convert(model: ModelUnderCompression, params: Mapping[str, Any], ctx: StepContext) -> StepResult:
    """TorchForm → OnnxForm (see module doc). Params: `opset` (int, default 18)."""
    if isinstance(model.form, HfForm):
        from maas_compressor.steps.transformer import convert_hf
        return convert_hf(model, params, ctx)
    opset = opset_parameter(params)
    if isinstance(model.form, OnnxForm):
        raise FailedPrecondition("the model is already an ONNX graph; convert exports torch models",
                                 reason="MODEL_ALREADY_ONNX")
    form = model.form
    ctx.log(f"convert: exporting to ONNX opset {opset} (dynamo exporter, dynamic batch)")
    exported = export_onnx(model, form, opset, ctx)
    verification = verify_against_torch(model, form, exported, ctx.data.eval_x)
    ctx.log(
        f"convert: verified in onnxruntime on {len(ctx.data.eval_x)} examples: max abs difference "
        f"{verification['max_abs_difference']:.3g}, argmax agreement {verification['argmax_agreement']:.4f}"
    )
    result = model.with_form(exported)
    details = {
        "opset": exported.opset,
        "exporter": f"torch.onnx dynamo (torch {torch.__version__}, onnx {onnx.__version__})",
        "dynamic_batch": True,
        "preprocessing_in_graph": bool(model.preprocessing),
        **verification,
    }
    return StepResult(model=result, details=details)
