"""The distillation recipe's parts, without training: the training texts (sentences and their
clauses, disjoint from the held-out sets), the validation sentences (held out, not the fixed
measurement set), the warm-up + cosine learning-rate factor, the loss that adds the batch's
pairwise similarities and the masked token states to the per-embedding terms, and the
length-bucketed batches."""

from __future__ import annotations

import pytest
import torch
from maas_compressor.hf_models import (
    corpus_sentences,
    probe_sentences,
    training_sentences,
    validation_sentences,
)
from maas_compressor.steps.transformer import (
    MIN_CLAUSE_CHARACTERS,
    WARM_UP_SHARE,
    distillation_loss,
    distillation_texts,
    learning_rate_factor,
    length_bucketed_batches,
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


def test_validation_sentences_are_held_out_and_not_the_fixed_measurement_set():
    validation, probe, training = validation_sentences(), probe_sentences(), training_sentences()
    assert len(validation) == 128
    assert not set(validation) & set(probe)
    assert not set(validation) & set(training)
    assert set(validation) <= set(corpus_sentences())
    assert not set(distillation_texts(training, [*probe, *validation])) & {*probe, *validation}


def test_the_loss_adds_the_token_state_error_over_the_attention_mask_weighted():
    generator = torch.Generator().manual_seed(1)
    target = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=1)
    output = torch.nn.functional.normalize(target + 0.2 * torch.randn(4, 8, generator=generator), dim=1)
    states = torch.randn(4, 5, 8, generator=generator)
    target_states = states.clone()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    target_states[mask == 0] += 100.0  # padding never counts
    target_states[1, 0] += 2.0  # one real token off by 2 in each of its 8 dimensions

    without_tokens = distillation_loss(output, target, 10.0)
    with_tokens = distillation_loss(output, target, 10.0, states, target_states, mask, 3.0)
    expected_token_error = (2.0 ** 2 * 8) / (int(mask.sum()) * 8)
    assert float(with_tokens) == pytest.approx(float(without_tokens) + 3.0 * expected_token_error, rel=1e-5)
    assert float(distillation_loss(output, target, 10.0, states, target_states, mask, 0.0)) == \
        pytest.approx(float(without_tokens))


def test_length_bucketed_batches_cover_every_text_once_with_similar_lengths_together():
    lengths = [(7 * i) % 31 + 1 for i in range(1000)]
    batches = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(0))
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(1000))
    assert all(len(batch) <= 32 for batch in batches)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 8  # unsorted random batches of these lengths span about 30
    again = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(0))
    assert again == batches
    assert length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(1)) != batches
