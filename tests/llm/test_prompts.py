"""Prompts are rendered with the model's own chat template and counted with its tokenizer,
exactly as transformers does, without importing torch; bad conversations are refused by field."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from maas_formats import validate_causal_lm, validate_hf_transformer, validate_model_artifact
from maas_llm.directory import CausalLmDirectory, unzip_causal_lm, zip_causal_lm
from maas_llm.prompts import ChatMessage, PromptRenderer
from maas_runtime.errors import InvalidArgument
from maas_text.directory import minilm_directory, zip_directory

from tests.support.llm import smollm2_causal_lm_zip

CONVERSATION = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Ünïcödé ✓"},
]


def test_rendering_and_counting_match_transformers_apply_chat_template(smollm2):
    from transformers import AutoTokenizer

    renderer = PromptRenderer.from_directory(smollm2)
    reference = AutoTokenizer.from_pretrained(smollm2.path)
    text = renderer.render(CONVERSATION)
    assert text == reference.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    expected_ids = reference(text, add_special_tokens=False)["input_ids"]
    assert renderer.encode(text) == expected_ids
    assert renderer.count_tokens(text) == len(expected_ids)
    assert renderer.render([ChatMessage("user", "hi")], add_generation_prompt=False).endswith("<|im_end|>\n")


def test_the_renderer_imports_neither_torch_nor_transformers(smollm2):
    probe = (
        "import sys\n"
        "from maas_llm.prompts import PromptRenderer\n"
        f"r = PromptRenderer.from_directory({str(smollm2.path)!r})\n"
        "assert r.count_tokens(r.render([{'role': 'user', 'content': 'hi'}])) > 3\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_bad_conversations_are_refused_naming_the_field(smollm2):
    renderer = PromptRenderer.from_directory(smollm2)
    with pytest.raises(InvalidArgument) as caught:
        renderer.render([])
    assert caught.value.field_violations[0].field == "messages"
    with pytest.raises(InvalidArgument) as caught:
        renderer.render([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])
    assert caught.value.field_violations[0].field == "messages[1].role"


def test_a_hostile_chat_template_cannot_reach_python_internals(smollm2):
    renderer = PromptRenderer(
        PromptRenderer.from_directory(smollm2)._tokenizer,
        "{{ messages.__class__.__mro__[1].__subclasses__() }}",
        {},
    )
    with pytest.raises(InvalidArgument) as caught:
        renderer.render([{"role": "user", "content": "hi"}])
    assert "chat template refused" in caught.value.message


def test_the_causal_lm_zip_passes_the_registry_check_and_unzips_to_the_same_model(smollm2, tmp_path):
    archive = smollm2_causal_lm_zip()
    info = validate_causal_lm(archive)
    assert "model.safetensors" in info.weights and info.parameter_count > 100_000_000
    facts = validate_model_artifact(archive, "causal-lm")
    assert facts.format_name == "causal-lm"
    unzipped = unzip_causal_lm(archive, tmp_path / "unzipped")
    assert unzipped.chat_template == smollm2.chat_template
    assert unzipped.eos_token_ids() == (2,)
    assert unzipped.context_length == 8192


def test_a_causal_lm_declared_as_hf_transformer_is_a_format_mismatch():
    with pytest.raises(InvalidArgument) as caught:
        validate_model_artifact(smollm2_causal_lm_zip(), "hf-transformer")
    assert caught.value.reason == "FORMAT_MISMATCH"
    assert caught.value.metadata["artifact_format"] == "causal-lm"
    with pytest.raises(InvalidArgument) as caught:
        validate_hf_transformer(smollm2_causal_lm_zip())
    assert caught.value.reason == "CAUSAL_LM_NOT_ENCODER"


def test_an_encoder_declared_as_causal_lm_is_refused(tmp_path):
    encoder = zip_directory(minilm_directory(), tmp_path / "minilm.zip")
    with pytest.raises(InvalidArgument) as caught:
        validate_causal_lm(encoder)
    assert caught.value.reason == "NOT_A_CAUSAL_LM"
    with pytest.raises(InvalidArgument) as caught:
        validate_model_artifact(encoder, "causal-lm")
    assert caught.value.reason == "FORMAT_MISMATCH"
    with pytest.raises(InvalidArgument) as caught:
        zip_causal_lm(minilm_directory(), tmp_path / "refused.zip")
    assert caught.value.reason == "NOT_A_CAUSAL_LM"


def test_a_causal_lm_zip_with_pickled_weights_is_refused(smollm2, tmp_path):
    archive = tmp_path / "pickled.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
            out.write(smollm2.path / name, name)
        out.writestr("pytorch_model.bin", b"\x80\x04not really")
    with pytest.raises(InvalidArgument) as caught:
        validate_causal_lm(archive)
    assert "pickle-capable" in caught.value.message


def test_a_directory_with_pickled_weights_is_refused_before_zipping(smollm2, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(smollm2.path, copy)
    (copy / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidArgument) as caught:
        CausalLmDirectory.open(copy)
    assert "pickle-capable" in caught.value.message
