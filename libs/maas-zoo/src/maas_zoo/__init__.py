"""The MaaS model zoo: declarative architectures any service can rebuild from a manifest.

A manifest's `architecture` (`kind` + `hyperparameters`) and its signature's input shape
and class count are all `build_model` needs; the weights come from safetensors. Text
classifiers (`text_lstm`) also need their tokenizer, which travels in the package
(`maas_zoo.text`).
"""

from maas_zoo.architectures import (
    ARCHITECTURES,
    Architecture,
    build_model,
    default_hyperparameters,
    get_architecture,
    resolve_hyperparameters,
)
from maas_zoo.hyperparameters import Hyperparameter
from maas_zoo.text import (
    WORDPIECE_VOCAB_SIZE,
    FixedLengthTokenizer,
    TextLstmClassifier,
    tokenizer_from_preprocessing,
    tokenizer_preprocessing,
)
from maas_zoo.text_classifiers import (
    Classified,
    LstmTextClassifier,
    SentenceHeadClassifier,
    TextClassifier,
    is_text_classifier,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "Classified",
    "LstmTextClassifier",
    "SentenceHeadClassifier",
    "TextClassifier",
    "FixedLengthTokenizer",
    "Hyperparameter",
    "TextLstmClassifier",
    "WORDPIECE_VOCAB_SIZE",
    "build_model",
    "default_hyperparameters",
    "get_architecture",
    "is_text_classifier",
    "resolve_hyperparameters",
    "tokenizer_from_preprocessing",
    "tokenizer_preprocessing",
]
