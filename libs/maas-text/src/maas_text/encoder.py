"""SentenceEncoder: a Hugging Face directory's tokenizer + model as normalized embeddings.

The tokenizer is transformers' AutoTokenizer over local files only (no hub, no network); its
Rust backend (`tokenizers`) does the work so each text's truncation is known. The model is
torch `AutoModel` from safetensors (never pickle; an int8 directory through
`maas_text.int8`) or, when the directory holds the ONNX
conversion (`model.onnx`), an onnxruntime session. Token states are pooled per the
directory's pooling config (mean by default) and L2-normalized, FP32.

torch, transformers and onnxruntime are imported when a model is loaded, never at import.
`threads` sets torch's intra-op threads, which is process-wide in torch: an encoder is meant
to own its process (a Triton model instance, a benchmark), as in-process serving does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from maas_text.directory import HfDirectory
from maas_text.inputs import DEFAULT_MAX_BATCH, decode_texts
from maas_text.int8 import load_int8_encoder


@dataclass(frozen=True)
class TokenizedBatch:
    """Token ids of a batch padded to its longest text: int64 arrays of shape [batch, tokens]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }


class SentenceEncoder:
    """Embeds texts as L2-normalized FP32 vectors; build it with `SentenceEncoder.load`."""

    def __init__(self, directory: HfDirectory, tokenizer: Any, run_model: Any, backend: str):
        self.directory = directory
        self._tokenizer = tokenizer
        self._run_model = run_model
        self.backend = backend

    @property
    def max_length(self) -> int:
        return self.directory.max_length

    @property
    def dimension(self) -> int:
        return self.directory.dimension

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str] | HfDirectory,
        threads: int = 1,
        *,
        prefer_onnx: bool = False,
    ) -> SentenceEncoder:
        """Load from a checked directory: torch when it holds safetensors, else onnxruntime.

        `prefer_onnx` picks model.onnx when a directory carries both.
        """
        checked = directory if isinstance(directory, HfDirectory) else HfDirectory.open(directory)
        tokenizer = _load_tokenizer(checked)
        use_onnx = checked.weights_format == "onnx" or (
            prefer_onnx and (checked.path / "model.onnx").is_file()
        )
        if use_onnx:
            return cls(checked, tokenizer, _onnx_runner(checked, threads), "onnxruntime")
        return cls(checked, tokenizer, _torch_runner(checked, threads), "torch")

    def tokenize(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> tuple[TokenizedBatch, list[bool]]:
        """Token ids padded to the longest text, and per text whether it was truncated."""
        limit = min(max_length or self.max_length, self.max_length)
        self._tokenizer.enable_truncation(limit)
        encodings = self._tokenizer.encode_batch(list(texts))
        truncated = [bool(encoding.overflowing) for encoding in encodings]
        batch = TokenizedBatch(
            input_ids=np.array([e.ids for e in encodings], dtype=np.int64),
            attention_mask=np.array([e.attention_mask for e in encodings], dtype=np.int64),
            token_type_ids=np.array([e.type_ids for e in encodings], dtype=np.int64),
        )
        return batch, truncated

    def embed_with_flags(
        self, texts: Sequence[bytes | str], *, max_batch: int = DEFAULT_MAX_BATCH
    ) -> tuple[np.ndarray, list[bool]]:
        """Embeddings [n, dimension] FP32 normalized, and which texts were truncated."""
        decoded = decode_texts(texts, max_batch=max_batch)
        batch, truncated = self.tokenize(decoded)
        hidden = self._run_model(batch)
        return self._pool(hidden, batch.attention_mask), truncated

    def embed(self, texts: Sequence[bytes | str], *, max_batch: int = DEFAULT_MAX_BATCH) -> np.ndarray:
        """Embeddings [n, dimension] FP32, L2-normalized."""
        return self.embed_with_flags(texts, max_batch=max_batch)[0]

    def _pool(self, hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        hidden = hidden.astype(np.float32, copy=False)
        if hidden.ndim == 2:  # an ONNX graph that already pools
            pooled = hidden
        else:
            mask = attention_mask[:, :, None].astype(np.float32)
            mode = self.directory.pooling_mode
            if mode == "cls":
                pooled = hidden[:, 0]
            elif mode == "max":
                pooled = np.where(mask > 0, hidden, -np.inf).max(axis=1)
            else:
                counts = np.clip(mask.sum(axis=1), 1e-9, None)
                summed = (hidden * mask).sum(axis=1)
                pooled = summed / (np.sqrt(counts) if mode == "mean_sqrt_len" else counts)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)


def _load_tokenizer(directory: HfDirectory) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory.path), local_files_only=True)
    # The Rust backend reports each text's overflow; the suite sets truncation per call and
    # pads to the longest text in the batch (the tokenizer.json may pin a fixed length).
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    backend.enable_padding(pad_id=pad_id, pad_token=tokenizer.pad_token or "[PAD]")
    return backend


def _torch_runner(directory: HfDirectory, threads: int) -> Any:
    import torch
    from transformers import AutoModel

    torch.set_num_threads(max(1, threads))
    if directory.int8_layers:
        model = load_int8_encoder(directory.path, directory.int8_layers)
    else:
        model = AutoModel.from_pretrained(
            str(directory.path), local_files_only=True, use_safetensors=True
        )
    model.eval()
    accepts_token_types = "token_type_ids" in model.forward.__code__.co_varnames

    def run(batch: TokenizedBatch) -> np.ndarray:
        inputs = {name: torch.from_numpy(array) for name, array in batch.arrays().items()}
        if not accepts_token_types:
            inputs.pop("token_type_ids")
        with torch.inference_mode():
            output = model(**inputs)
        return output.last_hidden_state.numpy()

    return run


def _onnx_runner(directory: HfDirectory, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(directory.path / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    input_names = [i.name for i in session.get_inputs()]
    output_name = session.get_outputs()[0].name

    def run(batch: TokenizedBatch) -> np.ndarray:
        arrays = batch.arrays()
        return session.run([output_name], {name: arrays[name] for name in input_names})[0]

    return run
