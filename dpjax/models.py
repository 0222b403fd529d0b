"""Small Flax models for the demo and the tests (Linen and NNX)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx


def standardize_per_example(x):
    """Each example to zero mean and unit variance over its own features.

    A fixed map of each example by itself (its own mean and standard deviation),
    not a statistic of the training set, so it costs no privacy. It removes the
    differences in ink and contrast between examples, which the noisy updates of
    DP-SGD cannot afford to learn.
    """
    axes = tuple(range(1, x.ndim))
    mu = jnp.mean(x, axis=axes, keepdims=True)
    sd = jnp.std(x, axis=axes, keepdims=True)
    return (x - mu) / (sd + 1e-6)


class MLP(nn.Module):
    """[standardise each example] -> flatten -> Dense(hidden) -> tanh -> Dense(classes)."""

    num_classes: int = 10
    hidden: int = 64
    standardize: bool = False

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        if self.standardize:
            x = standardize_per_example(x)
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """[standardise each example] -> (3×3 conv -> [GroupNorm] -> tanh -> 2×2 average pool) per
    entry of ``features`` -> linear head.

    The defaults are the model tuned for DP-SGD on digits (``dpjax train``):
    per-example standardisation, one 3×3 convolution with 8 channels,
    GroupNorm (4 groups), tanh, 2×2 average pooling and a linear head (about
    1,400 parameters on 8×8 images). Small on purpose: DP-SGD adds noise of
    the same size to every parameter, so few parameters learn more per unit of
    privacy. tanh rather than ReLU: bounded activations keep per-example
    gradient norms even, which suits DP-SGD (Papernot et al., 2021). Inputs are
    images (N, H, W, C) or flat features (N, D), treated as a one-channel column.
    """

    num_classes: int = 10
    features: tuple = (8,)
    standardize: bool = True
    groupnorm: bool = True

    @nn.compact
    def __call__(self, x):
        if x.ndim == 2:  # flat features: treat as a 1-channel column
            x = x[:, :, None, None]
        if self.standardize:
            x = standardize_per_example(x)
        for f in self.features:
            x = nn.Conv(f, (3, 3))(x)
            if self.groupnorm:
                x = nn.GroupNorm(num_groups=min(4, f))(x)
            x = nn.tanh(x)
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
    """``"mlp"`` or ``"cnn"`` as a Linen module (``dpjax train --model``): the defaults of
    :class:`MLP` and :class:`CNN`."""
    if name == "mlp":
        return MLP(num_classes=num_classes)
    if name == "cnn":
        return CNN(num_classes=num_classes)
    raise ValueError(f"model must be 'mlp' or 'cnn', got {name!r}")


class ConvNet(nn.Module):
    """The CNN of the benchmarks (shared/ANCHORS.md): 3×3 convolutions with ReLU,
    2×2 average pooling after every second one, global mean pooling, linear head.
    The default widths (32, 64, 64, 128) on 32×32×3 inputs give 131k parameters."""

    widths: tuple = (32, 64, 64, 128)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = nn.relu(nn.Conv(w, (3, 3))(x))
            if i % 2 == 1:
                x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


class Encoder(nn.Module):
    """The transformer of the benchmarks: pre-LayerNorm encoder blocks, mean pooling,
    a linear head (or, with ``tied=True``, the token embedding reused as the output
    layer). The defaults (4 layers, d = 512, 8 heads, ff 2048, vocab 8192) give 16.9M
    parameters."""

    vocab: int = 8192
    d: int = 512
    heads: int = 8
    ff: int = 2048
    layers: int = 4
    classes: int = 2
    tied: bool = False

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.d)
        x = embed(tokens)
        for _ in range(self.layers):
            h = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
            h = nn.LayerNorm()(x)
            x = x + nn.Dense(self.d)(nn.gelu(nn.Dense(self.ff)(h)))
        x = nn.LayerNorm()(x).mean(axis=1)
        if self.tied:
            return embed.attend(x)[:, : self.classes]
        return nn.Dense(self.classes)(x)
