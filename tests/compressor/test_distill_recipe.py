"""The distillation recipe's parts, without training: the training texts (sentences and their
clauses, disjoint from the held-out sets), the validation sentences (held out, not the fixed
measurement set), the warm-up + cosine learning-rate factor, the loss that adds the batch's
pairwise similarities and the masked token states to the per-embedding terms, and the
length-bucketed batches; the standard library's docstring prose as extra training text, mixed
into each epoch at a share of the batches."""

from __future__ import annotations

import pytest
import torch
from maas_compressor.hf_models import (
    corpus_sentences,
    docstring_sentences,
    probe_sentences,
    training_sentences,
    validation_sentences,
)
from maas_compressor.steps.transformer import (
    MIN_CLAUSE_CHARACTERS,
    WARM_UP_SHARE,
    TeacherTargets,
    _tokenized,
    distillation_loss,
    distillation_texts,
    endless_batches,
    learning_rate_factor,
    length_bucketed_batches,
    mixed_batches,
    pooled_states,
    set_dropout,
)
from maas_text import minilm_directory
from transformers import AutoModel, AutoTokenizer


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


def test_docstring_sentences_are_prose_read_from_the_stdlib_source_and_never_held_out():
    sentences = docstring_sentences()
    assert len(sentences) > 2 * len(corpus_sentences())  # several times the documentation topics
    assert len(sentences) == len(set(sentences))
    assert not set(sentences) & set(corpus_sentences())  # so none is a held-out sentence
    assert not any(">>>" in s for s in sentences)
    assert all(20 <= len(s) <= 400 for s in sentences)
    # the json module's docstring, read from json/__init__.py without importing it
    assert any(s.startswith("JSON (JavaScript Object Notation)") for s in sentences)
    assert docstring_sentences() == sentences


def test_teacher_targets_are_the_teachers_states_computed_once_per_text():
    directory = minilm_directory()
    teacher = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    texts = ["A short one.", "A somewhat longer sentence about the standard library's modules.",
             "Another text.", "Unused."]
    targets = TeacherTargets(teacher, "mean", len(texts))
    chosen = [1, 0, 2]
    batch = _tokenized(tokenizer, [texts[i] for i in chosen])
    embeddings, states = targets.of(chosen, batch)

    assert states.shape == (3, batch["input_ids"].shape[1], 384) and embeddings.shape == (3, 384)
    for row, index in enumerate(chosen):
        alone = _tokenized(tokenizer, [texts[index]])
        with torch.no_grad():
            hidden = teacher(**alone).last_hidden_state
        tokens = hidden.shape[1]
        assert torch.allclose(states[row, :tokens], hidden[0], atol=2e-2)  # float16 kept
        assert not states[row, tokens:].any()  # zeros past the text's end
        assert torch.allclose(embeddings[row], pooled_states(hidden, alone["attention_mask"], "mean")[0],
                              atol=1e-4)
    assert targets.states[3] is None  # texts no batch held cost no teacher run
    targets.teacher = None  # a text seen before never runs the teacher again
    again, _ = targets.of([2, 0], _tokenized(tokenizer, [texts[2], texts[0]]))
    assert torch.equal(again, embeddings[[2, 1]])


def test_an_epoch_keeps_every_corpus_batch_in_order_and_mixes_in_extra_batches_at_the_share():
    corpus = [[i] for i in range(2000)]
    extra = endless_batches([3, 1, 2], 10_000, 1, torch.Generator().manual_seed(0))
    epoch = mixed_batches(corpus, extra, 0.5, torch.Generator().manual_seed(0))

    assert [b for b in epoch if b[0] < 10_000] == corpus  # every corpus batch, in its order
    drawn = [b[0] for b in epoch if b[0] >= 10_000]
    assert 0.45 < len(drawn) / len(epoch) < 0.55
    assert sorted(drawn[:3]) == [10_000, 10_001, 10_002]  # the extra texts cycle: each once per round
    assert sorted(drawn[3:6]) == [10_000, 10_001, 10_002]
    assert mixed_batches(corpus, extra, 0.0, torch.Generator()) == corpus
    assert mixed_batches(corpus, None, 0.5, torch.Generator()) == corpus
    quarter = mixed_batches(corpus, extra, 0.25, torch.Generator().manual_seed(1))
    assert 0.2 < 1 - len(corpus) / len(quarter) < 0.3


def test_set_dropout_turns_off_every_dropout_of_an_encoder_in_training_mode():
    encoder = AutoModel.from_pretrained(str(minilm_directory()), local_files_only=True).train()
    batch = _tokenized(AutoTokenizer.from_pretrained(str(minilm_directory()), local_files_only=True),
                       ["Dropout makes two training passes differ."])
    with torch.no_grad():
        assert not torch.equal(encoder(**batch).last_hidden_state, encoder(**batch).last_hidden_state)
        set_dropout(encoder, 0.0)
        assert torch.equal(encoder(**batch).last_hidden_state, encoder(**batch).last_hidden_state)
