"""Compression steps for Hugging Face sentence encoders (`HfForm`): convert, quantize, distill.

* convert: the torch encoder with its pooling and L2 normalization is exported by the dynamo
  exporter (`torch.export` + onnxscript handle BertModel's SDPA attention here, so the
  TorchScript exporter is not needed) with dynamic batch and sequence axes; inputs
  `input_ids`, `attention_mask`, `token_type_ids`, output `sentence_embedding` [batch, dim], so
  the served ONNX variant returns exactly what the torch one does after pooling. The graph is
  checked in onnxruntime against torch on the fixed sentence set (max abs difference, mean
  cosine). The result is a directory with model.onnx, the tokenizer and the configs.
* quantize: dynamic int8 with per-channel weights on every MatMul and on the embedding tables
  (Gather: the 30522×384 word-embedding table is a third of MiniLM's bytes; onnxruntime
  stores it int8 and dequantizes only the gathered rows). Accuracy-aware, the tolerance is a
  minimum mean cosine to the fp32 embeddings: when the fully quantized graph falls short,
  layer roles (e.g. every layer's FFN output projection) are ranked by how much cosine
  keeping them in float recovers, and kept in float most sensitive first until it fits.
  With `format: "torch"` the same search runs on the torch encoder instead (no conversion):
  every Linear layer and embedding table int8 per row (`maas_text.int8`, served by torch's
  quantized CPU kernels with oneDNN). Which format is faster depends on the CPU: on a Xeon
  with AVX-512 VNNI and AMX, MiniLM at batch 32 on one thread ran 2.2× faster than fp32 torch
  in torch int8 and 1.1× in onnxruntime int8 (whose decomposed attention dominates there),
  on an earlier machine onnxruntime's int8 was 2.6× faster; the benchmark prints both. So the
  default, `format: "auto"`, searches both and keeps the one faster on the compressing machine
  (batch 32, one thread, timed side by side); the report gives both candidates' figures.
* distill: a student with `len(layers)` of the teacher's encoder layers (initialized from
  them, embeddings and the rest copied). Unset `layers` means the 3 layers whose untrained
  student best ranks the pairwise similarities of validation sentences (held-out sentences
  that are not the fixed measurement set); on MiniLM that is 0, 4, 5 (untrained Spearman
  0.67 where 1, 3, 5 gives 0.44). The teacher's embedding and last-layer token states of
  a training text are computed the first time a batch holds it (float16 states, its tokens
  only) and kept, so later epochs run only the student and a short run pays the teacher only
  for the texts it sees. The
  loss is MSE + cosine on each embedding, the squared error of the batch's pairwise cosine
  similarities (what the Spearman measurement ranks, weighted 10) and the squared error of
  the last layer's token states over the attention mask (the states the embedding pools: a
  denser signal than one vector per text). The texts are the training sentences and their
  clauses (split at `;`, `:` and `,`; none equals a held-out sentence), truncated at
  `max_length` tokens (default 128, as the measurements embed them: at 32 the student never
  learned the positions past 32 that 45% of the fixed set's sentences reach; 240 steps reached
  validation Spearman 0.861 at 128 against 0.851 at 32) and batched by similar length,
  re-batched at random each epoch. The prose of the standard library's docstrings (11.5k
  sentences; with their clauses 20.6k texts, 5× the corpus's 4.1k) is mixed in: each batch
  is a docstring batch with probability `docstring_share` (default 0.5), so an epoch (one
  pass over the corpus texts) also holds about as many docstring batches, cycling through
  their own shuffled order. The corpus alone is too small for a long run: after 1200 steps
  without docstrings the student ranked training texts at Spearman 0.974 but validation at
  0.895 and the fixed set at 0.875 (it memorizes its 4.1k texts); with half the batches from
  docstrings, 0.952 on training texts, 0.904 on validation and 0.894 on the fixed set (at
  240 steps they did not help yet: 0.846 against 0.851 on validation). The student trains
  without dropout (`dropout`, default 0): its targets are the teacher's exact outputs, not
  labels to generalize from, and with MiniLM's 0.1 the same 1200 steps reached validation
  0.904 and the fixed set 0.894, against 0.913 and 0.909 without. The word-embedding table (half
  of MiniLM's weights) stays the teacher's, which makes each optimizer step several times
  cheaper. The learning rate warms up linearly over the first 6% of the run to its peak
  (default 1e-3; on MiniLM a 600-step run at 1e-3 reached validation Spearman 0.874, a
  200-step run at 3e-4 0.839: short runs gain from the higher peak, the number of steps
  matters most), then follows a cosine
  to zero; the run's progress is the larger of steps done and time spent, so the schedule completes whichever
  bound (`epochs` or `max_steps`, `max_seconds`) comes first. The report carries the
  Spearman correlation of pairwise similarities before and after, on the validation
  sentences (watched each epoch) and on the fixed set.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from maas_runtime.errors import FailedPrecondition, InvalidArgument
from maas_text import HfDirectory

from maas_compressor.hf_models import (
    ONNX_WEIGHTS,
    RUNTIME_ONNXRUNTIME,
    RUNTIME_TORCH,
    copy_without_weights,
    docstring_sentences,
    embed,
    interleaved_latencies,
    mean_cosine,
    probe_sentences,
    similarity_spearman,
    training_sentences,
    validation_sentences,
    weights_path,
)
from maas_compressor.steps.base import HfForm, ModelUnderCompression, StepContext, StepResult

ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_OUTPUT = "sentence_embedding"
DEFAULT_OPSET = 18
MIN_EXPORT_COSINE = 0.9999
DEFAULT_MIN_MEAN_COSINE = 0.99
QUANTIZED_OP_TYPES = ("MatMul", "Gather")
FORMAT_ONNX = "onnx"
FORMAT_TORCH = "torch"
FORMAT_AUTO = "auto"
ENCODER_FORMATS = (FORMAT_AUTO, FORMAT_ONNX, FORMAT_TORCH)
FORMAT_TIMING_ROUNDS = 7
POOLING_IN_GRAPH = ("mean", "cls")
DEFAULT_STUDENT_SIZE = 3
DEFAULT_DISTILL_EPOCHS = 3
DEFAULT_DISTILL_SECONDS = 600.0
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_PAIR_WEIGHT = 10.0
DEFAULT_TOKEN_WEIGHT = 1.0
DEFAULT_DISTILL_TRAINING_TOKENS = 128
DEFAULT_DOCSTRING_SHARE = 0.5
DEFAULT_STUDENT_DROPOUT = 0.0
BUCKET_BATCHES = 8
WARM_UP_SHARE = 0.06
DISTILL_BATCH = 32
DISTILL_MAX_TOKENS = 128
MIN_CLAUSE_CHARACTERS = 24


def _encoder_module(directory: Path) -> Any:
    """The float torch encoder of `directory`; an int8 one is refused (it is a result, not a
    source: convert, distill and quantize start from its float encoder)."""
    from transformers import AutoModel

    if HfDirectory.open(directory).int8_layers:
        raise FailedPrecondition("the encoder is int8 already (maas_quantization.json); convert, "
                                 "distill and quantize start from its float encoder",
                                 reason="ALREADY_QUANTIZED")
    return AutoModel.from_pretrained(str(directory), local_files_only=True, use_safetensors=True).eval()


def pooled_encoder(encoder: Any, pooling: str) -> Any:
    """`encoder` followed by the directory's pooling and L2 normalization, as one module."""
    import torch

    if pooling not in POOLING_IN_GRAPH:
        raise FailedPrecondition(f"pooling {pooling!r} cannot be exported; the graph pools "
                                 f"{' or '.join(POOLING_IN_GRAPH)}", reason="POOLING_UNSUPPORTED")

    class PooledEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            return pooled_states(hidden, attention_mask, pooling)

    return PooledEncoder()


def pooled_states(hidden: Any, attention_mask: Any, pooling: str) -> Any:
    """The L2-normalized sentence embedding of token states `hidden` [batch, tokens, dim]:
    the first token's state (`cls`) or the mean over the attention mask (`mean`)."""
    import torch

    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def _tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _tokenized(tokenizer: Any, sentences: Sequence[str],
               max_length: int = DISTILL_MAX_TOKENS) -> dict[str, Any]:
    """Torch inputs padded to the longest sentence, truncated at `max_length` tokens."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    return {name: batch[name] for name in ONNX_INPUTS}


def _require_torch(model: ModelUnderCompression, step: str) -> HfForm:
    form = model.form
    if not isinstance(form, HfForm) or form.runtime != RUNTIME_TORCH:
        raise FailedPrecondition(f"{step} works on the torch (safetensors) encoder; this one runs "
                                 f"on {getattr(form, 'runtime', type(form).__name__)}",
                                 reason="STEP_NEEDS_TORCH_MODEL")
    return form


def convert_hf(model: ModelUnderCompression, params: Mapping[str, Any], ctx: StepContext) -> StepResult:
    """Torch encoder → ONNX encoder directory (see module doc). Params: `opset`."""
    import onnx
    import torch

    from maas_compressor.onnx_models import strip_exporter_metadata
    from maas_compressor.steps.convert import _exporter_reason, opset_parameter

    opset = opset_parameter(params)
    form = _require_torch(model, "convert")
    checked = HfDirectory.open(form.directory)
    network = pooled_encoder(_encoder_module(form.directory), checked.pooling_mode).eval()
    target = ctx.workdir / f"onnx-opset{opset}"
    if target.exists():
        shutil.rmtree(target)
    copy_without_weights(form.directory, target)
    sentences = probe_sentences()
    example = _tokenized(_tokenizer(form.directory), sentences[:2])
    ctx.log(f"convert: exporting the encoder with {checked.pooling_mode} pooling to ONNX opset "
            f"{opset} (dynamo exporter, dynamic batch and sequence)")
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                network, tuple(example[name] for name in ONNX_INPUTS), dynamo=True,
                input_names=list(ONNX_INPUTS), output_names=[ONNX_OUTPUT],
                dynamic_shapes=tuple({0: batch, 1: sequence} for _ in ONNX_INPUTS),
                opset_version=opset, optimize=True, report=False, verbose=False)
            if program is None:
                raise RuntimeError("the dynamo exporter returned no program")
            program.save(str(target / ONNX_WEIGHTS), external_data=False)
        strip_exporter_metadata(target / ONNX_WEIGHTS)
    except Exception as error:  # the exporter raises many unrelated types for one cause
        raise FailedPrecondition(f"the encoder cannot be exported to ONNX: {_exporter_reason(error)}",
                                 reason="ONNX_EXPORT_FAILED") from error
    exported = HfForm(directory=target, runtime=RUNTIME_ONNXRUNTIME)
    expected, actual = embed(form, sentences), embed(exported, sentences)
    max_abs = float(np.max(np.abs(expected - actual)))
    cosine = mean_cosine(expected, actual)
    if cosine < MIN_EXPORT_COSINE:
        raise FailedPrecondition(f"the exported graph disagrees with torch on {len(sentences)} "
                                 f"sentences: mean cosine {cosine:.6f}, max abs difference {max_abs:.3g}",
                                 reason="ONNX_VERIFICATION_FAILED")
    ctx.log(f"convert: verified in onnxruntime on {len(sentences)} sentences: max abs difference "
            f"{max_abs:.3g}, mean cosine {cosine:.6f}")
    return StepResult(model=model.with_form(exported), details={
        "opset": opset, "exporter": f"torch.onnx dynamo (torch {torch.__version__}, onnx {onnx.__version__})",
        "inputs": list(ONNX_INPUTS), "output": ONNX_OUTPUT, "pooling_in_graph": checked.pooling_mode,
        "dynamic_axes": ["batch", "sequence"], "verified_sentences": len(sentences),
        "max_abs_difference": max_abs, "mean_cosine": cosine})


def _min_mean_cosine(params: Mapping[str, Any]) -> float:
    value = params.get("min_mean_cosine")
    if value is None and params.get("tolerance") is not None:
        value = 1.0 - float(params["tolerance"])
    if value is None:
        value = DEFAULT_MIN_MEAN_COSINE
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 1:
        raise InvalidArgument.for_field("min_mean_cosine", f"{value!r} must be in (0, 1]")
    return float(value)


def layer_role(module: str) -> str:
    """The role a layer plays in every encoder layer: `encoder.layer.3.output.dense` →
    `encoder.layer.*.output.dense`; keeping a role in float keeps it in all layers."""
    return re.sub(r"\.layer\.\d+\.", ".layer.*.", module)


def quantizable_layers(path: Path) -> dict[str, str]:
    """Node name → torch module of each MatMul/Gather with a constant weight."""
    import onnx

    from maas_compressor.onnx_models import torch_module_of

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {initializer.name for initializer in graph.initializer}
    layers = {}
    for node in graph.node:
        weight = node.input[0] if node.op_type == "Gather" else (node.input[1] if len(node.input) > 1 else "")
        if node.op_type in QUANTIZED_OP_TYPES and weight in initializers:
            layers[node.name] = torch_module_of(node) or node.name
    return layers


def quantize_hf(model: ModelUnderCompression, params: Mapping[str, Any], ctx: StepContext) -> StepResult:
    """Int8 encoder, accuracy-aware on mean cosine (see module doc). Params: `dtype` (int8),
    `format` ("auto", default: the faster of the two below on this machine; "onnx"; or
    "torch"), `per_channel` (default true; the torch format is per-channel only),
    `accuracy_aware` (default true for encoders), `min_mean_cosine` (default 0.99; or
    `tolerance` as 1 - cosine)."""
    dtype = str(params.get("dtype") or "").lower()
    if dtype != "int8":
        raise InvalidArgument.for_field("dtype", f"encoders are quantized to int8, not {dtype!r}")
    artifact_format = params.get("format") or FORMAT_AUTO
    if artifact_format not in ENCODER_FORMATS:
        raise InvalidArgument.for_field("format", f"{artifact_format!r} is not one of "
                                        f"{', '.join(ENCODER_FORMATS)}")
    if artifact_format == FORMAT_AUTO:
        return _faster_format(model, params, ctx)
    per_channel = params.get("per_channel")
    per_channel = True if per_channel is None else per_channel
    if not isinstance(per_channel, bool):
        raise InvalidArgument.for_field("per_channel", f"{per_channel!r} is not a boolean")
    if artifact_format == FORMAT_TORCH and not per_channel:
        raise InvalidArgument.for_field("per_channel", "the torch int8 encoder is per-channel only")
    accuracy_aware = bool(params.get("accuracy_aware", True))
    minimum = _min_mean_cosine(params)
    details: dict[str, Any] = {"dtype": "int8", "mode": "dynamic", "format": artifact_format,
                               "per_channel": per_channel, "min_mean_cosine": minimum}
    int8: _OnnxInt8 | _TorchInt8
    if artifact_format == FORMAT_TORCH:
        int8 = _TorchInt8(model, ctx)
    else:
        op_types = params.get("op_types") or list(QUANTIZED_OP_TYPES)
        details["op_types"] = list(op_types)
        if isinstance(model.form, HfForm) and model.form.runtime == RUNTIME_TORCH:
            converted = convert_hf(model, {}, ctx)
            model, details["converted"] = converted.model, converted.details
        int8 = _OnnxInt8(model, ctx, per_channel, op_types)
    source = int8.source
    sentences = probe_sentences()
    reference = embed(source, sentences)
    layers = int8.layers

    def write(kept_in_float: Sequence[str]) -> float:
        return mean_cosine(reference, embed(int8.write(kept_in_float), sentences))

    cosine = write([])
    ctx.log(f"quantize: every layer int8, mean cosine {cosine:.4f} (minimum {minimum})")
    kept: list[str] = []
    sensitivity: dict[str, float] = {}
    if accuracy_aware and cosine < minimum:
        roles: dict[str, list[str]] = {}
        for node, module in layers.items():
            roles.setdefault(layer_role(module), []).append(node)
        quantized_cosine = cosine
        for role, nodes in roles.items():
            sensitivity[role] = write(nodes) - quantized_cosine
            ctx.log(f"quantize: {role} in float recovers {sensitivity[role]:+.4f}")
        for role in sorted(roles, key=lambda r: -sensitivity[r]):
            kept.extend(roles[role])
            cosine = write(kept)
            ctx.log(f"quantize: {len(kept)} layer(s) in float, mean cosine {cosine:.4f}")
            if cosine >= minimum:
                break
    quantized = int8.target
    details.update({
        "mean_cosine": cosine, "gate_met": cosine >= minimum, "quantization_trials": int8.trials,
        "layers_kept_in_float": [layers[node] for node in kept],
        "sensitivity": sensitivity,
        "bytes_before": weights_path(source).stat().st_size,
        "bytes_after": weights_path(quantized).stat().st_size,
    })
    details["size_ratio"] = details["bytes_after"] / details["bytes_before"]
    if cosine < minimum:
        raise FailedPrecondition(f"int8 reaches mean cosine {cosine:.4f} with every layer role "
                                 f"in float, under the minimum {minimum}", reason="TOLERANCE_NOT_MET")
    ctx.log(f"quantize: int8 ({artifact_format}) mean cosine {cosine:.4f}, size "
            f"×{details['size_ratio']:.2f}, {len(kept)} layer(s) kept in float")
    return StepResult(model=model.with_form(quantized), details=details)


def _faster_format(model: ModelUnderCompression, params: Mapping[str, Any], ctx: StepContext) -> StepResult:
    """`format: "auto"`: both formats searched, each within the cosine minimum, then timed
    side by side on this machine (batch 32, one thread, interleaved rounds) and the faster
    kept. The torch format is a candidate only for a float torch encoder, per channel; a
    format that cannot meet the minimum drops out, and when neither can, the torch one's
    refusal (or the only candidate's) is raised."""
    form = model.form
    formats = [FORMAT_ONNX]
    if (isinstance(form, HfForm) and form.runtime == RUNTIME_TORCH and params.get("per_channel") is not False
            and not HfDirectory.open(form.directory).int8_layers):
        formats.append(FORMAT_TORCH)
    results: dict[str, StepResult] = {}
    refusal: FailedPrecondition | None = None
    for name in formats:
        try:
            results[name] = quantize_hf(model, {**params, "format": name}, ctx)
        except FailedPrecondition as error:
            if error.reason != "TOLERANCE_NOT_MET":
                raise
            ctx.log(f"quantize: format {name} cannot meet the cosine minimum: {error.message}")
            refusal = error
    if not results:
        assert refusal is not None
        raise refusal
    choice = {name: {"size_ratio": result.details["size_ratio"], "mean_cosine": result.details["mean_cosine"]}
              for name, result in results.items()}
    chosen = next(iter(results))
    if len(results) > 1:  # nothing to time with one candidate
        forms = {name: result.model.form for name, result in results.items()
                 if isinstance(result.model.form, HfForm)}
        for name, timings in interleaved_latencies(forms, probe_sentences(), FORMAT_TIMING_ROUNDS).items():
            choice[name]["latency_ms_b32_t1"] = statistics.median(timings)
        chosen = min(choice, key=lambda name: choice[name]["latency_ms_b32_t1"])
        timed = ", ".join(f"{name} {choice[name]['latency_ms_b32_t1']:.1f} ms" for name in choice)
        ctx.log(f"quantize: {timed} at batch 32 on one thread: keeping {chosen}")
    result = results[chosen]
    return StepResult(model=result.model, details={**result.details, "format_requested": FORMAT_AUTO,
                                                   "format_candidates": choice})


class _OnnxInt8:
    """Int8 variants of an ONNX encoder: onnxruntime's dynamic quantization of its MatMul and
    Gather nodes, each variant excluding the given nodes."""

    def __init__(self, model: ModelUnderCompression, ctx: StepContext, per_channel: bool,
                 op_types: Sequence[str]) -> None:
        import onnx

        from maas_compressor.steps.quantize import quantization_already_applied

        source = model.form
        if not isinstance(source, HfForm):
            raise FailedPrecondition("quantize_hf works on an encoder directory", reason="MODEL_NOT_HF")
        already = quantization_already_applied(onnx.load(str(weights_path(source))))
        if already:
            raise FailedPrecondition(f"the model is already quantized: {already}", reason="ALREADY_QUANTIZED")
        self.source, self.per_channel, self.op_types = source, per_channel, list(op_types)
        self.layers = quantizable_layers(weights_path(source))
        self.target = HfForm(ctx.workdir / "onnx-int8", RUNTIME_ONNXRUNTIME)
        self.trials = 0

    def write(self, kept_in_float: Sequence[str]) -> HfForm:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        _fresh_copy(self.source, self.target)
        quantize_dynamic(weights_path(self.source), weights_path(self.target), weight_type=QuantType.QInt8,
                         per_channel=self.per_channel, op_types_to_quantize=self.op_types,
                         nodes_to_exclude=list(kept_in_float))
        self.trials += 1
        return self.target


class _TorchInt8:
    """Int8 variants of a torch encoder (`maas_text.int8`): every Linear layer and embedding
    table int8 per row except the given layers."""

    def __init__(self, model: ModelUnderCompression, ctx: StepContext) -> None:
        from maas_text.int8 import quantizable_layers as torch_layers

        self.source = _require_torch(model, "the torch int8 quantize")
        self._encoder = _encoder_module(self.source.directory)
        self.layers = {name: name for name in torch_layers(self._encoder)}
        self.target = HfForm(ctx.workdir / "torch-int8", RUNTIME_TORCH)
        self.trials = 0

    def write(self, kept_in_float: Sequence[str]) -> HfForm:
        from maas_text.int8 import save_int8

        _fresh_copy(self.source, self.target)
        save_int8(self._encoder, [name for name in self.layers if name not in kept_in_float],
                  self.target.directory)
        self.trials += 1
        return self.target


def _fresh_copy(source: HfForm, target: HfForm) -> None:
    """`target`'s directory emptied and given the source's configs and tokenizer."""
    if target.directory.exists():
        shutil.rmtree(target.directory)
    copy_without_weights(source.directory, target.directory)


def student_layers(params: Mapping[str, Any], teacher_layers: int) -> list[int] | None:
    """The teacher layers `params["layers"]` names, sorted; None when unset (chosen by
    `choose_student_layers`)."""
    layers = params.get("layers")
    if layers is None:
        return None
    if (not isinstance(layers, list | tuple) or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < teacher_layers
                       for i in layers)
            or len(set(layers)) != len(layers)):
        raise InvalidArgument.for_field(
            "layers", f"{layers!r} must name distinct teacher layers in 0..{teacher_layers - 1}")
    return sorted(int(i) for i in layers)


def build_student(teacher: Any, layers: Sequence[int]) -> Any:
    """A copy of `teacher` keeping only the encoder layers `layers` (weights copied)."""
    import copy

    import torch

    student = copy.deepcopy(teacher)
    student.encoder.layer = torch.nn.ModuleList([copy.deepcopy(teacher.encoder.layer[i]) for i in layers])
    student.config.num_hidden_layers = len(layers)
    return student


def set_dropout(module: Any, probability: float) -> None:
    """Every dropout of `module` (hidden states and attention alike) drops with `probability`."""
    import torch

    for child in module.modules():
        if isinstance(child, torch.nn.Dropout):
            child.p = probability


def choose_student_layers(teacher: Any, pooling: str, batch: Mapping[str, Any], reference: np.ndarray,
                          size: int = DEFAULT_STUDENT_SIZE) -> tuple[list[int], dict[str, float]]:
    """The `size` teacher layers whose untrained student ranks `batch`'s pairwise similarities
    most like the teacher (`reference`, its embeddings of `batch`), and every candidate's score."""
    import itertools

    import torch

    scores: dict[str, float] = {}
    for candidate in itertools.combinations(range(teacher.config.num_hidden_layers), size):
        student = pooled_encoder(build_student(teacher, candidate), pooling).eval()
        with torch.inference_mode():
            scores[",".join(map(str, candidate))] = similarity_spearman(reference, student(**batch).numpy())
    best = max(scores, key=lambda name: scores[name])
    return [int(i) for i in best.split(",")], scores


def distillation_texts(sentences: Sequence[str], held_out: Sequence[str]) -> list[str]:
    """`sentences` and their clauses of at least `MIN_CLAUSE_CHARACTERS` (split at `;`, `:`
    and `,`), deduplicated in order, none equal to a `held_out` sentence."""
    excluded = set(held_out)
    texts: list[str] = []
    for sentence in sentences:
        texts.append(sentence)
        clauses = [c.strip() for c in re.split(r"(?<=[;:,])\s+", sentence)]
        if len(clauses) > 1:
            texts.extend(c for c in clauses if len(c) >= MIN_CLAUSE_CHARACTERS)
    return [t for t in dict.fromkeys(texts) if t not in excluded]


def learning_rate_factor(progress: float) -> float:
    """Linear warm-up over `WARM_UP_SHARE` of the run, then a cosine to zero; `progress` in [0, 1]."""
    import math

    progress = min(max(progress, 0.0), 1.0)
    if progress < WARM_UP_SHARE:
        return max(progress / WARM_UP_SHARE, 0.01)
    return 0.5 * (1 + math.cos(math.pi * (progress - WARM_UP_SHARE) / (1 - WARM_UP_SHARE)))


def distillation_loss(output: Any, target: Any, pair_weight: float, token_states: Any = None,
                      target_states: Any = None, attention_mask: Any = None,
                      token_weight: float = 0.0) -> Any:
    """MSE (scaled by the dimension) + (1 - cosine) per embedding, plus `pair_weight` × the
    mean squared error of the batch's pairwise cosine similarities (both sides unit vectors),
    plus `token_weight` × the mean squared error of the last layer's token states over the
    attention mask (the states the embedding pools: a denser signal than one vector)."""
    import torch

    loss = (torch.nn.functional.mse_loss(output, target) * output.shape[1]
            + (1 - torch.nn.functional.cosine_similarity(output, target)).mean())
    if pair_weight > 0 and output.shape[0] >= 2:
        loss = loss + pair_weight * torch.nn.functional.mse_loss(output @ output.T, target @ target.T)
    if token_weight > 0 and token_states is not None:
        mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
        squared = ((token_states - target_states) ** 2 * mask).sum()
        loss = loss + token_weight * squared / (mask.sum() * token_states.shape[-1]).clamp(min=1.0)
    return loss


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, generator: Any) -> list[list[int]]:
    """A random epoch of index batches in which each batch holds texts of similar length (a
    random permutation is cut into windows of 8 batches, each sorted by length), so padding
    to the longest text costs little; the batches are then shuffled."""
    import torch

    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * BUCKET_BATCHES
    batches: list[list[int]] = []
    for first in range(0, len(order), window):
        chunk = sorted(order[first:first + window], key=lambda index: lengths[index])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def mixed_batches(corpus_batches: Sequence[list[int]], extra: Iterator[list[int]] | None, share: float,
                  generator: Any) -> list[list[int]]:
    """One epoch: every batch of `corpus_batches` in order, with batches drawn from `extra`
    between them so that each batch of the epoch is an extra one with probability `share`
    (before each corpus batch, extra batches follow one another while a uniform draw stays
    under `share`: share/(1 - share) of them per corpus batch on average)."""
    import torch

    if extra is None or share <= 0:
        return list(corpus_batches)
    epoch: list[list[int]] = []
    for batch in corpus_batches:
        while float(torch.rand((), generator=generator)) < share:
            epoch.append(next(extra))
        epoch.append(batch)
    return epoch


def endless_batches(lengths: Sequence[int], offset: int, batch_size: int,
                    generator: Any) -> Iterator[list[int]]:
    """Length-bucketed batches of the texts `offset + i` (`lengths[i]` tokens), one random
    epoch after another, for ever."""
    while True:
        for batch in length_bucketed_batches(lengths, batch_size, generator):
            yield [offset + index for index in batch]


def _positive(params: Mapping[str, Any], name: str, default: float) -> float:
    value = params.get(name)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidArgument.for_field(name, f"{value!r} must be a positive number")
    return float(value)


def _not_negative(params: Mapping[str, Any], name: str, default: float) -> float:
    value = params.get(name)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidArgument.for_field(name, f"{value!r} must not be negative")
    return float(value)


class TeacherTargets:
    """The teacher's embedding and last-layer token states (float16, the text's tokens only) of
    each training text, computed the first time a batch holds the text (from the batch's own
    inputs) and kept: later epochs run the student only, and a run pays the teacher for the
    texts it trains on, not for the whole corpus up front."""

    def __init__(self, teacher: Any, pooling: str, count: int) -> None:
        self.teacher, self.pooling, self.dimension = teacher, pooling, teacher.config.hidden_size
        self.embeddings: list[Any] = [None] * count
        self.states: list[Any] = [None] * count

    def of(self, chosen: Sequence[int], batch: Mapping[str, Any]) -> tuple[Any, Any]:
        """Embeddings [texts, dim] and token states [texts, width of `batch`, dim] (zeros past
        each text's end) of the texts `chosen`, whose student inputs are `batch`."""
        import torch

        missing = [row for row, index in enumerate(chosen) if self.states[index] is None]
        if missing:
            rows = torch.tensor(missing)
            inputs = {name: value[rows] for name, value in batch.items()}
            with torch.no_grad():  # not inference_mode: the targets enter the autograd loss
                hidden = self.teacher(**inputs).last_hidden_state
                pooled = pooled_states(hidden, inputs["attention_mask"], self.pooling)
            for position, row in enumerate(missing):
                tokens = int(inputs["attention_mask"][position].sum())
                self.states[chosen[row]] = hidden[position, :tokens].half()
                self.embeddings[chosen[row]] = pooled[position]
        width = batch["input_ids"].shape[1]
        states = torch.zeros(len(chosen), width, self.dimension)
        for row, index in enumerate(chosen):
            text_states = self.states[index]
            states[row, :text_states.shape[0]] = text_states.float()
        return torch.stack([self.embeddings[index] for index in chosen]), states


def token_lengths(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[int]:
    """Each text's number of tokens once truncated at `max_length` (what batching sorts by)."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return [len(ids) for ids in encoded]


def distill_hf(model: ModelUnderCompression, params: Mapping[str, Any], ctx: StepContext) -> StepResult:
    """A smaller encoder trained on the teacher's embeddings and token states (see module doc).
    Params: `layers` (teacher layers kept; unset: the best 3 by untrained validation
    Spearman), `epochs`, `max_steps` (optional cap), `max_seconds`, `learning_rate` (peak,
    default 1e-3), `pair_weight` (pairwise-similarity loss, default 10; 0 turns it off),
    `token_weight` (token-state loss, default 1; 0 turns it off), `max_length` (training
    tokens per text, default 128), `training_sentences` (how many training texts; default
    all), `docstring_share` (the share of batches drawn from the standard library's docstring
    sentences, in [0, 1); default 0.5, 0 trains on the corpus alone), `dropout` (the student's
    dropout while it trains, in [0, 1); default 0), `train_word_embeddings` (default false: the
    teacher's table is kept)."""
    import torch

    form = _require_torch(model, "distill")
    epochs = int(params.get("epochs") or DEFAULT_DISTILL_EPOCHS)
    max_seconds = float(params.get("max_seconds") or DEFAULT_DISTILL_SECONDS)
    learning_rate = float(params.get("learning_rate") or DEFAULT_LEARNING_RATE)
    if epochs <= 0 or max_seconds <= 0 or learning_rate <= 0:
        raise InvalidArgument.for_field("epochs", "epochs, max_seconds and learning_rate must be positive")
    pair_weight = _not_negative(params, "pair_weight", DEFAULT_PAIR_WEIGHT)
    token_weight = _not_negative(params, "token_weight", DEFAULT_TOKEN_WEIGHT)
    max_length = int(_positive(params, "max_length", DEFAULT_DISTILL_TRAINING_TOKENS))
    train_word_embeddings = bool(params.get("train_word_embeddings", False))
    docstring_share = _not_negative(params, "docstring_share", DEFAULT_DOCSTRING_SHARE)
    if docstring_share >= 1:
        raise InvalidArgument.for_field("docstring_share", f"{docstring_share!r} must be under 1: "
                                        f"the corpus itself is always trained on")
    dropout = _not_negative(params, "dropout", DEFAULT_STUDENT_DROPOUT)
    if dropout >= 1:
        raise InvalidArgument.for_field("dropout", f"{dropout!r} must be under 1")
    checked = HfDirectory.open(form.directory)
    teacher_encoder = _encoder_module(form.directory)
    layers = student_layers(params, teacher_encoder.config.num_hidden_layers)
    teacher = pooled_encoder(teacher_encoder, checked.pooling_mode).eval()
    tokenizer = _tokenizer(form.directory)
    probe, validation = probe_sentences(), validation_sentences()
    corpus = distillation_texts(training_sentences(), [*probe, *validation])
    limit = params.get("training_sentences")
    if limit:
        corpus = corpus[: int(limit)]
    extra = distillation_texts(docstring_sentences(), [*probe, *validation]) if docstring_share else []
    generator = torch.Generator().manual_seed(ctx.seed)
    torch.manual_seed(ctx.seed)
    tokenize = _tokenized_by(tokenizer, max_length)
    probe_batch = _tokenized(tokenizer, probe)
    validation_batch = _tokenized(tokenizer, validation)
    with torch.inference_mode():
        reference = teacher(**probe_batch).numpy()
        validation_reference = teacher(**validation_batch).numpy()
    layer_scores: dict[str, float] = {}
    if layers is None:
        layers, layer_scores = choose_student_layers(teacher_encoder, checked.pooling_mode,
                                                     validation_batch, validation_reference)
        ctx.log(f"distill: untrained validation Spearman per choice of layers "
                f"{ {k: round(v, 3) for k, v in layer_scores.items()} }; keeping {layers}")
    started = time.monotonic()
    texts = [*corpus, *extra]
    targets = TeacherTargets(teacher_encoder, checked.pooling_mode, len(texts))
    lengths = token_lengths(tokenizer, corpus, max_length)
    extra_batches = (endless_batches(token_lengths(tokenizer, extra, max_length), len(corpus),
                                     DISTILL_BATCH, generator) if extra else None)
    student_encoder = build_student(teacher_encoder, layers)
    student_encoder.embeddings.word_embeddings.weight.requires_grad_(train_word_embeddings)
    set_dropout(student_encoder, dropout)
    student = pooled_encoder(student_encoder, checked.pooling_mode)

    def spearman(batch: Mapping[str, Any], expected: np.ndarray) -> float:
        student.eval()
        with torch.inference_mode():
            return similarity_spearman(expected, student(**batch).numpy())

    before = spearman(probe_batch, reference)
    validation_before = spearman(validation_batch, validation_reference)
    steps_per_epoch = round(-(-len(corpus) // DISTILL_BATCH) / (1 - docstring_share))
    total_steps = epochs * steps_per_epoch
    if params.get("max_steps"):
        total_steps = min(total_steps, int(_positive(params, "max_steps", 1)))
    ctx.log(f"distill: student keeps teacher layers {layers}; validation Spearman "
            f"{validation_before:.4f} untrained; {len(corpus)} texts and {len(extra)} docstring texts "
            f"(share {docstring_share:g}) at ≤{max_length} tokens, "
            f"{total_steps} step(s) or {max_seconds:.0f}s; peak learning rate {learning_rate:g}, "
            f"pair weight {pair_weight:g}, token weight {token_weight:g}, dropout {dropout:g}")
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=learning_rate)
    epochs_run, steps, stopped_early = 0, 0, False
    while steps < total_steps and not stopped_early:
        student.train()
        total, epoch_steps = 0.0, 0
        for chosen in mixed_batches(length_bucketed_batches(lengths, DISTILL_BATCH, generator),
                                    extra_batches, docstring_share, generator):
            progress = max(steps / total_steps, (time.monotonic() - started) / max_seconds)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * learning_rate_factor(progress)
            batch = tokenize([texts[i] for i in chosen])
            target_embeddings, target_states = targets.of(chosen, batch)
            states = student_encoder(**batch).last_hidden_state
            loss = distillation_loss(pooled_states(states, batch["attention_mask"], checked.pooling_mode),
                                     target_embeddings, pair_weight, states, target_states,
                                     batch["attention_mask"], token_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            epoch_steps += 1
            total += float(loss.detach())
            if time.monotonic() - started > max_seconds:
                stopped_early = True
            if stopped_early or steps >= total_steps:
                break
        epochs_run += 1
        validation_now = spearman(validation_batch, validation_reference)
        ctx.metrics({"epoch": float(epochs_run), "loss": total / max(epoch_steps, 1),
                     "validation_spearman": validation_now})
    after = spearman(probe_batch, reference)
    validation_after = spearman(validation_batch, validation_reference)
    target_dir = ctx.workdir / "student"
    if target_dir.exists():
        shutil.rmtree(target_dir)
    copy_without_weights(form.directory, target_dir)
    student_encoder.save_pretrained(str(target_dir), safe_serialization=True)
    _write_student_note(target_dir, layers)
    ctx.log(f"distill: validation Spearman {validation_before:.4f} → {validation_after:.4f}, fixed "
            f"set {before:.4f} → {after:.4f} after {epochs_run} epoch(s), {steps} step(s)")
    return StepResult(model=model.with_form(HfForm(target_dir, RUNTIME_TORCH)), details={
        "teacher_layers_kept": layers, "layer_choice_spearman": layer_scores,
        "epochs": epochs_run, "steps": steps,
        "stopped_by_time": stopped_early, "training_sentences": len(corpus),
        "docstring_texts": len(extra), "docstring_share": docstring_share, "dropout": dropout,
        "max_length": max_length,
        "pair_weight": pair_weight, "token_weight": token_weight,
        "learning_rate": learning_rate, "train_word_embeddings": train_word_embeddings,
        "seconds": time.monotonic() - started, "validation_sentences": len(validation),
        "validation_spearman_untrained": validation_before, "validation_spearman": validation_after,
        "spearman_untrained": before, "spearman": after})


def _tokenized_by(tokenizer: Any, max_length: int) -> Any:
    """`texts` → torch inputs truncated at `max_length`, as one callable."""
    def tokenize(texts: Sequence[str]) -> dict[str, Any]:
        return _tokenized(tokenizer, texts, max_length)

    return tokenize


def _write_student_note(directory: Path, layers: Sequence[int]) -> None:
    """config.json records where the student's layers came from."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["maas_distilled_from_layers"] = list(layers)
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
