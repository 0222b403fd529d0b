"""Shared fixtures: scikit-learn's digits (ships inside the package) and small Flax models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits


@pytest.fixture(scope="session")
def digits():
    """Digits as float32 images in [0, 1] of shape (N, 8, 8, 1) and int labels."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    return x, y


class MLP(nn.Module):
    hidden: int = 32

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(10)(x)


def make_loss(model):
    def loss_fn(params, batch):
        logits = model.apply(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return loss_fn


@pytest.fixture(scope="session")
def mlp_setup(digits):
    x, y = digits
    model = MLP()
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    return model, params, make_loss(model)


@pytest.fixture(scope="session")
def cnn_setup(digits):
    x, y = digits
    model = CNN()
    params = model.init(jax.random.PRNGKey(1), jnp.asarray(x[:1]))
    return model, params, make_loss(model)
