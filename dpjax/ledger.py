"""The privacy ledger: what has been spent, stored inside the optimizer state.

:func:`dpjax.privatize` keeps a :class:`PrivacyLedger` in its state and updates
it inside ``jit`` on every noisy step (complete mediation: no call the user
can forget). Because it is part of the optimizer state it is saved with every
checkpoint and restored with it (compromise recording).

The functions here read a ledger out of any optimizer state, however deeply
``privatize`` is nested in ``optax.chain`` and friends, and hand it to
:mod:`dpjax.accounting`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from dpjax import accounting, provenance

CYCLIC_POISSON = "cyclic_poisson"
SAMPLING_CODES = {accounting.POISSON: 0, accounting.FIXED_SIZE: 1, CYCLIC_POISSON: 2}
_SAMPLING_NAMES = {v: k for k, v in SAMPLING_CODES.items()}


class PrivacyLedger(NamedTuple):
    """Arrays that describe every noisy step taken so far.

    Attributes:
      steps: int32, number of noisy updates applied.
      noise_multiplier: float32 σ (rounded *down* from the requested value, so
        accounting with it never understates ε). The noise step uses this very
        value, so the ledger always describes the noise actually added.
      sampling_rate: float32 q (rounded *up*, for the same reason).
      dataset_size: int32 N (0 when unknown; needed for fixed-size sampling).
      sampling: int32 code of the sampling scheme (0 Poisson, 1 fixed size).
      max_steps: int32, noisy steps allowed by the budget (-1: no budget).
      refused_steps: int32, steps refused because the budget was spent.
      verified: int32, 1 when every accepted batch's provenance was checked
        against this ledger; 0 when ``privatize(trust_unverified_batches=True)``
        opted out (the privacy statement says so).
      refused_batches: int32, clipped gradients refused for their provenance.
      refusal: int32 reasons of the last such refusal
        (:func:`dpjax.provenance.describe_refusal`), 0 if none.
      mechanism: int32 code of the noise (:mod:`dpjax.correlated_noise`: 0
        independent, 1 BandMF, 2 one tree, 3 a tree per pass).
      bands: int32 bands of BandMF (1 otherwise).
      partitions: int32 parts of a cyclic Poisson sampler (1 otherwise): an
        example is in at most one step of every ``partitions`` consecutive ones.
      partition_id: int32 fingerprint of the cyclic sampler's secret
        partitioning (0 otherwise), so that batches of another partitioning are
        refused: they could put an example in two steps of one band.
    """

    steps: jax.Array
    noise_multiplier: jax.Array
    sampling_rate: jax.Array
    dataset_size: jax.Array
    sampling: jax.Array
    max_steps: jax.Array
    refused_steps: jax.Array
    verified: jax.Array
    refused_batches: jax.Array
    refusal: jax.Array
    mechanism: jax.Array
    bands: jax.Array
    partitions: jax.Array
    partition_id: jax.Array


def round_to_float32(value: float, direction: float) -> np.float32:
    """``value`` as a float32, rounded up (direction > 0) or down (< 0), never to nearest."""
    value = float(value)
    v = np.float32(value)
    # Compare in float64: NumPy 2 would compare a float32 with a Python float in float32.
    if (direction > 0 and float(v) < value) or (direction < 0 and float(v) > value):
        v = np.nextafter(v, np.float32(direction * np.inf))
    return np.float32(v)


def new_ledger(*, noise_multiplier, sampling_rate, dataset_size, sampling, max_steps,
               verified: bool = True, mechanism: int = 0, bands: int = 1, partitions: int = 1,
               partition_id: int = 0) -> PrivacyLedger:
    """A ledger with zero steps (host-side, plain numpy arrays)."""
    return PrivacyLedger(
        steps=np.zeros((), np.int32),
        noise_multiplier=round_to_float32(noise_multiplier, -1.0),
        sampling_rate=round_to_float32(sampling_rate, +1.0),
        dataset_size=np.asarray(dataset_size or 0, np.int32),
        sampling=np.asarray(SAMPLING_CODES[sampling], np.int32),
        max_steps=np.asarray(-1 if max_steps is None else max_steps, np.int32),
        refused_steps=np.zeros((), np.int32),
        verified=np.asarray(1 if verified else 0, np.int32),
        refused_batches=np.zeros((), np.int32),
        refusal=np.zeros((), np.int32),
        mechanism=np.asarray(mechanism, np.int32),
        bands=np.asarray(bands, np.int32),
        partitions=np.asarray(partitions, np.int32),
        partition_id=np.asarray(partition_id, np.int32),
    )


def _plain_state(opt_state: Any) -> Any:
    """The optimizer state as plain arrays: an ``nnx.Optimizer`` (or its
    ``opt_state``) holds it wrapped in NNX variables."""
    from flax import nnx

    if isinstance(opt_state, nnx.Optimizer):
        opt_state = opt_state.opt_state
    return jax.tree_util.tree_map(
        lambda x: x.get_value() if isinstance(x, nnx.Variable) else x,
        opt_state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def find_ledger(opt_state: Any) -> PrivacyLedger:
    """The single :class:`PrivacyLedger` inside an optimizer state (or an
    ``nnx.Optimizer``, e.g. :class:`dpjax.nnx.Optimizer`).

    Raises:
      ValueError: if there is none (the optimizer is not private) or more than
        one (``privatize`` applied twice, which dpjax cannot account).
    """
    opt_state = _plain_state(opt_state)
    found = [
        leaf
        for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, PrivacyLedger))
        if isinstance(leaf, PrivacyLedger)
    ]
    if not found:
        raise ValueError(
            "no privacy ledger in this optimizer state: build the optimizer with "
            "dpjax.privatize(...) (or dpjax.dp_sgd / dpjax.dp_adam) and pass its state"
        )
    if len(found) > 1:
        raise ValueError(
            f"found {len(found)} privacy ledgers in this optimizer state; apply dpjax.privatize "
            "exactly once so that one place adds noise and one place accounts"
        )
    return found[0]


def _accounting_kwargs(ledger: PrivacyLedger) -> dict:
    """The DP-SGD accounting that describes the ledger's steps (correlated noise and
    cyclic sampling reduce to it: :func:`dpjax.correlated_noise.compositions`)."""
    from dpjax import correlated_noise

    sampling = _SAMPLING_NAMES[int(ledger.sampling)]
    q = float(ledger.sampling_rate)
    n = int(ledger.dataset_size)
    steps, sampled = correlated_noise.compositions(int(ledger.mechanism), int(ledger.steps),
                                                   int(ledger.partitions), int(ledger.bands))
    if sampling == CYCLIC_POISSON:
        sampling = accounting.POISSON
    kwargs = dict(
        noise_multiplier=float(ledger.noise_multiplier),
        steps=steps,
        sampling_rate=q if sampled else 1.0,
        sampling=sampling,
    )
    if sampling == accounting.FIXED_SIZE:
        # Fixed-size sampling is described by (N, B); q = B / N exactly.
        del kwargs["sampling_rate"]
        kwargs.update(dataset_size=n, batch_size=int(round(q * n)))
    return kwargs


def steps_taken(opt_state: Any) -> int:
    """Number of noisy updates recorded in ``opt_state``."""
    return int(find_ledger(opt_state).steps)


def epsilon(opt_state: Any, delta: float, *, accountant: str = "rdp") -> float:
    """ε spent so far by the private optimizer whose state is ``opt_state``.

    >>> import jax.numpy as jnp, dpjax
    >>> tx = dpjax.dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.1,
    ...                   expected_batch_size=256, num_examples=60_000, seed=0)
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> dpjax.epsilon(state, delta=1e-5)   # nothing spent yet
    0.0
    """
    return accounting.epsilon(delta=delta, accountant=accountant, **_accounting_kwargs(find_ledger(opt_state)))


def privacy_statement(opt_state: Any, delta: float, *, l2_clip_norm: float | None = None) -> str:
    """A human-readable report of what ``opt_state``'s ledger has spent."""
    ledger = find_ledger(opt_state)
    text = accounting.privacy_statement(delta=delta, l2_clip_norm=l2_clip_norm, **_accounting_kwargs(ledger))
    text += _mechanism_line(ledger)
    if int(ledger.verified):
        text += ("\nBatch provenance: verified. Every noisy step used a fresh draw of this sampler, "
                 "padding masked, noised once (checked by dpjax.privatize).")
    else:
        text += ("\nBatch provenance: NOT VERIFIED. privatize(trust_unverified_batches=True) accepted "
                 "batches that dpjax did not draw; the epsilon above holds only if they were sampled as "
                 "stated (each step a fresh, independent draw), padding masked, each noised once.")
    if int(ledger.refused_batches):
        text += f"\n{int(ledger.refused_batches)} clipped gradient(s) were refused for their provenance (not spent)."
    return text


def _mechanism_line(ledger: PrivacyLedger) -> str:
    """What the accounted steps above stand for, when they are not plain DP-SGD steps."""
    from dpjax import correlated_noise as cn

    code, parts = int(ledger.mechanism), int(ledger.partitions)
    if code == cn.INDEPENDENT and int(ledger.sampling) != SAMPLING_CODES[CYCLIC_POISSON]:
        return ""
    count, sampled = cn.compositions(code, int(ledger.steps), parts, int(ledger.bands))
    name = cn.MECHANISM_NAMES[code] + (f", {int(ledger.bands)} bands" if code == cn.BANDED else "")
    how = ("each a Poisson-subsampled Gaussian mechanism: an example is in at most one step of "
           f"every {parts} (cyclic Poisson sampling over {parts} parts)" if sampled else
           "Gaussian mechanisms without amplification by sampling (the tree's sensitivity, squared)")
    return (f"\nNoise: {name}. The {int(ledger.steps)} noisy steps are accounted as {count} "
            f"compositions above, {how}.")


def check_budget(opt_state: Any) -> None:
    """Raise if a step was refused: the budget is spent, or a batch's provenance failed.

    Under ``jit`` a step past the budget, or a clipped gradient whose batch the
    ledger cannot account for, cannot raise; ``privatize`` then returns zero
    updates, leaves the ledger's step count unchanged and counts the refusal.
    Call this between steps of a jitted loop to stop it.

    Raises:
      dpjax.BatchProvenanceError: a batch was refused for its provenance
        (with the reason and the fix).
      dpjax.accounting.PrivacyBudgetExceeded: the budget is spent.
    """
    ledger = find_ledger(opt_state)
    if int(ledger.refused_batches) > 0:
        raise provenance.BatchProvenanceError(
            f"{int(ledger.refused_batches)} step(s) were refused inside jit. "
            + provenance.describe_refusal(int(ledger.refusal)) + " Fix the training loop and start again."
        )
    max_steps, steps, refused = int(ledger.max_steps), int(ledger.steps), int(ledger.refused_steps)
    if refused > 0 or (max_steps >= 0 and steps >= max_steps):
        raise accounting.PrivacyBudgetExceeded(
            f"privacy budget spent: {steps} of {max_steps} allowed noisy steps taken"
            + (f", {refused} further step(s) refused" if refused else "")
            + ". Stop training, or start a new budget with a larger target_epsilon "
            "(which weakens the guarantee)."
        )
