"""The torch modules behind the zoo's architectures.

Each module takes a batch shaped `[batch, *input_shape]` and returns logits
`[batch, num_classes]`. Submodule names are part of the model-package format (they become the
safetensors tensor names), so renaming an attribute here breaks every stored package.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


class MultilayerPerceptron(nn.Module):
    """Flattens the input and applies Linear → activation → dropout per hidden layer."""

    def __init__(
        self,
        input_features: int,
        hidden_sizes: list[int],
        activation: str,
        dropout: float,
        num_classes: int,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(start_dim=1)]
        width = input_features
        for hidden_size in hidden_sizes:
            layers += [nn.Linear(width, hidden_size), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = hidden_size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs)


class ConvolutionalClassifier(nn.Module):
    """Conv → ReLU → 2×2 max-pool blocks, then dropout and a linear classifier.

    A block pools only while the feature map is at least 2×2, so small images such as the
    8×8 digits keep a non-empty map however many blocks are declared.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        channels: list[int],
        kernel_size: int,
        dropout: float,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.image_shape = image_shape
        in_channels, height, width = image_shape
        blocks: list[nn.Module] = []
        for out_channels in channels:
            blocks += [
                nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
                nn.ReLU(),
            ]
            if height >= 2 and width >= 2:
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(start_dim=1),
            nn.Dropout(dropout),
            nn.Linear(in_channels * height * width, num_classes),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # Flat rows (the digits dataset's 64 features) and [C, H, W] images both reach here.
        images = inputs.reshape(inputs.shape[0], *self.image_shape)
        return self.classifier(self.features(images))


class TransformerClassifier(nn.Module):
    """A small pre-norm transformer encoder over `[seq_len, features]`, mean-pooled.

    Features are projected to `d_model`, a learned position embedding is added, and the
    mean over positions feeds a layer norm and a linear head.
    """

    def __init__(
        self,
        sequence_shape: tuple[int, int],
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        dropout: float,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.sequence_shape = sequence_shape
        sequence_length, features = sequence_shape
        self.input_projection = nn.Linear(features, d_model)
        self.position_embedding = nn.Parameter(torch.zeros(1, sequence_length, d_model))
        nn.init.normal_(self.position_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            nhead,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors only help with padding masks, which fixed-length inputs never have.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        sequences = inputs.reshape(inputs.shape[0], *self.sequence_shape)
        encoded = self.encoder(self.input_projection(sequences) + self.position_embedding)
        return self.head(self.norm(encoded.mean(dim=1)))
