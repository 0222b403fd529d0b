"""The fast gradient sign method (Goodfellow, Shlens & Szegedy, ICLR 2015) and its
iterative, projected variant, for any classifier given as a logits function.

``x' = clip(x + ε · sign(∇ₓ J(θ, x, y)), lo, hi)``: one gradient of the loss with
respect to the *input*, so an attacker needs the model's gradients (white box) or
a substitute's (black box, :mod:`dpjax.attacks.blackbox`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import validation

LogitsFn = Callable[[jax.Array], jax.Array]


def logits_fn(model, params=None) -> LogitsFn:
    """A function ``x -> logits`` for a Linen module with its ``params``, an
    ``nnx.Module`` (params ``None``), or any such function already.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> m = nn.Dense(3); p = m.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
    >>> logits_fn(m, p)(jnp.ones((2, 4))).shape
    (2, 3)
    """
    from flax import nnx

    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return lambda x: nnx.merge(graphdef, state)(x)
    if params is not None:
        return lambda x: model.apply(params, x)
    if callable(model):
        return model
    raise TypeError(f"expected a Linen module with params, an nnx.Module or a logits function, got {model!r}")


def _check(x, eps, lo, hi):
    validation.check_non_negative("eps", eps)  # the L-infinity size of the perturbation
    if not lo < hi:
        raise ValueError(f"the input range needs lo < hi, got [{lo}, {hi}]")
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (examples, features...), got shape {x.shape}")
    return x


def input_gradient(f: LogitsFn, x, y):
    """∇ₓ of each example's cross-entropy (a batch of independent examples, so the
    gradient of the summed loss is each example's own)."""
    def total(xb):
        return optax.softmax_cross_entropy_with_integer_labels(f(xb), y).sum()

    return jax.grad(total)(x)


def fgsm(f: LogitsFn, x, y, eps: float, *, lo: float = 0.0, hi: float = 1.0, steps: int = 1,
         step_size=None) -> jax.Array:
    """Adversarial examples within ``eps`` of ``x`` (L∞) and inside ``[lo, hi]``.

    ``steps=1`` is FGSM. ``steps > 1`` is the iterative variant (the basic
    iterative method): ``steps`` signed steps of ``step_size`` (default
    ``eps / steps * 1.25``), each projected back onto the ε-ball and the range.
    ``y`` are the labels the attack moves away from (true labels, or an oracle's).

    >>> import jax.numpy as jnp
    >>> f = lambda x: x @ jnp.array([[1.0, -1.0], [0.0, 0.0]])
    >>> fgsm(f, jnp.array([[0.5, 0.5]]), jnp.array([0]), 0.1)
    Array([[0.4, 0.5]], dtype=float32)
    """
    x = _check(x, eps, lo, hi)
    y = jnp.asarray(y, jnp.int32)
    steps = validation.check_positive_int("steps", steps)
    size = eps if steps == 1 else (eps / steps * 1.25 if step_size is None else float(step_size))
    return _fgsm_jit(f, x, y, float(eps), float(lo), float(hi), int(steps), float(size))


def _fgsm_steps(f, x, y, eps, lo, hi, steps, size):
    adv = x
    for _ in range(steps):
        adv = adv + size * jnp.sign(input_gradient(f, adv, y))
        adv = jnp.clip(jnp.clip(adv, x - eps, x + eps), lo, hi)
    return adv


# The model and the number of steps shape the program; the sizes are data (no recompiles per ε).
_fgsm_jit = jax.jit(_fgsm_steps, static_argnums=(0, 6))


def random_sign(x, eps: float, *, seed: int = 0, lo: float = 0.0, hi: float = 1.0) -> jax.Array:
    """The baseline of the same size: ``clip(x + ε · s)`` with random signs ``s``."""
    x = _check(x, eps, lo, hi)
    signs = jax.random.rademacher(jax.random.PRNGKey(seed), x.shape, dtype=jnp.float32)
    return jnp.clip(x + eps * signs, lo, hi)


def misclassification_rate(predict: Callable[[np.ndarray], np.ndarray], x, y) -> float:
    """The fraction of ``x`` that ``predict`` (labels) gets wrong against ``y``."""
    return float(np.mean(np.asarray(predict(np.asarray(x))) != np.asarray(y)))
