"""The architecture catalogue: each kind declares its hyperparameters and how it reads inputs.

`build_model(kind, hyperparameters, input_shape, num_classes)` is the one way a module is
made, for training and for serving alike, so the same manifest always rebuilds the same
module. Construction draws initial weights from torch's global generator: seed it
(`torch.manual_seed`) for a reproducible module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from maas_runtime.errors import InvalidArgument, ViolationCollector
from torch import nn

from maas_zoo.hyperparameters import (
    HYPERPARAMETERS_FIELD,
    Hyperparameter,
    boolean,
    integer,
    integer_list,
    one_of,
    probability_below_one,
    resolve,
)
from maas_zoo.modules import (
    ACTIVATIONS,
    ConvolutionalClassifier,
    MultilayerPerceptron,
    TransformerClassifier,
)
from maas_zoo.text import TextLstmClassifier

KIND_FIELD = "architecture.kind"
INPUT_SHAPE_FIELD = "input_shape"
NUM_CLASSES_FIELD = "num_classes"
MAX_INPUT_RANK = 3
MAX_NUM_CLASSES = 100_000

ModuleBuilder = Callable[[dict[str, Any], list[int], int], nn.Module]


@dataclass(frozen=True)
class Architecture:
    """One zoo entry: its name, what it is for, and its declared hyperparameters."""

    kind: str
    description: str
    hyperparameters: tuple[Hyperparameter, ...]
    build: ModuleBuilder
    """Makes the module from resolved hyperparameters, a checked input shape and class count."""
    reads_text: bool = False
    """True for text classifiers: their input is `[max_length]` token ids from the tokenizer
    that travels with the model (`maas_zoo.text`), not features of a numeric dataset."""

    def default_hyperparameters(self) -> dict[str, Any]:
        return resolve(self.hyperparameters, {})


def _square_side(length: int) -> int | None:
    side = math.isqrt(length)
    return side if side * side == length else None


def _image_shape(input_shape: list[int]) -> tuple[int, int, int]:
    """[C, H, W] as given, [H, W] as one channel, or a flat square image such as digits' [64]."""
    if len(input_shape) == 3:
        return input_shape[0], input_shape[1], input_shape[2]
    if len(input_shape) == 2:
        return 1, input_shape[0], input_shape[1]
    side = _square_side(input_shape[0])
    if side is None:
        raise InvalidArgument.for_field(
            INPUT_SHAPE_FIELD,
            f"cnn needs [C, H, W], [H, W] or a flat square image; {input_shape} is none of them",
        )
    return 1, side, side


def _sequence_shape(input_shape: list[int]) -> tuple[int, int]:
    """[seq_len, features] as given; a one-channel image or flat square image is read row by row.

    Reading the digits' flat [64] as 8 rows of 8 features gives the encoder 8 tokens worth
    attending over, where 64 scalar tokens would carry almost nothing each.
    """
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    if len(input_shape) == 3:
        if input_shape[0] != 1:
            raise InvalidArgument.for_field(
                INPUT_SHAPE_FIELD,
                f"transformer reads images with one channel only, got {input_shape[0]} channels",
            )
        return input_shape[1], input_shape[2]
    side = _square_side(input_shape[0])
    if side is None:
        return input_shape[0], 1
    return side, side


def _build_mlp(hyperparameters: dict[str, Any], input_shape: list[int], num_classes: int):
    return MultilayerPerceptron(
        input_features=math.prod(input_shape),
        hidden_sizes=hyperparameters["hidden_sizes"],
        activation=hyperparameters["activation"],
        dropout=hyperparameters["dropout"],
        num_classes=num_classes,
    )


def _build_cnn(hyperparameters: dict[str, Any], input_shape: list[int], num_classes: int):
    image_shape = _image_shape(input_shape)
    kernel_size = hyperparameters["kernel_size"]
    # 'Same' padding keeps any odd kernel shape-valid, but one wider than the image would
    # spend most of its weights on padding: almost surely a mistake in the request.
    if kernel_size > min(image_shape[1], image_shape[2]):
        raise InvalidArgument.for_field(
            f"{HYPERPARAMETERS_FIELD}.kernel_size",
            f"{kernel_size} is wider than the {image_shape[1]}×{image_shape[2]} input images",
        )
    return ConvolutionalClassifier(
        image_shape=image_shape,
        channels=hyperparameters["channels"],
        kernel_size=kernel_size,
        dropout=hyperparameters["dropout"],
        num_classes=num_classes,
    )


def _build_transformer(hyperparameters: dict[str, Any], input_shape: list[int], num_classes: int):
    if hyperparameters["d_model"] % hyperparameters["nhead"] != 0:
        raise InvalidArgument.for_field(
            f"{HYPERPARAMETERS_FIELD}.nhead",
            f"must divide d_model ({hyperparameters['d_model']}), got {hyperparameters['nhead']}",
        )
    return TransformerClassifier(
        sequence_shape=_sequence_shape(input_shape),
        d_model=hyperparameters["d_model"],
        nhead=hyperparameters["nhead"],
        num_layers=hyperparameters["num_layers"],
        dim_feedforward=hyperparameters["dim_feedforward"],
        dropout=hyperparameters["dropout"],
        num_classes=num_classes,
    )


def _build_text_lstm(hyperparameters: dict[str, Any], input_shape: list[int], num_classes: int):
    if input_shape != [hyperparameters["max_length"]]:
        raise InvalidArgument.for_field(
            INPUT_SHAPE_FIELD,
            f"text_lstm reads [max_length] = [{hyperparameters['max_length']}] token ids, "
            f"got {input_shape}",
        )
    return TextLstmClassifier(hyperparameters, num_classes)


_DROPOUT_DESCRIPTION = "Probability of zeroing an activation during training, in [0, 1)."

ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {
        "mlp": Architecture(
            kind="mlp",
            description="Multilayer perceptron over the flattened input.",
            hyperparameters=(
                Hyperparameter(
                    "hidden_sizes",
                    (128,),
                    "Width of each hidden layer, input side first; empty is a linear model.",
                    integer_list(0, 32, 1, 65_536),
                ),
                Hyperparameter("dropout", 0.0, _DROPOUT_DESCRIPTION, probability_below_one()),
                Hyperparameter(
                    "activation",
                    "relu",
                    "Nonlinearity after each hidden layer.",
                    one_of(tuple(ACTIVATIONS)),
                ),
            ),
            build=_build_mlp,
        ),
        "cnn": Architecture(
            kind="cnn",
            description="Convolutional classifier for images ([C, H, W], [H, W] or flat square).",
            hyperparameters=(
                Hyperparameter(
                    "channels",
                    (16, 32),
                    "Output channels of each conv → ReLU → 2×2 max-pool block.",
                    integer_list(1, 16, 1, 4_096),
                ),
                Hyperparameter(
                    "kernel_size", 3, "Odd square kernel size ('same' padding).", integer(1, 15, odd=True)
                ),
                Hyperparameter("dropout", 0.0, _DROPOUT_DESCRIPTION, probability_below_one()),
            ),
            build=_build_cnn,
        ),
        "transformer": Architecture(
            kind="transformer",
            description="Small transformer encoder over [seq_len, features], mean-pooled.",
            hyperparameters=(
                Hyperparameter("d_model", 32, "Width of every token representation.", integer(1, 4_096)),
                Hyperparameter("nhead", 4, "Attention heads; must divide d_model.", integer(1, 64)),
                Hyperparameter("num_layers", 2, "Encoder layers.", integer(1, 48)),
                Hyperparameter(
                    "dim_feedforward", 64, "Hidden width of each feed-forward block.", integer(1, 65_536)
                ),
                Hyperparameter("dropout", 0.1, _DROPOUT_DESCRIPTION, probability_below_one()),
            ),
            build=_build_transformer,
        ),
        "text_lstm": Architecture(
            kind="text_lstm",
            description="Text classifier: WordPiece ids → embedding → LSTM → masked mean → linear.",
            hyperparameters=(
                Hyperparameter("embedding_dim", 64, "Width of each token embedding.", integer(1, 1_024)),
                Hyperparameter("hidden_size", 64, "LSTM state width per direction.", integer(1, 4_096)),
                Hyperparameter("num_layers", 1, "Stacked LSTM layers.", integer(1, 8)),
                Hyperparameter("bidirectional", True, "Read the text in both directions.", boolean()),
                Hyperparameter("dropout", 0.1, _DROPOUT_DESCRIPTION, probability_below_one()),
                Hyperparameter(
                    "max_length", 64, "Tokens per text: longer texts are cut, shorter padded.",
                    integer(8, 512)
                ),
            ),
            build=_build_text_lstm,
            reads_text=True,
        ),
    }
)


def get_architecture(kind: str) -> Architecture:
    """The catalogue entry for `kind`; `InvalidArgument` on `architecture.kind` otherwise."""
    architecture = ARCHITECTURES.get(kind) if isinstance(kind, str) else None
    if architecture is None:
        raise InvalidArgument.for_field(
            KIND_FIELD, f"unknown architecture {kind!r}; known: {', '.join(ARCHITECTURES)}"
        )
    return architecture


def default_hyperparameters(kind: str) -> dict[str, Any]:
    """Every hyperparameter of `kind` at its default value (a fresh, JSON-friendly dict)."""
    return get_architecture(kind).default_hyperparameters()


def resolve_hyperparameters(kind: str, hyperparameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validates `hyperparameters` for `kind` and returns them with every default filled.

    This is what a manifest should record: the module it describes no longer depends on
    today's defaults.
    """
    return resolve(get_architecture(kind).hyperparameters, hyperparameters)


def _check_input_shape_and_classes(input_shape: Sequence[int], num_classes: int) -> list[int]:
    violations = ViolationCollector()
    shape: list[int] = []
    if isinstance(input_shape, str | bytes) or not isinstance(input_shape, Sequence):
        violations.add(INPUT_SHAPE_FIELD, f"must be a list of dimensions, got {input_shape!r}")
    elif not 1 <= len(input_shape) <= MAX_INPUT_RANK:
        violations.add(
            INPUT_SHAPE_FIELD, f"must have 1 to {MAX_INPUT_RANK} dimensions, got {len(input_shape)}"
        )
    elif any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape):
        violations.add(INPUT_SHAPE_FIELD, f"dimensions must be positive integers, got {input_shape}")
    else:
        shape = list(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        violations.add(NUM_CLASSES_FIELD, f"must be an integer, got {num_classes!r}")
    elif not 1 <= num_classes <= MAX_NUM_CLASSES:
        violations.add(NUM_CLASSES_FIELD, f"must be between 1 and {MAX_NUM_CLASSES}, got {num_classes}")
    violations.raise_if_any("invalid model shape")
    return shape


def build_model(
    kind: str,
    hyperparameters: Mapping[str, Any] | None,
    input_shape: Sequence[int],
    num_classes: int,
) -> nn.Module:
    """Builds the `kind` module for one example of `input_shape` (batch dim excluded).

    The module maps `[batch, *input_shape]` to logits `[batch, num_classes]` and is in
    training mode, as torch modules start. Raises `InvalidArgument` naming the field at fault:
    `architecture.kind`, `architecture.hyperparameters.<key>`, `input_shape` or `num_classes`.
    """
    architecture = get_architecture(kind)
    resolved = resolve(architecture.hyperparameters, hyperparameters)
    shape = _check_input_shape_and_classes(input_shape, num_classes)
    return architecture.build(resolved, shape, num_classes)
