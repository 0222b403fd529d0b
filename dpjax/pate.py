"""PATE: Private Aggregation of Teacher Ensembles (Papernot et al., ICLR 2017 and 2018).

The private training set is split into ``n`` disjoint shards; one *teacher* is
trained on each shard (all teachers at once, ``jax.vmap`` over stacked
parameters in one jitted ``lax.scan``).  A *student* is trained on public,
unlabelled data whose labels come from a noisy vote of the teachers.  Only the
noisy answers touch the private data, so only they cost privacy.

Neighbouring relation.  Two private data sets are neighbours when they differ
in one example (added, removed or replaced).  That example lives in exactly one
shard, so at most one teacher changes, and on every query the vote histogram
``n_j(x)`` (votes per class) moves by at most one vote from one class to
another: L1 sensitivity 2, L2 sensitivity √2, and ``max_j n_j`` moves by ≤ 1.

Aggregators (``votes`` has shape (queries, classes)):

* :func:`lnmax` -- argmax_j n_j + Lap(1/γ).  Each query is (2γ, 0)-DP.
* :func:`gnmax` -- argmax_j n_j + N(0, σ²).  Each query is a Gaussian
  mechanism with sensitivity √2, i.e. noise multiplier σ/√2:
  RDP(λ) = λ/σ² per query.
* :func:`confident_gnmax` -- answer only if max_j n_j + N(0, σ1²) ≥ T, and then
  with GNMax(σ2); otherwise abstain (label -1).  The check is a Gaussian
  mechanism on max_j n_j (sensitivity 1): RDP(λ) = λ/(2σ1²) per query, paid on
  every query; GNMax is paid only on answered ones.

Privacy analyses (RDP at the orders :data:`ORDERS`, converted to (ε, δ) by
dp_accounting's ``compute_epsilon``, i.e. the improved conversion of Canonne et
al. 2020 / Asoodeh et al. 2020, which is never larger than the classic
ε = min_λ RDP(λ) + log(1/δ)/(λ−1)):

* data-independent: the mechanisms are described as dp_accounting DpEvents
  (:func:`gnmax_dp_event`, :func:`confident_gnmax_dp_event`,
  :func:`lnmax_dp_event`) and composed by dp_accounting's RDP accountant.
* data-dependent (2018 paper, GNMax and Confident-GNMax):  for each answered
  query, Prop. 7 bounds q̃ = Pr[GNMax ≠ argmax] ≤ Σ_{i≠i*} ½ erfc((n_{i*} −
  n_i)/(2σ)) (:func:`log_q_gnmax`); Thm. 6 turns q̃ into an RDP bound at each
  order λ, using the RDP of GNMax at two higher orders μ1 = μ2 + 1 and μ2
  (:func:`rdp_gnmax_from_logq`).  We take the minimum over a fixed grid of μ2
  (:data:`MU_GRID`) and over the data-independent λ/σ², which makes the bound a
  non-decreasing function of q̃ (needed by the smooth sensitivity below).  The
  threshold check of Confident-GNMax is always charged its data-independent
  cost λ/(2σ1²).
* The data-dependent ε depends on the votes, hence on the private data: it is
  not itself private.  :func:`smooth_sensitivity` returns a β-smooth upper
  bound on the local sensitivity of the data-dependent RDP (at one order),
  which is what the smooth-sensitivity framework (Nissim et al. 2007; section
  4.3 of the 2018 paper) needs to publish a noisy version of it.  dpjax does
  not add that noise for you; the data-dependent ε printed by ``dpjax pate``
  is for the user's information, the data-independent ε is the one to release.

Example:

>>> from dpjax import pate
>>> r = pate.run_pate(n_teachers=100, aggregator="gnmax", sigma=15.0,
...                   n_queries=100)                         # doctest: +SKIP
>>> r.student_accuracy, r.epsilon_data_independent          # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Optional

import dp_accounting
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special

from dpjax import models

__all__ = [
    "ORDERS", "MU_GRID", "partition", "stack_shards", "init_teachers", "train_teachers",
    "teacher_votes", "lnmax", "gnmax", "confident_gnmax", "lnmax_dp_event",
    "gnmax_dp_event", "confident_gnmax_dp_event", "rdp_of_event", "epsilon_from_rdp",
    "rdp_gnmax_data_independent", "log_q_gnmax", "rdp_gnmax_from_logq",
    "rdp_gnmax_data_dependent", "ball_log_q_bounds", "local_sensitivity",
    "smooth_sensitivity", "privacy_analysis", "train_student", "PateResult", "run_pate",
    "run",
]

ORDERS = np.concatenate([np.linspace(1.1, 10.9, 99), np.arange(11, 100),
                         np.geomspace(100, 10_000, 41)])
"""RDP orders λ > 1 at which every bound in this module is evaluated."""

MU_GRID = np.geomspace(1.001, 1e5, 400)
"""Grid of the higher order μ2 (with μ1 = μ2 + 1) over which Thm. 6 is minimised."""


# --------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------


def partition(n_examples: int, n_teachers: int, seed: int = 0) -> list:
    """``n_teachers`` disjoint index arrays covering ``range(n_examples)`` exactly once.

    A uniformly random permutation cut into near-equal parts (sizes differ by ≤ 1).
    """
    if not 1 <= n_teachers <= n_examples:
        raise ValueError(f"need 1 <= n_teachers <= n_examples, got n_teachers={n_teachers}, "
                         f"n_examples={n_examples}")
    perm = np.random.default_rng(seed).permutation(n_examples)
    return [np.sort(s) for s in np.array_split(perm, n_teachers)]


def stack_shards(x, y, shards):
    """Shards padded to a common size: ``(X (T, S, ...), Y (T, S), mask (T, S))``."""
    size = max(len(s) for s in shards)
    idx = np.zeros((len(shards), size), np.int64)
    mask = np.zeros((len(shards), size), np.float32)
    for t, s in enumerate(shards):
        idx[t, : len(s)] = s
        mask[t, : len(s)] = 1.0
    return np.asarray(x)[idx], np.asarray(y)[idx], mask


def init_teachers(model: nn.Module, sample_x, n_teachers: int, seed: int = 0):
    """Stacked parameters of ``n_teachers`` independently initialised copies of ``model``."""
    keys = jax.random.split(jax.random.PRNGKey(seed), n_teachers)
    return jax.vmap(lambda k: model.init(k, sample_x)["params"])(keys)


def _fit_fn(model, optimizer, steps, weight_decay):
    """params, x, y, mask -> (params, final loss): ``steps`` full-batch steps (one teacher)."""

    def loss_fn(params, x, y, m):
        logits = model.apply({"params": params}, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        l2 = sum(jnp.sum(p ** 2) for p in jax.tree_util.tree_leaves(params))
        return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0) + 0.5 * weight_decay * l2

    def fit(params, x, y, m):
        def body(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p, x, y, m)
            u, s = optimizer.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (params, _), losses = jax.lax.scan(body, (params, optimizer.init(params)), None,
                                           length=steps)
        return params, losses[-1]

    return fit


def train_teachers(model: nn.Module, x, y, shards, *, steps: int = 200,
                   learning_rate: float = 0.05, weight_decay: float = 1e-3, seed: int = 0,
                   params=None, vectorize: bool = True):
    """Trains one teacher per shard (full-shard batches, adam); returns stacked params.

    ``vectorize=True``: all teachers in one jitted ``vmap``; ``False``: one by
    one with the same jitted per-teacher function (for checking).
    """
    xs, ys, ms = stack_shards(x, y, shards)
    if params is None:
        params = init_teachers(model, xs[0], len(shards), seed)
    fit = _fit_fn(model, optax.adam(learning_rate), steps, weight_decay)
    if vectorize:
        out, _ = jax.jit(jax.vmap(fit))(params, xs, ys, ms)
        return out
    fit1 = jax.jit(fit)
    outs = [fit1(jax.tree_util.tree_map(lambda p: p[t], params), xs[t], ys[t], ms[t])[0]
            for t in range(len(shards))]
    return jax.tree_util.tree_map(lambda *p: jnp.stack(p), *outs)


def teacher_votes(model: nn.Module, params, x, num_classes: int = 10) -> np.ndarray:
    """Vote histogram (queries, classes): how many teachers predict each class."""
    logits = jax.jit(jax.vmap(lambda p: model.apply({"params": p}, x)))(params)
    preds = jnp.argmax(logits, axis=-1)  # (T, Q)
    return np.asarray(jax.nn.one_hot(preds, num_classes, dtype=jnp.int32).sum(0))


# --------------------------------------------------------------------------
# Aggregators
# --------------------------------------------------------------------------


def _check_positive(name, value):
    if not (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def lnmax(votes, gamma: float, key) -> np.ndarray:
    """argmax_j (n_j + Lap(scale 1/γ)) per query; (2γ, 0)-DP per query."""
    gamma = _check_positive("gamma", gamma)
    votes = jnp.asarray(votes, jnp.float32)
    return np.asarray(jnp.argmax(votes + jax.random.laplace(key, votes.shape) / gamma, -1))


def gnmax(votes, sigma: float, key) -> np.ndarray:
    """argmax_j (n_j + N(0, σ²)) per query; RDP λ/σ² per query."""
    sigma = _check_positive("sigma", sigma)
    votes = jnp.asarray(votes, jnp.float32)
    return np.asarray(jnp.argmax(votes + sigma * jax.random.normal(key, votes.shape), -1))


def confident_gnmax(votes, threshold: float, sigma1: float, sigma2: float, key):
    """Confident-GNMax: ``(labels, answered)``; labels are -1 where it abstains.

    Answers a query iff max_j n_j + N(0, σ1²) ≥ threshold, then with GNMax(σ2).
    """
    sigma1 = _check_positive("sigma1", sigma1)
    k1, k2 = jax.random.split(key)
    votes = jnp.asarray(votes, jnp.float32)
    noisy_max = votes.max(-1) + sigma1 * jax.random.normal(k1, votes.shape[:1])
    answered = np.asarray(noisy_max >= threshold)
    labels = gnmax(votes, sigma2, k2)
    return np.where(answered, labels, -1), answered


# --------------------------------------------------------------------------
# Data-independent privacy (dp_accounting)
# --------------------------------------------------------------------------


def lnmax_dp_event(gamma: float, num_queries: int) -> dp_accounting.DpEvent:
    """LNMax: Laplace of scale 1/γ on a histogram of L1 sensitivity 2 -> multiplier 1/(2γ)."""
    gamma = _check_positive("gamma", gamma)
    if num_queries == 0:
        return dp_accounting.NoOpDpEvent()
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.LaplaceDpEvent(1.0 / (2.0 * gamma)), int(num_queries))


def gnmax_dp_event(sigma: float, num_queries: int) -> dp_accounting.DpEvent:
    """GNMax: Gaussian mechanism with L2 sensitivity √2, i.e. GaussianDpEvent(σ/√2)."""
    sigma = _check_positive("sigma", sigma)
    if num_queries == 0:
        return dp_accounting.NoOpDpEvent()
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(sigma / math.sqrt(2.0)), int(num_queries))


def confident_gnmax_dp_event(sigma1: float, sigma2: float, num_queries: int,
                             num_answered: int) -> dp_accounting.DpEvent:
    """Threshold checks (sensitivity 1, GaussianDpEvent(σ1)) on every query, GNMax on answered."""
    sigma1 = _check_positive("sigma1", sigma1)
    if not 0 <= num_answered <= num_queries:
        raise ValueError(f"need 0 <= num_answered <= num_queries, got {num_answered}, "
                         f"{num_queries}")
    events = []
    if num_queries:
        events.append(dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(sigma1), int(num_queries)))
    events.append(gnmax_dp_event(sigma2, num_answered))
    return dp_accounting.ComposedDpEvent(events)


def rdp_of_event(event: dp_accounting.DpEvent, orders=ORDERS) -> np.ndarray:
    """RDP curve of ``event`` at ``orders`` from dp_accounting's RDP accountant."""
    acc = rdp_privacy_accountant.RdpAccountant(orders=list(orders))
    acc.compose(event)
    return acc.rdp


def epsilon_from_rdp(rdp, delta: float, orders=ORDERS) -> tuple:
    """``(ε, λ*)`` from an RDP curve (dp_accounting's ``compute_epsilon``)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    eps, order = rdp_privacy_accountant.compute_epsilon(list(orders), list(np.asarray(rdp)),
                                                        delta)
    return float(eps), float(order)


def rdp_gnmax_data_independent(sigma: float, num_queries: int, orders=ORDERS) -> np.ndarray:
    """λ·T/σ²: T GNMax queries, each a Gaussian mechanism of sensitivity √2."""
    sigma = _check_positive("sigma", sigma)
    return np.asarray(orders, np.float64) * num_queries / sigma ** 2


# --------------------------------------------------------------------------
# Data-dependent privacy (Papernot et al. 2018)
# --------------------------------------------------------------------------


def _log_q_from_gaps(gaps, sigma):
    """log min(1, Σ ½ erfc(g/(2σ))) over the last axis (gaps ≥ 0 of the non-top classes)."""
    # ½ erfc(g / (2σ)) = Φ(−g / (√2 σ))
    terms = special.log_ndtr(-np.asarray(gaps, np.float64) / (math.sqrt(2.0) * sigma))
    return np.minimum(special.logsumexp(terms, axis=-1), 0.0)


def log_q_gnmax(votes, sigma: float) -> np.ndarray:
    """Prop. 7: log of the bound q̃ ≥ Pr[GNMax(σ) ≠ argmax] per query (capped at 1)."""
    sigma = _check_positive("sigma", sigma)
    v = np.atleast_2d(np.asarray(votes, np.float64))
    top = np.argmax(v, -1)
    gaps = v[np.arange(len(v)), top][:, None] - v
    gaps = np.where(np.arange(v.shape[1])[None] == top[:, None], np.inf, gaps)
    return _log_q_from_gaps(gaps, sigma)  # the top class contributes erfc(inf) = 0


def _log1mexp(x):
    """log(1 − e^x) for x < 0."""
    x = np.asarray(x, np.float64)
    return np.where(x < -0.693, np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def rdp_gnmax_from_logq(logq, sigma: float, orders=ORDERS) -> np.ndarray:
    """Thm. 6 data-dependent RDP of one GNMax(σ) query with Pr[≠ i*] ≤ q = e^logq.

    GNMax is (μ, μ/σ²)-RDP at every μ.  For μ2 in :data:`MU_GRID`, μ1 = μ2 + 1,
    ε_i = μ_i/σ², when q < 1, q·e^{ε2} < 1 and q ≤ e^{(μ2−1)ε2} / (μ1/(μ1−1) ·
    μ2/(μ2−1))^{μ2}, the RDP at any order 1 < λ < μ1 is at most
    ``log((1−q)·A^{λ−1} + q·B^{λ−1}) / (λ−1)`` with
    A = (1−q)/(1 − (q e^{ε2})^{(μ2−1)/μ2}) and B = e^{ε1}/q^{1/(μ1−1)}.
    Returns the minimum over the grid and over the data-independent λ/σ²
    (shape: ``logq.shape + orders.shape``).  For a fixed μ2 the bound is
    non-decreasing in q on the range where it applies (the third condition), so
    the result is a non-decreasing function of q.
    """
    sigma = _check_positive("sigma", sigma)
    orders = np.asarray(orders, np.float64)
    logq = np.asarray(logq, np.float64)
    lq = logq[..., None, None]  # (..., mu, order)
    mu2 = MU_GRID[:, None]
    mu1 = mu2 + 1.0
    e1, e2 = mu1 / sigma ** 2, mu2 / sigma ** 2
    lam = orders[None, :]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        valid = ((lq < 0) & (lq + e2 < 0)
                 & (lq <= (mu2 - 1) * e2 - mu2 * (np.log(mu1 / (mu1 - 1))
                                                    + np.log(mu2 / (mu2 - 1))))
                 & (lam < mu1))
        lqs = np.where(valid, lq, -1.0)  # keep the math finite where not valid
        log1q = _log1mexp(lqs)
        log_a = log1q - _log1mexp((lqs + e2) * (mu2 - 1) / mu2)
        log_b = e1 - lqs / (mu1 - 1)
        log_s = np.logaddexp(log1q + (lam - 1) * log_a, lqs + (lam - 1) * log_b)
        bound = np.where(valid, log_s / (lam - 1), np.inf)
        bound = np.where(np.isneginf(lq), 0.0 * lam, bound)  # q = 0: the answer is fixed
    return np.minimum(bound.min(axis=-2), orders / sigma ** 2)


def rdp_gnmax_data_dependent(votes, sigma: float, orders=ORDERS) -> np.ndarray:
    """Per-query data-dependent RDP of GNMax(σ) on ``votes``: shape (queries, orders)."""
    return rdp_gnmax_from_logq(log_q_gnmax(votes, sigma), sigma, orders)


def ball_log_q_bounds(votes_row, sigma: float, distance: int) -> tuple:
    """``(log q_lo, log q_hi)``: bounds on log q̃(n') over all histograms n' that are
    at most ``distance`` teacher changes away from ``votes_row``.

    One teacher change moves one vote, so every gap n_{i*} − n_i shrinks or grows
    by at most 2 per change.  Upper: Σ_{i≠i*} ½ erfc(max(g_i − 2d, 0)/(2σ))
    (also valid if the argmax changes: the new top class's term is ≤ ½ and the
    other gaps are ≥ g_i − 2d).  Lower: ½ erfc((g_min + 2d)/(2σ)), the
    runner-up's term with the smallest gap g_min grown by 2d.
    """
    v = np.asarray(votes_row, np.float64)
    top = int(np.argmax(v))
    gaps = np.delete(v[top] - v, top)
    d = 2.0 * distance
    hi = _log_q_from_gaps(np.maximum(gaps - d, 0.0), sigma)
    lo = min(float(special.log_ndtr(-(gaps.min() + d) / (math.sqrt(2.0) * sigma))), 0.0)
    return lo, float(hi)


def local_sensitivity(votes_row, sigma: float, order: float, distance: int = 0) -> float:
    """Upper bound on the local sensitivity at distance k of the data-dependent RDP.

    LS^(k)(n) = max over n' within k changes of n and n'' a neighbour of n' of
    |RDP(n') − RDP(n'')|.  Both lie within k + 1 changes of n and the RDP is a
    non-decreasing function G of q̃, so LS^(k) ≤ G(q_hi) − G(q_lo) with the bounds of
    :func:`ball_log_q_bounds` at distance k + 1.
    """
    lo, hi = ball_log_q_bounds(votes_row, sigma, distance + 1)
    g = rdp_gnmax_from_logq(np.array([lo, hi]), sigma, np.array([float(order)]))[:, 0]
    return float(max(g[1] - g[0], 0.0))


def smooth_sensitivity(votes, sigma: float, order: float, beta: float,
                       max_distance: Optional[int] = None) -> float:
    """β-smooth sensitivity of the total data-dependent RDP (at ``order``) of GNMax
    answers on ``votes`` (queries, classes): max_k e^{−βk} Σ_queries LS^(k).

    One changed example changes one teacher, i.e. every query's histogram by at
    most one change, so the local sensitivities of the queries add.  Each
    LS^(k) bound comes from balls around the histograms, so bound(k, n) ≤
    bound(k + 1, n') for neighbours n', which makes the result β-smooth
    (Nissim, Raskhodnikova, Smith 2007).  Beyond ``max_distance`` (default: the
    number of teachers, where every bound is saturated) the tail is bounded by
    e^{−β(K+1)}·queries·λ/σ².
    """
    beta = _check_positive("beta", beta)
    v = np.atleast_2d(np.asarray(votes))
    k_max = int(v[0].sum()) if max_distance is None else int(max_distance)
    best = 0.0
    for k in range(k_max + 1):
        total = sum(local_sensitivity(row, sigma, order, k) for row in v)
        best = max(best, math.exp(-beta * k) * total)
    tail = math.exp(-beta * (k_max + 1)) * len(v) * order / sigma ** 2
    return max(best, tail)


def rdp_smooth_sensitivity_gaussian(beta: float, sigma_ss: float, order: float) -> float:
    """RDP at ``order`` of releasing f(D) + SS_β(D)·N(0, σ_ss²) (the "GNSS" mechanism,
    Papernot et al. 2018, Theorem 23): λ·e^{2β}/σ_ss² + (−½·log(1 − 2λβ) + βλ)/(λ − 1),
    valid for 1 < λ < 1/(2β)."""
    beta = _check_positive("beta", beta)
    sigma_ss = _check_positive("sigma_ss", sigma_ss)
    if not 1 < order < 1 / (2 * beta):
        raise ValueError(f"order must be in (1, 1/(2*beta)) = (1, {1 / (2 * beta):g}), got {order}")
    return order * math.exp(2 * beta) / sigma_ss ** 2 + (
        -0.5 * math.log(1 - 2 * order * beta) + beta * order) / (order - 1)


def release_data_dependent_epsilon(votes, *, sigma: float, delta: float, order: float, key,
                                   answered=None, sigma1: Optional[float] = None,
                                   beta: Optional[float] = None, sigma_ss: float = 10.0) -> dict:
    """A privately released data-dependent ε for GNMax / Confident-GNMax answers.

    The data-dependent RDP f(D) at ``order`` depends on the private votes, so it is
    published as f(D) + SS_β(D)·N(0, σ_ss²) with the β-smooth sensitivity of
    :func:`smooth_sensitivity` (β defaults to 0.4/λ), which itself costs
    :func:`rdp_smooth_sensitivity_gaussian` at the same order. The returned
    ``epsilon`` is the noisy RDP plus that cost (plus the data-independent cost of
    Confident-GNMax's threshold checks) converted at ``order``:
    ε = RDP + log(1/δ)/(λ − 1). Like the paper's, this is a sanitised estimate of
    the data-dependent ε, not a worst-case bound; the worst-case figure is the
    data-independent ε of :func:`privacy_analysis`.
    """
    votes = np.atleast_2d(np.asarray(votes))
    answered = np.ones(len(votes), bool) if answered is None else np.asarray(answered, bool)
    beta = 0.4 / order if beta is None else beta
    rows = votes[answered]
    f = float(rdp_gnmax_data_dependent(rows, sigma, np.array([float(order)])).sum(0)[0])
    ss = smooth_sensitivity(rows, sigma, order, beta)
    noise = float(jax.random.normal(key, ())) * ss * sigma_ss
    threshold_cost = 0.0 if sigma1 is None else len(votes) * order / (2 * sigma1 ** 2)
    released = f + noise
    cost_ss = rdp_smooth_sensitivity_gaussian(beta, sigma_ss, order)
    eps = max(released, 0.0) + threshold_cost + cost_ss + math.log(1 / delta) / (order - 1)
    return {"epsilon": eps, "released_rdp": released, "smooth_sensitivity": ss, "beta": beta,
            "order": order, "release_cost_rdp": cost_ss}


def privacy_analysis(votes, *, aggregator: str, delta: float, sigma: float = None,
                     sigma1: float = None, gamma: float = None, answered=None,
                     orders=ORDERS) -> dict:
    """ε of the answered queries: data-independent (dp_accounting) and, for
    GNMax / Confident-GNMax, data-dependent (never above the data-independent)."""
    votes = np.atleast_2d(np.asarray(votes))
    q = len(votes)
    answered = np.ones(q, bool) if answered is None else np.asarray(answered, bool)
    if aggregator == "lnmax":
        event = lnmax_dp_event(gamma, q)
    elif aggregator == "gnmax":
        event = gnmax_dp_event(sigma, q)
    elif aggregator == "confident":
        event = confident_gnmax_dp_event(sigma1, sigma, q, int(answered.sum()))
    else:
        raise ValueError(f"aggregator must be lnmax, gnmax or confident, got {aggregator!r}")
    rdp_ind = rdp_of_event(event, orders)
    eps_ind, order_ind = epsilon_from_rdp(rdp_ind, delta, orders)
    out = {"epsilon_data_independent": eps_ind, "order_data_independent": order_ind,
           "epsilon_data_dependent": None, "order_data_dependent": None,
           "answered": int(answered.sum()), "queries": q}
    if aggregator != "lnmax":
        rdp_dep = rdp_gnmax_data_dependent(votes[answered], sigma, orders).sum(0)
        if aggregator == "confident":
            rdp_dep = rdp_dep + q * np.asarray(orders) / (2 * sigma1 ** 2)
        rdp_dep = np.minimum(rdp_dep, rdp_ind)
        out["epsilon_data_dependent"], out["order_data_dependent"] = epsilon_from_rdp(
            rdp_dep, delta, orders)
    return out


# --------------------------------------------------------------------------
# Student and end to end
# --------------------------------------------------------------------------


def train_student(model: nn.Module, x_public, labels, x_test, y_test, *, steps: int = 300,
                  learning_rate: float = 0.02, weight_decay: float = 1e-3,
                  unlabelled_weight: float = 0.0, seed: int = 0):
    """Trains ``model`` on the public points with ``labels`` (−1 = abstained).

    Abstained points are dropped, or with ``unlabelled_weight > 0`` used through an
    entropy-minimisation term (costs no privacy: no teacher label is used).
    Returns ``(params, test accuracy)``.
    """
    labels = np.asarray(labels)
    m = (labels >= 0).astype(np.float32)
    u = 1.0 - m
    y = np.maximum(labels, 0)
    params = model.init(jax.random.PRNGKey(seed), x_public[:1])["params"]
    opt = optax.adam(learning_rate)

    def loss_fn(p):
        logits = model.apply({"params": p}, x_public)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        logp = jax.nn.log_softmax(logits)
        ent = -jnp.sum(jnp.exp(logp) * logp, -1)
        l2 = sum(jnp.sum(w ** 2) for w in jax.tree_util.tree_leaves(p))
        return (jnp.sum(ce * m) / jnp.maximum(m.sum(), 1.0)
                + unlabelled_weight * jnp.sum(ent * u) / jnp.maximum(u.sum(), 1.0)
                + 0.5 * weight_decay * l2)

    @jax.jit
    def fit(p):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss_fn)(p)
            upd, s = opt.update(g, s, p)
            return (optax.apply_updates(p, upd), s), None
        return jax.lax.scan(body, (p, opt.init(p)), None, length=steps)[0][0]

    params = fit(params)
    acc = float(np.mean(np.asarray(jnp.argmax(model.apply({"params": params}, x_test), -1))
                        == np.asarray(y_test)))
    return params, acc


@dataclasses.dataclass
class PateResult:
    """What :func:`run_pate` measured."""

    n_teachers: int
    aggregator: str
    teacher_accuracy_mean: float  # single teachers on the test split
    ensemble_accuracy: float  # noiseless plurality vote on the test split
    label_accuracy: float  # aggregator's answers on the public set (answered ones)
    student_accuracy: float
    queries: int
    answered: int
    delta: float
    epsilon_data_independent: float
    epsilon_data_dependent: Optional[float]
    epsilon_data_dependent_released: Optional[float] = None  # smooth-sensitivity release


def default_teacher_model() -> nn.Module:
    return models.MLP(hidden=32, standardize=True)


def run_pate(data=None, *, n_teachers: int = 100, aggregator: str = "confident",
             sigma: float = 10.0, threshold: float = 60.0, sigma1: float = 30.0,
             gamma: float = 0.05, n_queries: int = 200, delta: float = 1e-5,
             teacher_steps: int = 200, student_steps: int = 300, unlabelled_weight: float = 0.0,
             teacher_model: Optional[nn.Module] = None, student_model: Optional[nn.Module] = None,
             seed: int = 0) -> PateResult:
    """Teachers on ``x_train``; the first ``n_queries`` test points are the public
    (unlabelled) set labelled by the aggregator; the rest of the test split
    evaluates the student.  ``data`` defaults to ``datasets.load_digits()``."""
    from dpjax import datasets

    data = datasets.load_digits() if data is None else data
    x, y = np.asarray(data["x_train"]), np.asarray(data["y_train"])
    xt, yt = np.asarray(data["x_test"]), np.asarray(data["y_test"])
    if not 1 <= n_queries < len(xt):
        raise ValueError(f"n_queries must be in [1, {len(xt) - 1}] (the test split has "
                         f"{len(xt)} points, the rest evaluates the student), got {n_queries}")
    classes = int(max(y.max(), yt.max())) + 1
    x_pub, y_pub, x_eval, y_eval = xt[:n_queries], yt[:n_queries], xt[n_queries:], yt[n_queries:]
    tmodel = teacher_model or default_teacher_model()
    smodel = student_model or default_teacher_model()
    shards = partition(len(x), n_teachers, seed)
    params = train_teachers(tmodel, x, y, shards, steps=teacher_steps, seed=seed)
    logits = jax.jit(jax.vmap(lambda p: tmodel.apply({"params": p}, x_eval)))(params)
    teacher_acc = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y_eval[None]))
    ev = teacher_votes(tmodel, params, x_eval, classes)
    ensemble_acc = float(np.mean(ev.argmax(-1) == y_eval))
    votes = teacher_votes(tmodel, params, x_pub, classes)
    key = jax.random.PRNGKey(seed + 1)
    answered = None
    if aggregator == "lnmax":
        labels = lnmax(votes, gamma, key)
    elif aggregator == "gnmax":
        labels = gnmax(votes, sigma, key)
    elif aggregator == "confident":
        labels, answered = confident_gnmax(votes, threshold, sigma1, sigma, key)
    else:
        raise ValueError(f"aggregator must be lnmax, gnmax or confident, got {aggregator!r}")
    priv = privacy_analysis(votes, aggregator=aggregator, delta=delta, sigma=sigma,
                            sigma1=sigma1, gamma=gamma, answered=answered)
    ok = labels >= 0
    label_acc = float(np.mean(labels[ok] == y_pub[ok])) if ok.any() else float("nan")
    _, student_acc = train_student(smodel, x_pub, labels, x_eval, y_eval, steps=student_steps,
                                   unlabelled_weight=unlabelled_weight, seed=seed)
    released = None
    if aggregator != "lnmax":
        order = float(priv["order_data_dependent"])
        if order > 1.0:
            released = release_data_dependent_epsilon(
                votes, sigma=sigma, delta=delta, order=order, key=jax.random.PRNGKey(seed + 2),
                answered=answered, sigma1=sigma1 if aggregator == "confident" else None)["epsilon"]
    return PateResult(n_teachers, aggregator, teacher_acc, ensemble_acc, label_acc, student_acc,
                      priv["queries"], priv["answered"], delta,
                      priv["epsilon_data_independent"], priv["epsilon_data_dependent"], released)


# --------------------------------------------------------------------------
# CLI: dpjax pate
# --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    r = run_pate(n_teachers=args.teachers, aggregator=args.aggregator, sigma=args.sigma,
                 threshold=args.threshold, sigma1=args.sigma1, gamma=args.gamma,
                 n_queries=args.queries, delta=args.delta,
                 unlabelled_weight=0.5 if args.use_abstained else 0.0, seed=args.seed)
    print(f"teachers = {r.n_teachers} (mean single-teacher accuracy {r.teacher_accuracy_mean:.3f})")
    print(f"teacher ensemble accuracy = {r.ensemble_accuracy:.3f} (noiseless plurality vote)")
    print(f"answered queries = {r.answered} / {r.queries} ({r.aggregator}; "
          f"label accuracy {r.label_accuracy:.3f})")
    print(f"student accuracy = {r.student_accuracy:.3f}")
    print(f"epsilon (data-independent) = {r.epsilon_data_independent:.4g} (delta = {r.delta:g})")
    if r.epsilon_data_dependent is not None:
        print(f"epsilon (data-dependent) = {r.epsilon_data_dependent:.4g} (delta = {r.delta:g}; "
              "depends on the private votes: for information, not itself private)")
    if r.epsilon_data_dependent_released is not None:
        print(f"epsilon (data-dependent, released with smooth sensitivity) = "
              f"{r.epsilon_data_dependent_released:.4g} (a sanitised estimate; the worst case is the "
              "data-independent epsilon)")
    return 0
