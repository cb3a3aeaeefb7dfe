"""The distillation recipe's parts, without training: the training texts (sentences and their
clauses, disjoint from the held-out set), the warm-up + cosine learning-rate factor, and the
loss that adds the batch's pairwise similarities to the per-embedding terms."""

from __future__ import annotations

import pytest
import torch
from maas_compressor.hf_models import probe_sentences, training_sentences
from maas_compressor.steps.transformer import (
    MIN_CLAUSE_CHARACTERS,
    WARM_UP_SHARE,
    distillation_loss,
    distillation_texts,
    learning_rate_factor,
)


def test_training_texts_add_clauses_and_never_hold_a_held_out_sentence():
    sentences = training_sentences()
    held_out = probe_sentences()
    texts = distillation_texts(sentences, held_out)

    assert len(texts) > 2 * len(sentences)
    assert not set(texts) & set(held_out)
    assert len(texts) == len(set(texts))
    assert texts[: 1] == sentences[: 1]
    clauses = distillation_texts(["Keep this clause as a text; and this other clause too, ok."], [])
    assert clauses == ["Keep this clause as a text; and this other clause too, ok.",
                       "Keep this clause as a text;", "and this other clause too,"]  # "ok." too short
    assert all(len(c) >= MIN_CLAUSE_CHARACTERS for c in clauses)
    assert distillation_texts(["A held-out one, with a clause in it."],
                              ["A held-out one, with a clause in it."]) == []


def test_learning_rate_warms_up_then_decays_to_zero_along_a_cosine():
    assert learning_rate_factor(0.0) == pytest.approx(0.01)
    assert learning_rate_factor(WARM_UP_SHARE / 2) == pytest.approx(0.5)
    assert learning_rate_factor(WARM_UP_SHARE) == pytest.approx(1.0)
    assert learning_rate_factor((1 + WARM_UP_SHARE) / 2) == pytest.approx(0.5)
    assert learning_rate_factor(1.0) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate_factor(3.0) == pytest.approx(0.0, abs=1e-12)


def test_the_loss_adds_the_pairwise_similarity_error_weighted():
    generator = torch.Generator().manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=1)
    output = torch.nn.functional.normalize(target + 0.3 * torch.randn(8, 16, generator=generator), dim=1)

    pointwise = distillation_loss(output, target, 0.0)
    pairwise = torch.nn.functional.mse_loss(output @ output.T, target @ target.T)
    assert float(distillation_loss(output, target, 10.0)) == pytest.approx(
        float(pointwise + 10.0 * pairwise), rel=1e-6)
    assert float(distillation_loss(target, target, 10.0)) == pytest.approx(0.0, abs=1e-6)
