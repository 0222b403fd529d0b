"""Flax versions of the benchmark models and their random data.

Every method of a (model, batch) cell trains the same Flax model from the same
initial parameters on the same random batch; :mod:`benchmarks.model_specs`
holds the architecture numbers, shared with the PyTorch runner.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import model_specs
from dpjax import models


# The benchmark models live in the library so that tests and benchmarks share them.
CNN = models.ConvNet
Encoder = models.Encoder


class MLP(nn.Module):
    hidden: Tuple[int, ...] = (1024, 1024)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.classes)(x)


@dataclasses.dataclass
class Workload:
    """A model, its initial parameters, its loss and a batch maker."""

    name: str
    size: str
    model: nn.Module
    params: Any
    loss_fn: Callable  # loss_fn(params, {"x", "y"}) -> mean loss
    example_shape: Tuple[int, ...]
    example_dtype: Any
    classes: int

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(self.params)))

    def batch_numpy(self, batch_size: int, seed: int = 0) -> dict:
        """A random batch as numpy arrays (the same for a given size and seed)."""
        rng = np.random.default_rng([seed, batch_size])
        if self.example_dtype == jnp.int32:
            x = rng.integers(0, model_specs.spec(self.name, self.size)["vocab"],
                             (batch_size,) + self.example_shape).astype(np.int32)
        else:
            x = rng.normal(size=(batch_size,) + self.example_shape).astype(np.float32)
        y = rng.integers(0, self.classes, batch_size).astype(np.int32)
        return {"x": x, "y": y}

    def batch(self, batch_size: int, seed: int = 0) -> dict:
        """A random batch on the default device."""
        return jax.tree_util.tree_map(jnp.asarray, self.batch_numpy(batch_size, seed))

    def batch_shapes(self, batch_size: int) -> dict:
        """``jax.ShapeDtypeStruct``s of a batch (to compile without data)."""
        return {
            "x": jax.ShapeDtypeStruct((batch_size,) + self.example_shape, self.example_dtype),
            "y": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        }

    def device_batch(self, batch_size: int, seed: int = 0) -> dict:
        """A random batch generated on the device (for very large batches)."""
        shapes = self.batch_shapes(batch_size)
        vocab = model_specs.spec(self.name, self.size).get("vocab")
        classes = self.classes

        @jax.jit
        def make(key):
            kx, ky = jax.random.split(key)
            if vocab is not None:
                x = jax.random.randint(kx, shapes["x"].shape, 0, vocab, jnp.int32)
            else:
                x = jax.random.normal(kx, shapes["x"].shape, jnp.float32)
            return {"x": x, "y": jax.random.randint(ky, (batch_size,), 0, classes, jnp.int32)}

        return make(jax.random.PRNGKey(seed))


def make_workload(name: str, size: str, seed: int = 0) -> Workload:
    """The Flax model ``name`` at preset ``size`` with initial parameters."""
    s = model_specs.spec(name, size)
    if name == "cnn":
        model = CNN(tuple(s["widths"]), s["classes"])
        shape, dtype = (s["hw"], s["hw"], s["channels"]), jnp.float32
    elif name == "transformer":
        model = Encoder(s["vocab"], s["d"], s["heads"], s["ff"], s["layers"], s["classes"])
        shape, dtype = (s["seq"],), jnp.int32
    else:
        model = MLP(tuple(s["hidden"]), s["classes"])
        shape, dtype = (s["inputs"],), jnp.float32
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + shape, dtype))

    def loss_fn(p, b):
        logits = model.apply(p, b["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

    return Workload(name, size, model, params, loss_fn, shape, dtype, s["classes"])
