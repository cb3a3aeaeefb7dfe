"""Convert a GGUF file into a Hugging Face causal-LM directory of bf16 safetensors.

transformers reads the GGUF (`gguf_file=`, weights unpacked to full precision: ~16 s and
1.1 GB for SmolLM2-135M), and the result is saved once as config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json, which
reloads in 1–2 s. The GGUF header is checked first (`read_gguf_header`), so a damaged file is
refused before transformers sees it. The directory appears atomically: written to a sibling
staging folder, checked as a causal LM, then renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

from maas_formats import atomic_output_directory
from maas_formats.gguf import read_gguf_header
from maas_runtime.errors import InvalidArgument

from maas_llm.directory import CausalLmDirectory


def convert_gguf_to_causal_lm(
    gguf_path: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    dtype: str = "bfloat16",
) -> CausalLmDirectory:
    """Write the causal-LM directory of the GGUF at `gguf_path` into `destination`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = Path(gguf_path)
    header = read_gguf_header(source, field_path="gguf_file")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise InvalidArgument.for_field("dtype", f"{dtype!r} is not a torch floating dtype")
    destination = Path(destination)
    with atomic_output_directory(destination) as staging:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        # dequantize=True: plain Linear layers holding dense weights, which save_pretrained can
        # write; the packed-GGUF modules cannot be serialized.
        model = AutoModelForCausalLM.from_pretrained(
            source.parent,
            gguf_file=source.name,
            dtype=torch_dtype,
            quantization_config=GgufConfig(dequantize=True),
        )
        # The dense model no longer depends on the GGUF quantizer; detached, it saves as a
        # plain checkpoint whose config names no quantization.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if header.name:
            model.config.name_or_path = header.name
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        CausalLmDirectory.open(staging)
    return CausalLmDirectory.open(destination)
