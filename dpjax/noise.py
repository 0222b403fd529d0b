"""Gaussian noise as an optax transformation: the one place dpjax adds noise.

:func:`privatize` wraps any ``optax.GradientTransformation``. Its ``update``
takes the :class:`~dpjax.clipping.ClippedGradient` produced by
:func:`dpjax.clipped_grad` and, once per logical batch,

1. adds independent N(0, σ²C²) noise to every leaf of the clipped *sum*, with a
   key derived from the seed and the number of noisy steps taken so far (so no
   key is ever reused, and replicas holding the same state draw the same noise);
2. divides by the public ``expected_batch_size`` (never the realised size);
3. records the step in the :class:`~dpjax.ledger.PrivacyLedger` kept in its
   state (inside ``jit``);
4. hands the result to the wrapped optimizer.

The mechanism, for the record (open design): the neighbouring relation is
add/remove one example (Poisson sampling) or replace one example (fixed-size
sampling); each released update is ``(sum_i clip_C(g_i) + N(0, σ²C² I)) / B``.
Privacy rests on the noise and on the secrecy of the seed *value*, like a key;
``seed=None`` (the default) draws it from the operating system.
"""

from __future__ import annotations

import secrets
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import accounting, ledger as ledger_lib, validation
from dpjax.clipping import ClippedGradient

PyTree = Any


class PrivatizeState(NamedTuple):
    """State of :func:`privatize`.

    Attributes:
      ledger: the privacy ledger (steps taken, σ, q, budget).
      key: raw ``uint32[2]`` PRNG key data; step ``t`` uses ``fold_in(key, t)``.
      accumulated: running clipped sum for gradient accumulation (``()``
        when ``accumulation_steps == 1``).
      micro_step: calls since the last noisy step (accumulation only).
      inner_state: the wrapped optimizer's state.
    """

    ledger: ledger_lib.PrivacyLedger
    key: jax.Array
    accumulated: PyTree
    micro_step: jax.Array
    inner_state: Any


def _key_data(seed: Optional[int]) -> np.ndarray:
    if seed is None:
        return np.array([secrets.randbits(32), secrets.randbits(32)], dtype=np.uint32)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    return np.asarray(jax.random.key_data(jax.random.PRNGKey(int(seed))), dtype=np.uint32)


def _zeros_shaped_like(shapes: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def privatize(
    inner: optax.GradientTransformation,
    *,
    noise_multiplier: float,
    l2_clip_norm: float,
    expected_batch_size: Optional[float] = None,
    num_examples: Optional[int] = None,
    sampling_rate: Optional[float] = None,
    sampling: Optional[str] = None,
    sampler=None,
    seed: Optional[int] = None,
    accumulation_steps: int = 1,
    target_epsilon: Optional[float] = None,
    target_delta: Optional[float] = None,
    accountant: str = "rdp",
) -> optax.GradientTransformation:
    """Make an optax optimizer differentially private (DP-SGD's noise step).

    Args:
      inner: any optax ``GradientTransformation`` (sgd, adam, a chain, ...).
      noise_multiplier: σ > 0; noise std is ``σ · l2_clip_norm``.
      l2_clip_norm: the clip norm C the noise is calibrated to. Gradients whose
        sensitivity is larger are refused.
      expected_batch_size: public normaliser E[B] of a *logical* batch (with
        Poisson sampling, ``q · N``); the noisy sum is divided by it.
      num_examples: dataset size N; with ``expected_batch_size`` it fixes the
        sampling rate ``q = E[B] / N`` that the accountant uses.
      sampling_rate: q directly, instead of ``num_examples``.
      sampling: ``"poisson"`` (default; what :class:`dpjax.PoissonSampler`
        does) or ``"fixed_size"`` (:class:`dpjax.FixedSizeSampler`; needs
        ``num_examples``). It must describe how your batches are drawn.
      sampler: a :class:`dpjax.PoissonSampler` or :class:`dpjax.FixedSizeSampler`
        instead of the four arguments above: the accountant then analyses
        exactly the sampling that feeds training (recommended).
      seed: int for reproducible noise, or ``None`` (default) for a seed from
        the operating system. Keep an int seed secret: noise from a known seed
        can be subtracted.
      accumulation_steps: number of ``update`` calls that form one logical
        batch. Clipped sums are added up and noise is added once, on the last
        call; the other calls return zero updates.
      target_epsilon, target_delta: optional budget. A step that would exceed
        it raises :class:`~dpjax.accounting.PrivacyBudgetExceeded` before
        anything is applied (outside ``jit``); under ``jit`` it is refused
        (zero updates, ledger unchanged) and :func:`dpjax.check_budget` raises.
      accountant: ``"rdp"`` or ``"pld"``, used for the budget.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` takes a
      :class:`~dpjax.clipping.ClippedGradient`.

    Example (the two-line change to an optax loop):

    >>> import jax, jax.numpy as jnp, optax, dpjax
    >>> def loss(w, batch):
    ...     return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
    >>> grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=1.0)            # was jax.grad(loss)
    >>> tx = dpjax.privatize(optax.adam(1e-2), noise_multiplier=1.1,     # was optax.adam(1e-2)
    ...                      l2_clip_norm=1.0, expected_batch_size=4, num_examples=100, seed=0)
    >>> w = jnp.zeros(3); state = tx.init(w)
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.ones(4)}
    >>> updates, state = tx.update(grad_fn(w, batch), state, w)
    >>> w = optax.apply_updates(w, updates)
    >>> dpjax.steps_taken(state)
    1
    """
    if sampler is not None:
        if any(v is not None for v in (expected_batch_size, num_examples, sampling_rate, sampling)):
            raise ValueError(
                "pass either sampler or expected_batch_size/num_examples/sampling_rate/sampling, "
                "not both: the sampler already fixes them"
            )
        expected_batch_size = sampler.expected_batch_size
        num_examples = sampler.num_examples
        sampling = sampler.sampling
    if expected_batch_size is None:
        raise ValueError("expected_batch_size is required (or pass sampler=...)")
    sampling = accounting.POISSON if sampling is None else sampling
    sigma = validation.check_positive("noise_multiplier", noise_multiplier)
    clip = validation.check_positive("l2_clip_norm", l2_clip_norm)
    batch = validation.check_positive("expected_batch_size", expected_batch_size)
    k = validation.check_positive_int("accumulation_steps", accumulation_steps)
    validation.check_choice("sampling", sampling, set(ledger_lib.SAMPLING_CODES))
    if (num_examples is None) == (sampling_rate is None):
        raise ValueError(
            "pass exactly one of num_examples (dataset size N; q = expected_batch_size / N) "
            "or sampling_rate (q): the accountant needs the sampling rate"
        )
    if num_examples is not None:
        n = validation.check_positive_int("num_examples", num_examples)
        if batch > n:
            raise ValueError(
                f"expected_batch_size ({expected_batch_size}) must be <= num_examples ({num_examples})"
            )
        q = batch / n
    else:
        n = None
        q = validation.check_rate("sampling_rate", sampling_rate)
    if sampling == accounting.FIXED_SIZE:
        if n is None:
            raise ValueError("sampling='fixed_size' needs num_examples (the accountant uses N and B)")
        batch = validation.check_positive_int("expected_batch_size", expected_batch_size)
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
    key_data = _key_data(seed)

    max_steps = None
    if (target_epsilon is None) != (target_delta is None):
        raise ValueError("pass both target_epsilon and target_delta for a budget, or neither")
    if target_epsilon is not None:
        if sampling == accounting.FIXED_SIZE:
            acct_kwargs = dict(dataset_size=n, batch_size=int(round(batch)))
        else:
            acct_kwargs = dict(sampling_rate=float(ledger_lib.round_to_float32(q, +1.0)))
        max_steps = accounting.max_steps(
            target_epsilon=target_epsilon,
            delta=target_delta,
            noise_multiplier=float(ledger_lib.round_to_float32(sigma, -1.0)),
            sampling=sampling,
            accountant=accountant,
            **acct_kwargs,
        )
        if max_steps == 0:
            warnings.warn(
                f"target_epsilon={target_epsilon} allows no step at noise_multiplier={sigma}; "
                "every update will be refused",
                stacklevel=2,
            )

    def init_fn(params):
        accumulated = () if k == 1 else jax.tree_util.tree_map(
            lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.result_type(p), jnp.float32)), params
        )
        return PrivatizeState(
            ledger=jax.tree_util.tree_map(
                jnp.asarray,
                ledger_lib.new_ledger(
                    noise_multiplier=sigma,
                    sampling_rate=q,
                    dataset_size=n,
                    sampling=sampling,
                    max_steps=max_steps,
                ),
            ),
            key=jnp.asarray(key_data),
            accumulated=accumulated,
            micro_step=jnp.zeros((), jnp.int32),
            inner_state=inner.init(params),
        )

    def noisy_step(total, state, params):
        """Noise, normalise, record, and apply the inner optimizer (or refuse)."""
        led = state.ledger
        allowed = (led.max_steps < 0) | (led.steps < led.max_steps)

        def apply(_):
            step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), led.steps)
            leaves, treedef = jax.tree_util.tree_flatten(total)
            keys = jax.random.split(step_key, len(leaves))
            std = led.noise_multiplier * clip
            noisy = [
                (x + std * jax.random.normal(kk, jnp.shape(x), jnp.float32)).astype(x.dtype) / batch
                for kk, x in zip(keys, leaves)
            ]
            updates, inner_state = inner.update(jax.tree_util.tree_unflatten(treedef, noisy), state.inner_state, params)
            return updates, inner_state, led._replace(steps=led.steps + 1)

        def refuse(_):
            # No data-dependent output at all: zero updates, nothing recorded as spent.
            updates = _zeros_shaped_like(jax.eval_shape(apply, None)[0])
            return updates, state.inner_state, led._replace(refused_steps=led.refused_steps + 1)

        return jax.lax.cond(allowed, apply, refuse, None)

    def update_fn(updates, state, params=None):
        if not isinstance(updates, ClippedGradient):
            raise TypeError(
                "dpjax.privatize received a plain gradient pytree "
                f"({type(updates).__name__}); noise calibrated to a clip norm is only private "
                "for clipped per-example gradients. Compute them with "
                "grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=C) and pass grad_fn(params, batch)."
            )
        if updates.sensitivity > clip * (1 + 1e-6):
            raise ValueError(
                f"the clipped gradient's L2 sensitivity ({updates.sensitivity}) exceeds the "
                f"l2_clip_norm the noise is calibrated to ({clip}); use the same clip norm in "
                "clipped_grad and privatize"
            )
        total = jax.tree_util.tree_map(
            lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), updates.sum
        )
        led = state.ledger
        final_call = k == 1 or (_is_concrete(state.micro_step) and int(state.micro_step) + 1 >= k)
        if final_call and _is_concrete(led.steps) and int(led.max_steps) >= 0 and int(led.steps) >= int(led.max_steps):
            raise accounting.PrivacyBudgetExceeded(
                f"this noisy step would exceed the privacy budget (epsilon={target_epsilon}, "
                f"delta={target_delta}): {int(led.steps)} of {int(led.max_steps)} allowed steps "
                "already taken. Nothing was applied."
            )
        if k == 1:
            new_updates, inner_state, new_ledger = noisy_step(total, state, params)
            return new_updates, state._replace(ledger=new_ledger, inner_state=inner_state)

        acc = jax.tree_util.tree_map(jnp.add, state.accumulated, total)
        micro = state.micro_step + 1

        def final(_):
            new_updates, inner_state, new_ledger = noisy_step(acc, state, params)
            zero_acc = jax.tree_util.tree_map(jnp.zeros_like, acc)
            return new_updates, state._replace(
                ledger=new_ledger, inner_state=inner_state, accumulated=zero_acc, micro_step=jnp.zeros_like(micro)
            )

        def not_final(_):
            zeros = _zeros_shaped_like(jax.eval_shape(lambda: noisy_step(acc, state, params)[0]))
            return zeros, state._replace(accumulated=acc, micro_step=micro)

        return jax.lax.cond(micro >= k, final, not_final, None)

    return optax.GradientTransformation(init_fn, update_fn)


def dp_sgd(
    learning_rate: optax.ScalarOrSchedule,
    l2_norm_clip: float,
    noise_multiplier: float,
    expected_batch_size: Optional[float] = None,
    *,
    num_examples: Optional[int] = None,
    sampling_rate: Optional[float] = None,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    seed: Optional[int] = None,
    **privatize_kwargs,
) -> optax.GradientTransformation:
    """DP-SGD in one line, like TF Privacy's ``DPGradientDescentGaussianOptimizer``.

    ``privatize(optax.sgd(learning_rate, momentum, nesterov), ...)``. Unlike TF
    Privacy, clipping is per example (not per microbatch) and happens in
    :func:`dpjax.clipped_grad`; the update is divided by the public expected
    batch size. Other keyword arguments go to :func:`privatize`.

    >>> import dpjax
    >>> tx = dpjax.dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.1,
    ...                   expected_batch_size=256, num_examples=60_000)
    """
    return privatize(
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
        noise_multiplier=noise_multiplier,
        l2_clip_norm=l2_norm_clip,
        expected_batch_size=expected_batch_size,
        num_examples=num_examples,
        sampling_rate=sampling_rate,
        seed=seed,
        **privatize_kwargs,
    )


def dp_adam(
    learning_rate: optax.ScalarOrSchedule,
    l2_norm_clip: float,
    noise_multiplier: float,
    expected_batch_size: Optional[float] = None,
    *,
    num_examples: Optional[int] = None,
    sampling_rate: Optional[float] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    seed: Optional[int] = None,
    **privatize_kwargs,
) -> optax.GradientTransformation:
    """DP-Adam in one line: ``privatize(optax.adam(...), ...)``.

    >>> import dpjax
    >>> tx = dpjax.dp_adam(1e-3, l2_norm_clip=1.0, noise_multiplier=1.1,
    ...                    expected_batch_size=256, num_examples=60_000)
    """
    return privatize(
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
        noise_multiplier=noise_multiplier,
        l2_clip_norm=l2_norm_clip,
        expected_batch_size=expected_batch_size,
        num_examples=num_examples,
        sampling_rate=sampling_rate,
        seed=seed,
        **privatize_kwargs,
    )
