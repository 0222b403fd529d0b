"""Correlated noise for DP training: the banded Toeplitz matrix mechanism (BandMF).

The matrix mechanism for the prefix sums ``A x`` of the clipped gradients
``x_1..x_T`` factors ``A = B C``, releases ``C x + σ·Δ·z`` (``z`` i.i.d. standard
normal, ``Δ`` the sensitivity of ``C``) and hands the optimizer
``C⁻¹(C x + σΔz) = x + σΔ·C⁻¹z``: each step's gradient noise is correlated with
the noise of earlier steps, so that much of it cancels in the sums the
parameters follow.

Here ``C`` is lower-triangular Toeplitz with ``b`` bands (Choquette-Choo et al.,
"(Amplified) Banded Matrix Factorization", NeurIPS 2023). Its default
coefficients are those of the square root of the prefix-sum matrix, ``(1 − x)^(-1/2)
= Σ binom(2k, k)/4^k · x^k``, truncated to ``b`` bands. The noise ``w = C⁻¹z`` is
streamed: ``w_t = (z_t − Σ_{k=1}^{b−1} c_k w_{t−k}) / c_0`` needs only the last
``b − 1`` noise vectors, never a T×T matrix.

Sensitivity: with *b-min-separated* participation (an example is used at most
once in any ``b`` consecutive steps, as cyclic Poisson sampling guarantees), the
columns an example touches do not overlap, so ``Δ² = k · max_j ‖C[:, j]‖²`` for
``k`` participations; with ``b = 1`` (``C = I``) this is DP-SGD.

This module holds the strategies (:class:`BandMF`, :class:`TreeAggregation`),
the streaming noise, the sensitivities, the participation check and the
accounting reduction (:func:`compositions`) that :func:`dpjax.privatize` uses
with ``noise=``; the sampler is :class:`dpjax.sampling.CyclicPoissonSampler`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dpjax import validation


def sqrt_prefix_sum_coefficients(bands: int) -> np.ndarray:
    """The first ``bands`` coefficients of the lower-triangular Toeplitz square root
    of the prefix-sum matrix: ``c_k = binom(2k, k) / 4^k`` (1, 1/2, 3/8, 5/16, ...).

    >>> sqrt_prefix_sum_coefficients(4).tolist()
    [1.0, 0.5, 0.375, 0.3125]
    """
    bands = _check_bands(bands)
    c = np.ones(bands)
    for k in range(1, bands):
        c[k] = c[k - 1] * (2 * k - 1) / (2 * k)  # the ratio binom(2k,k)/4^k over its predecessor
    return c


def _check_bands(bands) -> int:
    return validation.check_positive_int("bands", bands)


def _check_coefficients(coefficients) -> np.ndarray:
    c = np.asarray(coefficients, np.float64)
    if c.ndim != 1 or len(c) == 0 or not np.all(np.isfinite(c)) or c[0] <= 0:
        raise ValueError("coefficients must be a non-empty 1-D vector of finite numbers with c[0] > 0 "
                         f"(the diagonal of C), got {coefficients!r}")
    return c


def strategy_matrix(coefficients, steps: int) -> np.ndarray:
    """The T×T lower-triangular banded Toeplitz ``C`` (for tests and small T only)."""
    c = _check_coefficients(coefficients)
    m = np.zeros((steps, steps))
    for k, ck in enumerate(c[:steps]):
        m += ck * np.eye(steps, k=-k)
    return m


def sensitivity(coefficients, participations: int = 1) -> float:
    """``Δ`` of the banded ``C`` under b-min-separated participation (b = the number
    of coefficients): ``sqrt(participations) · ‖c‖₂``, the largest column norm."""
    c = _check_coefficients(coefficients)
    return math.sqrt(validation.check_positive_int("participations", participations)) * float(np.linalg.norm(c))


def brute_force_sensitivity(matrix: np.ndarray, separation: int, participations: int) -> float:
    """The largest ``‖Σ_{j∈S} C[:, j]‖₂`` over sets S of ``participations`` steps at
    least ``separation`` apart (an example adds a unit vector at each; for a
    non-negative C aligned contributions are the worst case). Exponential: tests only."""
    steps = matrix.shape[1]
    best = 0.0
    for cols in itertools.combinations(range(steps), participations):
        if all(b - a >= separation for a, b in zip(cols, cols[1:])):
            best = max(best, float(np.linalg.norm(matrix[:, list(cols)].sum(axis=1))))
    return best


def init_buffer(coefficients, like) -> jax.Array:
    """The streaming state: the last ``b − 1`` noise pytrees, stacked (zeros at start)."""
    c = _check_coefficients(coefficients)
    return jax.tree_util.tree_map(lambda x: jnp.zeros((max(len(c) - 1, 0),) + jnp.shape(x), jnp.float32), like)


def next_noise(coefficients, buffer, z):
    """One step of ``w = C⁻¹ z``: returns ``(w_t, new_buffer)`` for fresh standard
    normal ``z`` (a pytree like the gradient); ``buffer[0]`` is ``w_{t−1}``.

    >>> c = sqrt_prefix_sum_coefficients(3)
    >>> buf = init_buffer(c, jnp.zeros(1))
    >>> w1, buf = next_noise(c, buf, jnp.ones(1)); w2, buf = next_noise(c, buf, jnp.ones(1))
    >>> float(w1[0]), float(w2[0])   # C⁻¹ [1, 1]: 1, then 1 - 0.5 * 1
    (1.0, 0.5)
    """
    c = jnp.asarray(_check_coefficients(coefficients), jnp.float32)

    def one(buf, zt):
        # An unrolled sum of b − 1 scaled buffers fuses into one pass (a tensordot over so short
        # an axis is ~25% slower on the CPU).
        past = sum(c[j + 1] * buf[j] for j in range(buf.shape[0]))
        wt = (zt - past) / c[0]
        return wt, (jnp.concatenate([wt[None], buf[:-1]]) if buf.shape[0] else buf)

    pairs = jax.tree_util.tree_map(one, buffer, z)
    is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
    w = jax.tree_util.tree_map(lambda p: p[0], pairs, is_leaf=is_pair)
    new_buffer = jax.tree_util.tree_map(lambda p: p[1], pairs, is_leaf=is_pair)
    return w, new_buffer


def check_participation(sampler, bands: int) -> None:
    """Refuse a sampler whose participation the banded strategy's accounting does not
    cover: it must be a :class:`dpjax.sampling.CyclicPoissonSampler` with at least
    ``bands`` parts (then participations are ``bands`` or more steps apart)."""
    from dpjax.sampling import CyclicPoissonSampler

    bands = _check_bands(bands)
    if bands == 1:
        if getattr(sampler, "sampling", None) in ("poisson", "cyclic_poisson"):
            return
    if not isinstance(sampler, CyclicPoissonSampler):
        raise ValueError(
            f"a {bands}-band strategy needs participations at least {bands} steps apart: use "
            f"dpjax.sampling.CyclicPoissonSampler(N, partitions={bands}, ...), not {type(sampler).__name__} "
            "(its batches may hold an example in consecutive steps, whose noise is correlated)")
    if sampler.partitions < bands:
        raise ValueError(f"the sampler has {sampler.partitions} partitions, fewer than the {bands} bands: an "
                         f"example could be in two steps {sampler.partitions} apart, inside one band")


def epsilon(*, noise_multiplier: float, bands: int, steps: int, sampling_rate: float, delta: float,
            accountant: str = "rdp") -> float:
    """ε of BandMF with ``bands`` bands under cyclic Poisson sampling over ``bands``
    parts with rate ``q`` in each, the noise ``noise_multiplier · Δ · clip``
    (``Δ`` from :func:`sensitivity` with one participation).

    Each example is in at most ``ceil(steps / bands)`` steps, each a Poisson-
    subsampled Gaussian mechanism on non-overlapping columns of a unit-norm C, so
    the mechanism is exactly as private as DP-SGD for that many steps
    (Choquette-Choo et al. 2023, amplified BandMF); ``bands = 1`` is DP-SGD.

    >>> from dpjax import accounting
    >>> epsilon(noise_multiplier=1.0, bands=1, steps=100, sampling_rate=0.01, delta=1e-5) == \\
    ...     accounting.epsilon(noise_multiplier=1.0, steps=100, sampling_rate=0.01, delta=1e-5)
    True
    """
    from dpjax import accounting

    bands = _check_bands(bands)
    return accounting.epsilon(noise_multiplier=noise_multiplier, steps=-(-int(steps) // bands),
                              sampling_rate=sampling_rate, delta=delta, accountant=accountant)


# --------------------------------------------------------------------------
# Tree aggregation (DP-FTRL, Kairouz et al., ICML 2021)
# --------------------------------------------------------------------------
#
# Node (level l, index k) of the binary tree holds the sum of steps
# k*2^l + 1 .. (k+1)*2^l and its own noise z(l, k). The prefix sum up to step t
# is covered by one node per set bit of t, so its noise is
# N_t = sum over set bits l of t of z(l, (t >> l) - 1). Each z is drawn from a key
# folded with (l, k): no buffers, and a resumed run draws the very same noise.


def tree_height(steps: int) -> int:
    """Levels of the tree over ``steps`` steps (leaves included): ``⌊log₂ T⌋ + 1``,
    the number of nodes one step's gradient enters."""
    return validation.check_positive_int("steps", steps).bit_length()


def tree_nodes(step: int) -> list:
    """The nodes ``(level, index)`` whose intervals partition steps ``1..step``.

    >>> tree_nodes(5)   # [1, 4] and [5, 5]
    [(0, 4), (2, 0)]
    """
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return [(level, (step >> level) - 1) for level in range(step.bit_length()) if step >> level & 1]


def tree_matrix(steps: int) -> np.ndarray:
    """The (nodes × steps) 0/1 encoding: row (l, k) sums its interval (tests, small T)."""
    rows = []
    for level in range(tree_height(steps)):
        for k in range(steps >> level):
            row = np.zeros(steps)
            row[k << level:(k + 1) << level] = 1.0
            rows.append(row)
    return np.array(rows)


def tree_prefix_noise(key, step: int, like, height: int):
    """``N_step``: the noise of the tree's prefix sum over steps ``1..step`` (standard
    normal per node, a pytree like ``like``); ``N_0 = 0``. ``step`` may be traced
    (inside ``jit``): every level is visited and masked by the bits of ``step``."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    step = jnp.asarray(step, jnp.int32)
    total = [jnp.zeros(jnp.shape(x), jnp.float32) for x in leaves]
    for level in range(int(height)):
        present = (step >> level) & 1
        node = jax.random.fold_in(jax.random.fold_in(key, level), (step >> level) - 1)
        keys = jax.random.split(node, len(leaves))
        total = [t + present * jax.random.normal(k, jnp.shape(x), jnp.float32)
                 for t, k, x in zip(total, keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, total)


def tree_gradient_noise(key, step: int, like, height: int):
    """The noise of step ``step``'s gradient (1-based) when the optimizer follows the
    noisy prefix sums: ``N_step − N_(step−1)``, so the noise of any prefix sum of
    the gradients is one tree decomposition, not ``step`` independent draws."""
    now = tree_prefix_noise(key, step, like, height)
    before = tree_prefix_noise(key, jnp.asarray(step) - 1, like, height)
    return jax.tree_util.tree_map(jnp.subtract, now, before)


def tree_sensitivity(steps: int, participations: int = 1, restart_every=None) -> float:
    """``Δ`` of the tree encoding for an example in ``participations`` steps.

    Without restarts the worst case is that the steps share every node above
    them: ``Δ ≤ participations · sqrt(height)`` (each node's sum grows by one per
    participation below it). With a restart of the tree every ``restart_every``
    steps (one participation per restart period, e.g. once per epoch), each
    participation is in its own tree: ``Δ = sqrt(participations · height(restart_every))``.
    """
    participations = validation.check_positive_int("participations", participations)
    if restart_every is None:
        return float(participations) * math.sqrt(tree_height(steps))
    return math.sqrt(participations * tree_height(restart_every))


def tree_step_noise(key, step, like, restart_every: Optional[int] = None):
    """Standard-normal noise of the gradient of step ``step`` (0-based, may be traced)
    under tree aggregation: ``N_τ − N_(τ−1)`` of the tree it falls in, with
    ``τ = step + 1`` (one tree) or ``τ = step mod restart_every + 1`` and tree
    ``step // restart_every`` (a fresh tree every ``restart_every`` steps).

    Of the nodes of ``τ`` and ``τ − 1`` only those below the lowest set bit ``l`` of
    ``τ`` differ: ``N_τ − N_(τ−1) = z(l, τ>>l − 1) − Σ_(j<l) z(j, (τ−1)>>j − 1)``, so a
    step draws ``l + 1`` node noises (2 on average; ``lax.cond`` skips the rest). The
    same node keys as :func:`tree_prefix_noise` (for the tree's key), so the
    prefix sums of these noises are the tree's prefix noises.
    """
    step = jnp.asarray(step, jnp.int32)
    if restart_every is None:
        tree, tau, levels = jnp.zeros((), jnp.int32), step + 1, 31
    else:
        tree, tau, levels = step // restart_every, step % restart_every + 1, tree_height(restart_every)
    tree_key = key if restart_every is None else jax.random.fold_in(key, tree)
    lowest = jnp.sum(jnp.cumprod(1 - (tau >> jnp.arange(levels)) % 2))  # trailing zeros of tau
    leaves, treedef = jax.tree_util.tree_flatten(like)
    total = [jnp.zeros(jnp.shape(x), jnp.float32) for x in leaves]

    def node_noise(level, index):
        node = jax.random.fold_in(jax.random.fold_in(tree_key, level), index)
        return [jax.random.normal(k, jnp.shape(x), jnp.float32)
                for k, x in zip(jax.random.split(node, len(leaves)), leaves)]

    zeros = lambda: [jnp.zeros(jnp.shape(x), jnp.float32) for x in leaves]  # noqa: E731
    for level in range(levels):
        sign = jnp.where(level == lowest, 1.0, -1.0)
        index = jnp.where(level == lowest, (tau >> level) - 1, ((tau - 1) >> level) - 1)
        z = jax.lax.cond(level <= lowest, lambda lv=level, ix=index: node_noise(lv, ix), zeros)
        total = [t + sign * zz for t, zz in zip(total, z)]
    return jax.tree_util.tree_unflatten(treedef, total)


# --------------------------------------------------------------------------
# The strategies privatize(noise=...) takes, and their accounting
# --------------------------------------------------------------------------

INDEPENDENT, BANDED, TREE, TREE_RESTARTS = 0, 1, 2, 3
MECHANISM_NAMES = {INDEPENDENT: "independent Gaussian noise (DP-SGD)", BANDED: "banded matrix factorisation (BandMF)",
                   TREE: "tree aggregation (DP-FTRL), one tree", TREE_RESTARTS: "tree aggregation (DP-FTRL), "
                   "a new tree every pass over the partitions"}


@dataclasses.dataclass(frozen=True)
class BandMF:
    """Banded matrix factorisation noise with ``bands`` bands for :func:`dpjax.privatize`.

    ``coefficients``: the first column of the banded Toeplitz ``C`` (default: the
    square root of the prefix-sum matrix, :func:`sqrt_prefix_sum_coefficients`).
    They are normalised to unit L2 norm, so one participation has sensitivity C
    (the clip norm) and σ means what it means for DP-SGD. Needs a
    :class:`dpjax.sampling.CyclicPoissonSampler` with at least ``bands`` parts.

    >>> BandMF(bands=2).unit_coefficients().round(4).tolist()
    [0.8944, 0.4472]
    """

    bands: int
    coefficients: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        _check_bands(self.bands)
        if self.coefficients is not None and len(_check_coefficients(self.coefficients)) != self.bands:
            raise ValueError(f"coefficients must have bands={self.bands} entries, got {len(self.coefficients)}")

    @property
    def code(self) -> int:
        return BANDED

    def unit_coefficients(self) -> np.ndarray:
        c = (sqrt_prefix_sum_coefficients(self.bands) if self.coefficients is None
             else _check_coefficients(self.coefficients))
        return c / np.linalg.norm(c)


@dataclasses.dataclass(frozen=True)
class TreeAggregation:
    """Tree-aggregation noise (DP-FTRL, Kairouz et al. 2021) for :func:`dpjax.privatize`.

    Each node of a binary tree over the steps gets N(0, σ²C²) noise; step ``t``'s
    gradient gets ``N_t − N_(t−1)``, so the optimizer's prefix sums of noisy
    gradients carry the noise of ``⌊log₂ t⌋ + 1`` nodes, not of ``t`` steps (with
    SGD the parameters are exactly FTRL's). ``restarts=True`` (default) starts a
    fresh tree every pass over the sampler's partitions, so each example is in
    one leaf per tree. Accounted without amplification by sampling: the release
    is a Gaussian mechanism with L2 sensitivity ``C·sqrt(passes · height)``
    (restarts) or ``C · participations · sqrt(height)`` (one tree).
    """

    restarts: bool = True

    @property
    def code(self) -> int:
        return TREE_RESTARTS if self.restarts else TREE


def code_and_bands(noise) -> Tuple[int, int]:
    """(mechanism code, bands) of ``noise=`` (None: independent noise, 1 band)."""
    if noise is None:
        return INDEPENDENT, 1
    return noise.code, noise.bands if isinstance(noise, BandMF) else 1


def check_mechanism(noise, sampler) -> None:
    """Refuse a strategy and sampler whose participation the accounting does not cover."""
    if noise is None:
        return
    if not isinstance(noise, (BandMF, TreeAggregation)):
        raise TypeError(f"noise must be None, dpjax.BandMF(bands=...) or dpjax.TreeAggregation(), got {noise!r}")
    if sampler is None:
        raise ValueError(f"privatize(noise={noise!r}) needs sampler=: a dpjax.sampling.CyclicPoissonSampler, whose "
                         "partitions the accounting of correlated noise depends on")
    if isinstance(noise, BandMF):
        check_participation(sampler, noise.bands)
        return
    from dpjax.sampling import CyclicPoissonSampler

    if not isinstance(sampler, CyclicPoissonSampler):  # the tree's sensitivity counts passes over parts
        raise ValueError("tree aggregation needs each example in at most one step per pass: use "
                         f"dpjax.sampling.CyclicPoissonSampler(N, partitions=P, ...), not {type(sampler).__name__}")


def _check_accountable(code: int, partitions: int, bands: int) -> None:
    # With fewer parts than bands an example's columns of C overlap: the
    # one-step-per-pass accounting below would understate its privacy loss.
    if code == BANDED and int(bands) > partitions:
        raise ValueError(f"BandMF with {int(bands)} bands needs at least as many partitions, got {partitions}: "
                         "this participation is not accounted")


def compositions(code: int, steps: int, partitions: int, bands: int) -> Tuple[int, bool]:
    """The privacy of ``steps`` noisy steps as DP-SGD steps: ``(count, sampled)``.

    ``sampled`` False means Gaussian mechanisms of multiplier σ *without*
    amplification (q = 1). Independent noise and BandMF under cyclic Poisson
    sampling with ``partitions >= bands``: an example is in at most
    ``ceil(T / partitions)`` steps, whose columns of the unit-norm banded C have
    disjoint supports, each a Poisson-subsampled Gaussian mechanism (amplified
    BandMF, Choquette-Choo et al. 2023). Trees: a Gaussian mechanism of
    sensitivity Δ (in units of C) is ``Δ²`` compositions of multiplier σ.

    >>> compositions(BANDED, steps=10, partitions=4, bands=4)
    (3, True)
    >>> compositions(TREE_RESTARTS, steps=10, partitions=4, bands=1)   # 3 trees of height 3
    (9, False)
    """
    steps, partitions = int(steps), int(partitions)
    _check_accountable(code, partitions, bands)
    if steps == 0:
        return 0, code in (INDEPENDENT, BANDED)
    passes = -(-steps // partitions)
    if code in (INDEPENDENT, BANDED):
        return passes, True
    if code == TREE_RESTARTS:
        return passes * tree_height(partitions), False
    if code == TREE:
        return passes * passes * tree_height(steps), False
    raise ValueError(f"unknown noise mechanism code {code}")


def max_noisy_steps(code: int, partitions: int, bands: int, max_compositions: int) -> int:
    """The most steps whose :func:`compositions` count is at most ``max_compositions``."""
    _check_accountable(code, int(partitions), bands)
    if code in (INDEPENDENT, BANDED):
        return max_compositions * partitions
    if code == TREE_RESTARTS:
        return (max_compositions // tree_height(partitions)) * partitions
    lo, hi = 0, 1
    while compositions(code, hi, partitions, bands)[0] <= max_compositions:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # compositions grows with the steps
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if compositions(code, mid, partitions, bands)[0] <= max_compositions else (lo, mid)
    return lo
