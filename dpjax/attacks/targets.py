"""The models the attacks use and attack: small Flax classifiers trained the plain
way (substitutes, sources, non-private targets), scikit-learn's non-differentiable
ones, and dpjax's private models."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax.attacks.gradient_sign import LogitsFn

DIFFERENTIABLE = ("dnn", "lr", "svm")
NON_DIFFERENTIABLE = ("dt", "knn")
KINDS = DIFFERENTIABLE + NON_DIFFERENTIABLE


class DNN(nn.Module):
    """flatten -> (Dense -> ReLU) per hidden width -> Dense(classes)."""

    num_classes: int = 10
    hidden: Sequence[int] = (128, 128)

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass(frozen=True)
class PlainTraining:
    """Non-private training of a Flax classifier (Adam on shuffled minibatches)."""

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 3e-3
    loss: str = "cross_entropy"  # or "hinge" (a linear SVM's multi-class hinge loss)


def _loss(kind: str):
    if kind == "cross_entropy":
        return optax.softmax_cross_entropy_with_integer_labels
    if kind == "hinge":
        return optax.losses.multiclass_hinge_loss
    raise ValueError(f"loss must be 'cross_entropy' or 'hinge', got {kind!r}")


def train_plain(model: nn.Module, x, y, *, seed: int = 0, settings: PlainTraining = PlainTraining(),
                params=None):
    """Train ``model`` (from ``params`` if given) and return its parameters."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    loss = _loss(settings.loss)
    if params is None:
        params = model.init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]))
    tx = optax.adam(settings.learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step(p, s, xb, yb):
        g = jax.grad(lambda q: loss(model.apply(q, xb), yb).mean())(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    rng = np.random.default_rng(seed)
    batch = min(settings.batch_size, len(x))
    for _ in range(settings.epochs):
        order = rng.permutation(len(x))
        for i in range(math.ceil(len(x) / batch)):
            idx = order[i * batch:(i + 1) * batch]
            if len(idx) < batch:  # one shape: fill the last batch from the start of the order
                idx = np.concatenate([idx, order[:batch - len(idx)]])
            params, opt_state = step(params, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    return params


@dataclasses.dataclass
class Target:
    """A trained model: ``predict`` gives labels; ``logits`` (differentiable models
    only) is what a white-box attacker or a substitute's owner can differentiate."""

    name: str
    predict: Callable[[np.ndarray], np.ndarray]
    logits: Optional[LogitsFn] = None


def flax_target(name: str, model: nn.Module, params) -> Target:
    apply = jax.jit(lambda x: model.apply(params, x))
    return Target(name, lambda x: np.asarray(jnp.argmax(apply(jnp.asarray(x, jnp.float32)), -1)), apply)


def train_target(kind: str, x, y, *, seed: int = 0, num_classes: int = 10) -> Target:
    """One of :data:`KINDS`: ``dnn`` (MLP 128-128 ReLU), ``lr`` (logistic
    regression), ``svm`` (linear, multi-class hinge loss), in Flax; ``dt``
    (decision tree) and ``knn`` (3 neighbours) from scikit-learn."""
    if kind == "dnn":
        model = DNN(num_classes)
        return flax_target(kind, model, train_plain(model, x, y, seed=seed))
    if kind in ("lr", "svm"):
        model = DNN(num_classes, hidden=())
        settings = PlainTraining(epochs=60, learning_rate=1e-2, loss="cross_entropy" if kind == "lr" else "hinge")
        return flax_target(kind, model, train_plain(model, x, y, seed=seed, settings=settings))
    if kind in NON_DIFFERENTIABLE:
        from sklearn.neighbors import KNeighborsClassifier
        from sklearn.tree import DecisionTreeClassifier

        clf = DecisionTreeClassifier(random_state=seed) if kind == "dt" else KNeighborsClassifier(n_neighbors=3)
        flat = np.asarray(x, np.float32).reshape(len(x), -1)
        clf.fit(flat, np.asarray(y))
        return Target(kind, lambda q: clf.predict(np.asarray(q, np.float32).reshape(len(q), -1)))
    raise ValueError(f"target must be one of {', '.join(KINDS)}, got {kind!r}")


def private_target(epsilon: float, data, *, seed: int = 0, progress: bool = False) -> Target:
    """``dpjax.fit`` with its defaults at ``epsilon`` (δ = 1e-5) on ``data``."""
    import dpjax
    from dpjax import datasets, models

    model = models.build("cnn", datasets.num_classes(data))
    result = dpjax.fit(model, data, target_epsilon=float(epsilon), seed=seed, progress=progress)
    return flax_target(f"dp-sgd ε={epsilon:g}", model, result.params)


def nonprivate_cnn_target(data, *, seed: int = 0) -> Target:
    """The same CNN as :func:`private_target`, trained without clipping or noise."""
    from dpjax import datasets, models

    model = models.build("cnn", datasets.num_classes(data))
    return flax_target("non-private", model, train_plain(model, data["x_train"], data["y_train"], seed=seed))
