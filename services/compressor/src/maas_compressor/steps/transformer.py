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
* distill: a student with `len(layers)` of the teacher's encoder layers (initialized from
  them, embeddings and the rest copied), trained to match the teacher's normalized embeddings
  on the training part of the pydoc corpus. The loss is MSE + cosine on each embedding plus
  the squared error of the batch's pairwise cosine similarities (what the Spearman measurement
  ranks). The texts are the training sentences and their clauses (split at `;`, `:` and `,`:
  more, shorter texts; none equals a held-out sentence), truncated at `max_length` tokens
  (default 64) for more steps per second and re-batched at random each epoch. The learning
  rate warms up linearly over the first 6% of the run, then follows a cosine to zero; the
  run's progress is the larger of steps done and time spent, so the schedule completes
  whichever bound (`epochs`, `max_seconds`) comes first. The report carries the Spearman
  correlation of pairwise similarities on the held-out sentences before and after.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
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
    embed,
    mean_cosine,
    probe_sentences,
    similarity_spearman,
    training_sentences,
    weights_path,
)
from maas_compressor.steps.base import HfForm, ModelUnderCompression, StepContext, StepResult

ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ONNX_OUTPUT = "sentence_embedding"
DEFAULT_OPSET = 18
MIN_EXPORT_COSINE = 0.9999
DEFAULT_MIN_MEAN_COSINE = 0.99
QUANTIZED_OP_TYPES = ("MatMul", "Gather")
POOLING_IN_GRAPH = ("mean", "cls")
DEFAULT_STUDENT_LAYERS = (1, 3, 5)
DEFAULT_DISTILL_EPOCHS = 3
DEFAULT_DISTILL_SECONDS = 600.0
DEFAULT_LEARNING_RATE = 2e-4
DEFAULT_PAIR_WEIGHT = 10.0
DEFAULT_DISTILL_TRAINING_TOKENS = 64
WARM_UP_SHARE = 0.06
DISTILL_BATCH = 32
DISTILL_MAX_TOKENS = 128
MIN_CLAUSE_CHARACTERS = 24


def _encoder_module(directory: Path) -> Any:
    from transformers import AutoModel

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
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return PooledEncoder()


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
    `per_channel` (default true), `accuracy_aware` (default true for encoders),
    `min_mean_cosine` (default 0.99; or `tolerance` as 1 - cosine)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from maas_compressor.steps.quantize import quantization_already_applied

    dtype = str(params.get("dtype") or "").lower()
    if dtype != "int8":
        raise InvalidArgument.for_field("dtype", f"encoders are quantized to int8, not {dtype!r}")
    per_channel = params.get("per_channel")
    per_channel = True if per_channel is None else per_channel
    if not isinstance(per_channel, bool):
        raise InvalidArgument.for_field("per_channel", f"{per_channel!r} is not a boolean")
    accuracy_aware = bool(params.get("accuracy_aware", True))
    op_types = params.get("op_types") or list(QUANTIZED_OP_TYPES)
    minimum = _min_mean_cosine(params)
    details: dict[str, Any] = {"dtype": "int8", "mode": "dynamic", "per_channel": per_channel,
                               "op_types": list(op_types), "min_mean_cosine": minimum}
    if isinstance(model.form, HfForm) and model.form.runtime == RUNTIME_TORCH:
        converted = convert_hf(model, {}, ctx)
        model, details["converted"] = converted.model, converted.details
    source = model.form
    if not isinstance(source, HfForm):
        raise FailedPrecondition("quantize_hf works on an encoder directory", reason="MODEL_NOT_HF")
    import onnx

    already = quantization_already_applied(onnx.load(str(weights_path(source))))
    if already:
        raise FailedPrecondition(f"the model is already quantized: {already}", reason="ALREADY_QUANTIZED")
    sentences = probe_sentences()
    reference = embed(source, sentences)
    layers = quantizable_layers(weights_path(source))
    target = ctx.workdir / "onnx-int8"
    trials = 0

    def write(kept_in_float: Sequence[str]) -> float:
        nonlocal trials
        if target.exists():
            shutil.rmtree(target)
        copy_without_weights(source.directory, target)
        quantize_dynamic(weights_path(source), target / ONNX_WEIGHTS, weight_type=QuantType.QInt8,
                         per_channel=per_channel, op_types_to_quantize=list(op_types),
                         nodes_to_exclude=list(kept_in_float))
        trials += 1
        return mean_cosine(reference, embed(HfForm(target, RUNTIME_ONNXRUNTIME), sentences))

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
    quantized = HfForm(target, RUNTIME_ONNXRUNTIME)
    details.update({
        "mean_cosine": cosine, "gate_met": cosine >= minimum, "quantization_trials": trials,
        "layers_kept_in_float": [layers[node] for node in kept],
        "sensitivity": sensitivity,
        "bytes_before": weights_path(source).stat().st_size,
        "bytes_after": weights_path(quantized).stat().st_size,
    })
    details["size_ratio"] = details["bytes_after"] / details["bytes_before"]
    if cosine < minimum:
        raise FailedPrecondition(f"int8 reaches mean cosine {cosine:.4f} with every layer role "
                                 f"in float, under the minimum {minimum}", reason="TOLERANCE_NOT_MET")
    ctx.log(f"quantize: int8 mean cosine {cosine:.4f}, size ×{details['size_ratio']:.2f}, "
            f"{len(kept)} layer(s) kept in float")
    return StepResult(model=model.with_form(quantized), details=details)


def student_layers(params: Mapping[str, Any], teacher_layers: int) -> list[int]:
    layers = params.get("layers") or list(DEFAULT_STUDENT_LAYERS)
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


def distillation_loss(output: Any, target: Any, pair_weight: float) -> Any:
    """MSE (scaled by the dimension) + (1 - cosine) per embedding, plus `pair_weight` × the
    mean squared error of the batch's pairwise cosine similarities (both sides unit vectors)."""
    import torch

    pointwise = (torch.nn.functional.mse_loss(output, target) * output.shape[1]
                 + (1 - torch.nn.functional.cosine_similarity(output, target)).mean())
    if pair_weight <= 0 or output.shape[0] < 2:
        return pointwise
    pairwise = torch.nn.functional.mse_loss(output @ output.T, target @ target.T)
    return pointwise + pair_weight * pairwise


def _positive(params: Mapping[str, Any], name: str, default: float) -> float:
    value = params.get(name)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidArgument.for_field(name, f"{value!r} must be a positive number")
    return float(value)


def distill_hf(model: ModelUnderCompression, params: Mapping[str, Any], ctx: StepContext) -> StepResult:
    """A smaller encoder trained on the teacher's embeddings (see module doc). Params: `layers`
    (teacher layers kept, default 1,3,5), `epochs`, `max_seconds`, `learning_rate` (peak,
    default 2e-4), `pair_weight` (weight of the pairwise-similarity loss, default 10; 0 turns
    it off), `max_length` (training tokens per text, default 64), `training_sentences` (how
    many training texts; default all)."""
    import torch

    form = _require_torch(model, "distill")
    epochs = int(params.get("epochs") or DEFAULT_DISTILL_EPOCHS)
    max_seconds = float(params.get("max_seconds") or DEFAULT_DISTILL_SECONDS)
    learning_rate = float(params.get("learning_rate") or DEFAULT_LEARNING_RATE)
    if epochs <= 0 or max_seconds <= 0 or learning_rate <= 0:
        raise InvalidArgument.for_field("epochs", "epochs, max_seconds and learning_rate must be positive")
    pair_weight = params.get("pair_weight")
    pair_weight = DEFAULT_PAIR_WEIGHT if pair_weight is None else pair_weight
    if isinstance(pair_weight, bool) or not isinstance(pair_weight, int | float) or pair_weight < 0:
        raise InvalidArgument.for_field("pair_weight", f"{pair_weight!r} must not be negative")
    pair_weight = float(pair_weight)
    max_length = int(_positive(params, "max_length", DEFAULT_DISTILL_TRAINING_TOKENS))
    checked = HfDirectory.open(form.directory)
    teacher_encoder = _encoder_module(form.directory)
    layers = student_layers(params, teacher_encoder.config.num_hidden_layers)
    teacher = pooled_encoder(teacher_encoder, checked.pooling_mode).eval()
    student = pooled_encoder(build_student(teacher_encoder, layers), checked.pooling_mode)
    probe = probe_sentences()
    corpus = distillation_texts(training_sentences(), probe)
    limit = params.get("training_sentences")
    if limit:
        corpus = corpus[: int(limit)]
    generator = torch.Generator().manual_seed(ctx.seed)
    tokenizer = _tokenized_by(_tokenizer(form.directory), max_length)
    with torch.no_grad():  # not inference_mode: the targets enter the autograd loss
        targets = torch.cat([teacher(**tokenizer(corpus[i:i + DISTILL_BATCH]))
                             for i in range(0, len(corpus), DISTILL_BATCH)])
        probe_batch = _tokenized(_tokenizer(form.directory), probe)
        reference = teacher(**probe_batch).numpy()

    def probe_spearman() -> float:
        student.eval()
        with torch.inference_mode():
            return similarity_spearman(reference, student(**probe_batch).numpy())

    before = probe_spearman()
    steps_per_epoch = -(-len(corpus) // DISTILL_BATCH)
    total_steps = epochs * steps_per_epoch
    ctx.log(f"distill: student keeps teacher layers {layers}; Spearman {before:.4f} untrained; "
            f"{len(corpus)} texts at ≤{max_length} tokens, up to {epochs} epoch(s) or "
            f"{max_seconds:.0f}s; peak learning rate {learning_rate:g}, pair weight {pair_weight:g}")
    optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate)
    started, epochs_run, steps, stopped_early = time.monotonic(), 0, 0, False
    for epoch in range(1, epochs + 1):
        student.train()
        total = 0.0
        order = torch.randperm(len(corpus), generator=generator)
        for first in range(0, len(corpus), DISTILL_BATCH):
            chosen = order[first:first + DISTILL_BATCH]
            progress = max(steps / total_steps, (time.monotonic() - started) / max_seconds)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * learning_rate_factor(progress)
            output = student(**tokenizer([corpus[i] for i in chosen.tolist()]))
            loss = distillation_loss(output, targets[chosen], pair_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            total += float(loss.detach())
            if time.monotonic() - started > max_seconds:
                stopped_early = True
                break
        epochs_run = epoch
        ctx.metrics({"epoch": float(epoch), "loss": total / steps_per_epoch})
        if stopped_early:
            break
    after = probe_spearman()
    target_dir = ctx.workdir / "student"
    if target_dir.exists():
        shutil.rmtree(target_dir)
    copy_without_weights(form.directory, target_dir)
    student.encoder.save_pretrained(str(target_dir), safe_serialization=True)
    _write_student_note(target_dir, layers)
    ctx.log(f"distill: Spearman {before:.4f} → {after:.4f} after {epochs_run} epoch(s), {steps} step(s)")
    return StepResult(model=model.with_form(HfForm(target_dir, RUNTIME_TORCH)), details={
        "teacher_layers_kept": layers, "epochs": epochs_run, "steps": steps,
        "stopped_by_time": stopped_early, "training_sentences": len(corpus),
        "max_length": max_length, "pair_weight": pair_weight, "learning_rate": learning_rate,
        "seconds": time.monotonic() - started, "spearman_untrained": before, "spearman": after})


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
