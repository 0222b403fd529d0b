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

import dataclasses
import secrets
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import accounting, correlated_noise as cn, ledger as ledger_lib, provenance as provenance_lib, validation
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
      noise_state: the last ``b − 1`` normalised noise pytrees of BandMF,
        stacked (``()`` for the other noises, which are stateless).
      inner_state: the wrapped optimizer's state.
    """

    ledger: ledger_lib.PrivacyLedger
    key: jax.Array
    accumulated: PyTree
    micro_step: jax.Array
    noise_state: PyTree
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


class UnverifiedBatchesWarning(UserWarning):
    """``privatize(trust_unverified_batches=True)``: batch provenance is not checked."""


@dataclasses.dataclass(frozen=True)
class _NoiseSettings:
    """Everything ``privatize`` fixed at construction (public, static values)."""

    sigma: float
    clip: float
    normaliser: float  # the public E[B] the noisy sum is divided by
    sampling_rate: float
    num_examples: Optional[int]
    sampling: str
    accumulation_steps: int
    max_steps: Optional[int]
    verified: bool
    key_data: np.ndarray
    target_epsilon: Optional[float]
    target_delta: Optional[float]
    noise: Any = None  # None (independent), cn.BandMF or cn.TreeAggregation
    partitions: int = 1
    partition_id: int = 0

    @property
    def mechanism(self) -> int:
        return cn.code_and_bands(self.noise)[0]

    @property
    def bands(self) -> int:
        return cn.code_and_bands(self.noise)[1]


def _sampling_of(sampler, expected_batch_size, num_examples, sampling_rate, sampling):
    """(E[B], q, N or None, scheme) from a sampler or from the explicit arguments."""
    if sampler is not None:
        if any(v is not None for v in (expected_batch_size, num_examples, sampling_rate, sampling)):
            raise ValueError(
                "pass either sampler or expected_batch_size/num_examples/sampling_rate/sampling, "
                "not both: the sampler already fixes them"
            )
        for attr in ("sampling", "sampling_rate", "num_examples", "expected_batch_size"):
            if not hasattr(sampler, attr):
                raise TypeError(f"sampler must be a dpjax sampler (PoissonSampler, ...), got {type(sampler).__name__}")
        validation.check_choice("sampling", sampler.sampling, set(ledger_lib.SAMPLING_CODES))
        return float(sampler.expected_batch_size), float(sampler.sampling_rate), sampler.num_examples, sampler.sampling
    if expected_batch_size is None:
        raise ValueError("expected_batch_size is required (or pass sampler=...)")
    sampling = accounting.POISSON if sampling is None else sampling
    validation.check_choice("sampling", sampling, {accounting.POISSON, accounting.FIXED_SIZE})
    batch = validation.check_positive("expected_batch_size", expected_batch_size)
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
        n, q = None, validation.check_rate("sampling_rate", sampling_rate)
    if sampling == accounting.FIXED_SIZE:
        if n is None:
            raise ValueError("sampling='fixed_size' needs num_examples (the accountant uses N and B)")
        batch = validation.check_positive_int("expected_batch_size", expected_batch_size)
    return batch, q, n, sampling


def _budget_steps(sigma, q, n, batch, sampling, target_epsilon, target_delta, accountant,
                  mechanism=(cn.INDEPENDENT, 1, 1)) -> Optional[int]:
    """Noisy steps the budget allows (None: no budget), with the ledger's rounded σ and q.

    ``mechanism``: (code, partitions, bands) of the noise, whose steps count as
    :func:`dpjax.correlated_noise.compositions` DP-SGD steps."""
    if (target_epsilon is None) != (target_delta is None):
        raise ValueError("pass both target_epsilon and target_delta for a budget, or neither")
    if target_epsilon is None:
        return None
    code, partitions, bands = mechanism
    sampled = cn.compositions(code, 1, partitions, bands)[1]
    if sampling == accounting.FIXED_SIZE:
        acct_kwargs = dict(dataset_size=n, batch_size=int(round(batch)))
    else:
        acct_kwargs = dict(sampling_rate=float(ledger_lib.round_to_float32(q, +1.0)) if sampled else 1.0)
    max_compositions = accounting.max_steps(
        target_epsilon=target_epsilon,
        delta=target_delta,
        noise_multiplier=float(ledger_lib.round_to_float32(sigma, -1.0)),
        sampling=accounting.FIXED_SIZE if sampling == accounting.FIXED_SIZE else accounting.POISSON,
        accountant=accountant,
        **acct_kwargs,
    )
    max_steps = cn.max_noisy_steps(code, partitions, bands, max_compositions)
    if max_steps == 0:
        warnings.warn(
            f"target_epsilon={target_epsilon} allows no step at noise_multiplier={sigma}; "
            "every update will be refused",
            stacklevel=3,
        )
    return max_steps


def _init_state(s: _NoiseSettings, inner, params) -> PrivatizeState:
    accumulated = () if s.accumulation_steps == 1 else jax.tree_util.tree_map(
        lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.result_type(p), jnp.float32)), params
    )
    ledger = ledger_lib.new_ledger(
        noise_multiplier=s.sigma, sampling_rate=s.sampling_rate, dataset_size=s.num_examples,
        sampling=s.sampling, max_steps=s.max_steps, verified=s.verified, mechanism=s.mechanism,
        bands=s.bands, partitions=s.partitions, partition_id=s.partition_id,
    )
    noise_state = (cn.init_buffer(s.noise.unit_coefficients(), params) if isinstance(s.noise, cn.BandMF)
                   and s.noise.bands > 1 else ())
    return PrivatizeState(
        ledger=jax.tree_util.tree_map(jnp.asarray, ledger),
        key=jnp.asarray(s.key_data),
        accumulated=accumulated,
        micro_step=jnp.zeros((), jnp.int32),
        noise_state=noise_state,
        inner_state=inner.init(params),
    )


def _checked_sum(g, s: _NoiseSettings):
    """The clipped sum of ``g`` in float32 or wider, after the static checks."""
    if not isinstance(g, ClippedGradient):
        from flax import nnx

        if isinstance(g, nnx.State):
            raise TypeError(
                "dpjax.privatize received an nnx.State, not a dpjax.ClippedGradient: nnx.Optimizer.update "
                "(or nnx.grad) hands on only gradient arrays, which carry no clipping guarantee or batch "
                "provenance. Use dpjax.nnx.Optimizer(model, tx) (same constructor and update(model, grads)) "
                "with grads = dpjax.clipped_grad(loss_fn, l2_clip_norm=C)(model, batch)."
            )
        raise TypeError(
            "dpjax.privatize received a plain gradient pytree "
            f"({type(g).__name__}); noise calibrated to a clip norm is only private "
            "for clipped per-example gradients. Compute them with "
            "grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=C) and pass grad_fn(params, batch)."
        )
    if g.sensitivity > s.clip * (1 + 1e-6):
        raise ValueError(
            f"the clipped gradient's L2 sensitivity ({g.sensitivity}) exceeds the "
            f"l2_clip_norm the noise is calibrated to ({s.clip}); use the same clip norm in "
            "clipped_grad and privatize"
        )
    if s.verified and g.provenance is None:
        raise provenance_lib.BatchProvenanceError(provenance_lib.missing_stamp_message())
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), g.sum)


def _stamp_details(stamp, state, s: _NoiseSettings) -> str:
    led = state.ledger
    return (f"batch drawn for step {int(stamp.step)}, micro-batch {int(stamp.micro_index)} of "
            f"{int(stamp.micro_count)}, N={int(stamp.num_examples)}, q={float(stamp.sampling_rate):.6g}; "
            f"ledger at step {int(led.steps)}, micro-step {int(state.micro_step)} of {s.accumulation_steps}, "
            f"N={int(led.dataset_size) or 'not given'}, q={float(led.sampling_rate):.6g}")


def _raise_now(code, budget_ok, stamp, state, s: _NoiseSettings) -> None:
    """Outside ``jit`` (concrete values) a refused step raises before anything is applied."""
    if _is_concrete(code) and int(code) != 0:
        raise provenance_lib.BatchProvenanceError(
            provenance_lib.describe_refusal(int(code), _stamp_details(stamp, state, s)))
    if _is_concrete(budget_ok) and not bool(budget_ok):
        led = state.ledger
        raise accounting.PrivacyBudgetExceeded(
            f"this noisy step would exceed the privacy budget (epsilon={s.target_epsilon}, "
            f"delta={s.target_delta}): {int(led.steps)} of {int(led.max_steps)} allowed steps "
            "already taken. Nothing was applied."
        )


def _warn_refused(code, stamp_step, ledger_step):
    if int(code) == 0:  # under vmap the branch is a select: the callback runs for accepted steps too
        return
    warnings.warn(provenance_lib.describe_refusal(
        int(code), f"batch drawn for step {int(stamp_step)}, ledger at step {int(ledger_step)}")
        + " dpjax.check_budget(opt_state) raises this.", provenance_lib.BatchProvenanceWarning, stacklevel=1)


def _standard_noise(s: _NoiseSettings, like, state):
    """This step's standard-normal-scale noise (a pytree like ``like``) and the next noise state."""
    led = state.ledger
    key = jax.random.wrap_key_data(state.key)
    if isinstance(s.noise, cn.TreeAggregation):
        restart = s.partitions if s.noise.restarts else None
        return cn.tree_step_noise(key, led.steps, like, restart), state.noise_state
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(jax.random.fold_in(key, led.steps), len(leaves))
    z = jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(kk, jnp.shape(x), jnp.float32) for kk, x in zip(keys, leaves)])
    if isinstance(s.noise, cn.BandMF) and s.noise.bands > 1:
        return cn.next_noise(s.noise.unit_coefficients(), state.noise_state, z)  # C⁻¹z, streamed
    return z, state.noise_state


def _add_noise(s: _NoiseSettings, total, state):
    """``((total + σC·noise) / E[B], next noise state)``, one fresh key per noisy step and leaf."""
    noise, noise_state = _standard_noise(s, total, state)
    std = state.ledger.noise_multiplier * s.clip
    noisy = jax.tree_util.tree_map(lambda x, w: (x + std * w).astype(x.dtype) / s.normaliser, total, noise)
    return noisy, noise_state


def _update(s: _NoiseSettings, inner, g, state: PrivatizeState, params):
    """One call of ``update``: refuse, accumulate, or noise-and-apply (chosen inside jit)."""
    total = _checked_sum(g, s)
    led, k = state.ledger, s.accumulation_steps
    budget_ok = (led.max_steps < 0) | (led.steps < led.max_steps)
    code = (provenance_lib.refusal_code(g.provenance, led, state.micro_step, k)
            if s.verified and g.provenance is not None else jnp.zeros((), jnp.int32))
    _raise_now(code, budget_ok, g.provenance, state, s)

    def noisy(_):
        whole = total if k == 1 else jax.tree_util.tree_map(jnp.add, state.accumulated, total)
        noisy_grad, noise_state = _add_noise(s, whole, state)
        updates, inner_state = inner.update(noisy_grad, state.inner_state, params)
        new = state._replace(ledger=led._replace(steps=led.steps + 1), inner_state=inner_state,
                             noise_state=noise_state)
        if k > 1:
            new = new._replace(accumulated=jax.tree_util.tree_map(jnp.zeros_like, state.accumulated),
                               micro_step=jnp.zeros_like(state.micro_step))
        return updates, new

    def zero_updates():
        return _zeros_shaped_like(jax.eval_shape(noisy, None)[0])

    def refuse(_):
        # No data-dependent output at all: zero updates, nothing recorded as spent.
        bad = code != 0
        if s.verified and g.provenance is not None:
            jax.lax.cond(bad, lambda: jax.debug.callback(_warn_refused, code, g.provenance.step, led.steps),
                         lambda: None)
        return zero_updates(), state._replace(ledger=led._replace(
            refused_steps=led.refused_steps + (~budget_ok & ~bad).astype(jnp.int32),
            refused_batches=led.refused_batches + bad.astype(jnp.int32),
            refusal=jnp.where(bad, code, led.refusal)))

    def accumulate(_):
        acc = jax.tree_util.tree_map(jnp.add, state.accumulated, total)
        return zero_updates(), state._replace(accumulated=acc, micro_step=state.micro_step + 1)

    accepted = budget_ok & (code == 0)
    if k == 1:
        return jax.lax.cond(accepted, noisy, refuse, None)
    final = state.micro_step + 1 >= k
    branch = jnp.where(accepted, jnp.where(final, 2, 1), 0)
    return jax.lax.switch(branch, (refuse, accumulate, noisy), None)


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
    trust_unverified_batches: bool = False,
    noise=None,
) -> optax.GradientTransformation:
    """Make an optax optimizer differentially private (DP-SGD's noise step).

    Args:
      inner: any optax ``GradientTransformation`` (sgd, adam, a chain, ...).
      noise_multiplier: σ > 0; noise std is ``σ · l2_clip_norm``.
      l2_clip_norm: the clip norm C the noise is calibrated to. Gradients whose
        sensitivity is larger are refused.
      sampler: the :class:`dpjax.PoissonSampler` (or ``FixedSizeSampler``,
        ``parallel.ShardedPoissonSampler``) that draws the batches
        (recommended): the ledger then describes exactly its sampling.
      expected_batch_size, num_examples, sampling_rate, sampling: instead of
        ``sampler``: the public normaliser E[B] of a *logical* batch, the data
        set size N (``q = E[B] / N``) or the rate q, and ``"poisson"``
        (default) or ``"fixed_size"`` (needs ``num_examples``).
      seed: int for reproducible noise, or ``None`` (default) for a seed from
        the operating system. Keep an int seed secret: noise from a known seed
        can be subtracted.
      accumulation_steps: number of ``update`` calls that form one logical
        batch: the micro-batches of one draw
        (``sampler.sample_micro_batches(accumulation_steps)``). Clipped sums are
        added up and noise is added once, on the last call; the other calls
        return zero updates.
      target_epsilon, target_delta: optional budget. A step that would exceed
        it raises :class:`~dpjax.accounting.PrivacyBudgetExceeded` before
        anything is applied (outside ``jit``); under ``jit`` it is refused
        (zero updates, ledger unchanged) and :func:`dpjax.check_budget` raises.
      accountant: ``"rdp"`` or ``"pld"``, used for the budget.
      trust_unverified_batches: the loud opt-out. By default every clipped
        gradient must come from a batch a dpjax sampler with this ledger's
        scheme, N and q drew for the very step the ledger is at
        (:mod:`dpjax.provenance`); anything else is refused with
        :class:`~dpjax.provenance.BatchProvenanceError`. ``True`` accepts
        gradients of any batch, for users who sample by themselves and have
        their own analysis; it warns, and the privacy statement records that
        provenance was not verified.
      noise: ``None`` (default): independent noise every step (DP-SGD).
        ``dpjax.BandMF(bands=b)`` or ``dpjax.TreeAggregation()``: noise
        correlated across steps (:mod:`dpjax.correlated_noise`), with a
        :class:`dpjax.sampling.CyclicPoissonSampler` as ``sampler``; the ledger
        records the mechanism and accounts it (BandMF: amplified, as DP-SGD
        steps of one pass each; trees: without amplification).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` takes a
      :class:`~dpjax.clipping.ClippedGradient`.

    Example (a DP step with a Poisson sampler):

    >>> import jax, jax.numpy as jnp, numpy as np, optax, dpjax
    >>> def loss(w, batch):
    ...     return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
    >>> data = {"x": np.ones((100, 3), np.float32), "y": np.ones(100, np.float32)}
    >>> sampler = dpjax.PoissonSampler(100, expected_batch_size=4, seed=0)
    >>> grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=1.0)            # was jax.grad(loss)
    >>> tx = dpjax.privatize(optax.adam(1e-2), noise_multiplier=1.1,     # was optax.adam(1e-2)
    ...                      l2_clip_norm=1.0, sampler=sampler, seed=0)
    >>> w = jnp.zeros(3); state = tx.init(w)
    >>> batch = sampler.sample().take(data)                             # rows, mask, provenance
    >>> updates, state = tx.update(grad_fn(w, batch), state, w)
    >>> w = optax.apply_updates(w, updates)
    >>> dpjax.steps_taken(state)
    1
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
    batch, q, n, sampling = _sampling_of(sampler, expected_batch_size, num_examples, sampling_rate, sampling)
    sigma = validation.check_positive("noise_multiplier", noise_multiplier)
    clip = validation.check_positive("l2_clip_norm", l2_clip_norm)
    k = validation.check_positive_int("accumulation_steps", accumulation_steps)
    if not isinstance(trust_unverified_batches, bool):
        raise TypeError(f"trust_unverified_batches must be True or False, got {trust_unverified_batches!r}")
    cn.check_mechanism(noise, sampler)
    partitions = getattr(sampler, "partitions", 1)
    code, bands = cn.code_and_bands(noise)
    mechanism = (code, partitions, bands)
    settings = _NoiseSettings(
        sigma=sigma, clip=clip, normaliser=batch, sampling_rate=q, num_examples=n, sampling=sampling,
        accumulation_steps=k,
        max_steps=_budget_steps(sigma, q, n, batch, sampling, target_epsilon, target_delta, accountant,
                                mechanism),
        verified=not trust_unverified_batches, key_data=_key_data(seed),
        target_epsilon=target_epsilon, target_delta=target_delta,
        noise=noise, partitions=partitions, partition_id=getattr(sampler, "partition_id", 0),
    )
    if trust_unverified_batches:
        warnings.warn(
            "privatize(trust_unverified_batches=True): batch provenance is NOT checked. The ledger's epsilon "
            "holds only if every step's batch is a fresh draw of the stated sampling (scheme, N, q), padding "
            "masked, noised once; the privacy statement will say provenance was not verified.",
            UnverifiedBatchesWarning, stacklevel=2,
        )

    def init_fn(params):
        return _init_state(settings, inner, params)

    def update_fn(updates, state, params=None):
        return _update(settings, inner, updates, state, params)

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
    batch size. Other keyword arguments (``sampler=`` in particular, instead
    of ``expected_batch_size``/``num_examples``) go to :func:`privatize`. As
    with ``privatize``, ``update`` accepts only clipped gradients of batches
    the described sampler drew (see :mod:`dpjax.provenance`).

    >>> import dpjax
    >>> sampler = dpjax.PoissonSampler(60_000, expected_batch_size=256)
    >>> tx = dpjax.dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.1, sampler=sampler)
    >>> tx = dpjax.dp_sgd(0.1, 1.0, 1.1, 256, num_examples=60_000)   # the same, by the numbers
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
    """DP-Adam in one line: ``privatize(optax.adam(...), ...)`` (see :func:`dp_sgd`).

    >>> import dpjax
    >>> sampler = dpjax.PoissonSampler(60_000, expected_batch_size=256)
    >>> tx = dpjax.dp_adam(1e-3, l2_norm_clip=1.0, noise_multiplier=1.1, sampler=sampler)
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
