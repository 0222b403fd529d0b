"""Small Flax models for the demo and the tests (Linen and NNX)."""

from __future__ import annotations

import flax.linen as nn
from flax import nnx


class MLP(nn.Module):
    """Flatten -> Dense(hidden) -> tanh -> Dense(classes)."""

    num_classes: int = 10
    hidden: int = 64

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Two 3×3 convolutions with tanh and average pooling, then a linear head.

    tanh rather than ReLU: bounded activations keep per-example gradient norms
    even, which suits DP-SGD (Papernot et al., 2021).
    """

    num_classes: int = 10
    features: tuple = (16, 32)

    @nn.compact
    def __call__(self, x):
        if x.ndim == 2:  # flat features: treat as a 1-channel column
            x = x[:, :, None, None]
        for f in self.features:
            x = nn.tanh(nn.Conv(f, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


class NnxMLP(nnx.Module):
    """The MLP above written with flax.nnx."""

    def __init__(self, in_features: int, num_classes: int = 10, hidden: int = 64, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_features, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return self.out(nnx.tanh(self.hidden(x)))


def build(name: str, num_classes: int):
    """``"mlp"`` or ``"cnn"`` as a Linen module."""
    if name == "mlp":
        return MLP(num_classes=num_classes)
    if name == "cnn":
        return CNN(num_classes=num_classes)
    raise ValueError(f"model must be 'mlp' or 'cnn', got {name!r}")
