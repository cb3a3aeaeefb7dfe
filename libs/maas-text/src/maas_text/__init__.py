"""maas-text: Hugging Face text models for the suite, offline and without pickle.

- `maas_text.directory`: find the bundled all-MiniLM-L6-v2 (`minilm_directory`), check a model
  directory (`HfDirectory`), zip it for the registry's HF_TRANSFORMER format and unzip it back.
- `maas_text.inputs`: validate the texts of a request (UTF-8, not empty, batch limit).
- `maas_text.encoder`: `SentenceEncoder`, tokenizer + torch or onnxruntime model, mean pooling,
  L2-normalized FP32 embeddings.

Importing the package sets nothing global and imports neither torch nor transformers; the
encoder imports them when a model is loaded.
"""

from maas_text.directory import HfDirectory, minilm_directory, unzip_directory, zip_directory
from maas_text.inputs import DEFAULT_MAX_BATCH, decode_texts

__all__ = [
    "DEFAULT_MAX_BATCH",
    "HfDirectory",
    "SentenceEncoder",
    "TokenizedBatch",
    "decode_texts",
    "minilm_directory",
    "unzip_directory",
    "zip_directory",
]


def __getattr__(name: str) -> object:
    # The encoder pulls in numpy-heavy code paths and, on load, torch/transformers; keep the
    # package import light for the registry and the SDK, which only check and zip directories.
    if name in ("SentenceEncoder", "TokenizedBatch"):
        from maas_text import encoder

        return getattr(encoder, name)
    raise AttributeError(name)
