"""The encoder distillation with its default recipe, long enough to mean something (about
5 minutes on one thread): 200 optimizer steps turn the 3-layer student the recipe picks (its
untrained pairwise-similarity Spearman about 0.67) into one that ranks the pairwise
similarities of the fixed sentence set and of the validation sentences at ≥ 0.82. Bounded by
steps, not time, so the result does not depend on the machine's load; the bench
(tests/bench/bench_transformers.py) runs the full budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from maas_compressor.hf_models import embed, load_hf, probe_sentences, similarity_spearman
from maas_compressor.steps.base import DataSplits, HfForm
from maas_compressor.steps.distill import distill
from maas_text import minilm_directory, zip_directory

from tests.compressor import torch_helpers
from tests.compressor.torch_helpers import RecordingContext

DRILL_STEPS = 200
MIN_SPEARMAN = 0.82


# One torch thread while the module runs (autouse), as the step tests measure.
one_torch_thread = torch_helpers.one_torch_thread


def test_two_hundred_steps_of_the_default_recipe_rank_pairwise_similarities_like_the_teacher(
        tmp_path: Path):
    source = load_hf(zip_directory(minilm_directory(), tmp_path / "minilm.zip"), tmp_path / "source")
    workdir = tmp_path / "distill"
    workdir.mkdir()
    context = RecordingContext(data=DataSplits(*(np.zeros((0, 1), np.float32) for _ in range(4))),
                               workdir=workdir)

    result = distill(source, {"epochs": 5, "max_steps": DRILL_STEPS, "max_seconds": 3600}, context)

    details = result.details
    assert details["steps"] == DRILL_STEPS and not details["stopped_by_time"]
    assert len(details["teacher_layers_kept"]) == 3
    assert details["spearman"] >= MIN_SPEARMAN, details
    assert details["validation_spearman"] >= MIN_SPEARMAN, details
    assert details["spearman"] > details["spearman_untrained"] + 0.1
    assert isinstance(source.form, HfForm) and isinstance(result.model.form, HfForm)
    served = similarity_spearman(embed(source.form, probe_sentences()),
                                 embed(result.model.form, probe_sentences()))
    assert served == pytest.approx(details["spearman"], abs=1e-3)  # what the saved student serves
