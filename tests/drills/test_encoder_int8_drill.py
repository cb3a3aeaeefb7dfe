"""Sentence-encoder int8 end to end, too slow for `make test`: the default format ("auto")
searches both int8 formats of MiniLM and keeps the one faster on this machine, and `maas
compress` turns an imported MiniLM into an int8 torch encoder registered with its label.
(The formats themselves, their refusals and serving are tested in tests/compressor and
tests/text.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from maas_compressor.hf_models import RUNTIME_ONNXRUNTIME, RUNTIME_TORCH, load_hf
from maas_compressor.steps.base import DataSplits
from maas_compressor.steps.quantize import quantize
from maas_text import minilm_directory, zip_directory
from maas_text.int8 import SCHEME

from tests.compressor import torch_helpers
from tests.compressor.torch_helpers import RecordingContext
from tests.support.cli_suite import maas_cli_fixture, running_suite_fixture

suite = running_suite_fixture("encoder-int8-cli")
maas = maas_cli_fixture()


# One torch thread while the module runs (autouse), as the step tests measure.
one_torch_thread = torch_helpers.one_torch_thread


def test_the_default_format_keeps_the_faster_of_both_on_this_machine(tmp_path: Path):
    source = load_hf(zip_directory(minilm_directory(), tmp_path / "minilm.zip"), tmp_path / "source")
    context = RecordingContext(data=DataSplits(*(np.zeros((0, 1), np.float32) for _ in range(4))),
                               workdir=tmp_path / "quantize")
    context.workdir.mkdir()
    result = quantize(source, {"dtype": "int8", "accuracy_aware": False, "min_mean_cosine": 0.9}, context)

    candidates = result.details["format_candidates"]
    assert result.details["format_requested"] == "auto" and set(candidates) == {"onnx", "torch"}
    faster = min(candidates, key=lambda name: candidates[name]["latency_ms_b32_t1"])
    assert result.details["format"] == faster
    runtime = result.model.form.runtime
    assert runtime == (RUNTIME_TORCH if faster == "torch" else RUNTIME_ONNXRUNTIME)
    assert all(candidate["mean_cosine"] >= 0.9 and candidate["size_ratio"] < 0.5
               for candidate in candidates.values())
    assert result.details["mean_cosine"] == candidates[faster]["mean_cosine"]


@pytest.mark.triton
def test_maas_compress_turns_an_imported_minilm_into_an_int8_torch_encoder(maas):
    imported = maas.json("import", "hf", str(minilm_directory()), "--model", "cli-minilm", "--json")
    compressed = maas.json("compress", imported["name"], "--step", "quantize:dtype=int8,format=torch",
                           "--dataset", "builtin:pydoc", "--output", "cli-minilm-int8", "--json")
    assert compressed["state"] == "JOB_STATE_SUCCEEDED", compressed
    assert compressed["spec"]["steps"][0]["quantize"]["format"] == "torch"
    version = maas.json("versions", "get", compressed["model_version"], "--json")
    assert version["labels"]["text.quantization"] == SCHEME
    assert compressed["report"]["after"]["runtime"] == "torch"
