"""Empirical privacy auditing: lower bounds on ε to check the accounted upper bound.

The accountant (:mod:`dpjax.accounting`) gives an *upper* bound on ε that holds
only if the code does what the analysis assumes: every contribution clipped to
C, fresh N(0, σ²C²) noise once per step, noise not scaled away, Poisson
sampling. An audit runs the real training code and measures how well an
attacker can tell whether planted *canaries* were in the training set; that
gives a statistically valid *lower* bound on ε. A lower bound above the
accounted ε means a bug (or a wrong analysis).

What is here:

* **Gradient-space canaries** (white-box, the strongest audit of DP-SGD):
  ``m`` random unit directions ``u_j`` in parameter space. Each canary is
  included in the data set with probability ½; an included canary joins each
  step's Poisson batch with probability ``q``, like any example, and its
  per-example gradient (norm ``canary_norm >= C``) is clipped to ``C`` exactly
  as :func:`dpjax.clipped_grad` clips, so it contributes ``C·u_j``. A canary
  is a data row whose loss is linear in the parameters, so its gradient goes
  through the real ``clipped_grad`` → ``PoissonSampler`` → ``privatize``
  pipeline, in any of the supported loop forms (:data:`LOOP_FORMS`).
* **Input-space canaries** (black-box): mislabelled digits examples
  (:func:`input_canaries`), scored by their loss on the wrong label.
* **One-run auditing** (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy
  Auditing with One (1) Training Run"): :func:`one_run_epsilon_lower_bound`.
* **Multi-run auditing** with Clopper–Pearson intervals:
  :func:`multi_run_epsilon_lower_bound`.
* **Membership inference** on a trained model: loss-threshold attack
  (:func:`membership_inference`: ROC, AUC, TPR at FPR 0.1 % and 1 %) and a
  label-only attack (:func:`label_only_scores`).
* :func:`run` and ``dpjax audit``: the digits demo.

Example::

    from dpjax import audit
    res = audit.audit_dpsgd(noise_multiplier=3.0, steps=10, sampling_rate=0.5, seed=0)
    print(res.epsilon_lower, "<=", res.epsilon_accounted)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from scipy import stats

from dpjax import accounting, correlated_noise, validation
from dpjax.clipping import ClippedGradient, clipped_grad
from dpjax import ledger as ledger_lib
from dpjax.noise import privatize
from dpjax.sampling import CyclicPoissonSampler, PoissonSampler

PyTree = Any

__all__ = [
    "one_run_p_value",
    "one_run_epsilon_lower_bound",
    "one_run_audit",
    "OneRunResult",
    "clopper_pearson",
    "multi_run_epsilon_lower_bound",
    "roc_curve",
    "membership_inference",
    "MembershipResult",
    "label_only_scores",
    "canary_directions",
    "input_canaries",
    "LOOP_FORMS",
    "audit_dpsgd",
    "audit_input_canaries",
    "AuditResult",
    "train_classifier",
    "plot_scores",
    "run",
    "run_cli",
]


# --------------------------------------------------------------------------
# Statistics: one-run bound (Steinke, Nasr & Jagielski 2023)
# --------------------------------------------------------------------------


def one_run_p_value(num_canaries: int, num_guesses: int, num_correct: int,
                    epsilon: float, delta: float) -> float:
    """Upper bound on P[W >= v] for an (ε, δ)-DP algorithm (their Algorithm 2).

    ``m`` canaries are each included independently with probability ½, the
    auditor makes ``r`` guesses (abstaining on the others) and ``W`` of them
    are right. For (ε, δ)-DP, with ``p = e^ε / (1 + e^ε)`` and
    ``T ~ Binomial(r, p)`` (Steinke, Nasr & Jagielski 2023, Theorem 5.2 /
    Algorithm 2)::

        P[W >= v] <= P[T >= v] + 2 m δ · max_{1<=i<=v} (1/i) · P[v - i <= T < v]

    This returns the right-hand side, capped at 1.
    """
    m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
    if v <= 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    beta = float(stats.binom.sf(v - 1, r, p))  # P[T >= v]
    alpha, acc = 0.0, 0.0
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[T = v-1], P[T = v-2], ...
    for i in range(1, v + 1):
        acc += float(pmf[i - 1])
        alpha = max(alpha, acc / i)
    return min(1.0, beta + alpha * delta * 2 * m)


def one_run_epsilon_lower_bound(num_canaries: int, num_guesses: int, num_correct: int, *,
                                delta: float, confidence: float = 0.95,
                                max_epsilon: float = 50.0, tol: float = 1e-4) -> float:
    """ε lower bound at ``confidence`` from one run: the largest ε whose
    :func:`one_run_p_value` is still ``<= 1 - confidence`` (binary search).

    Any (ε', δ)-DP algorithm with ε' below the result would produce at least
    ``num_correct`` right guesses with probability at most ``1 - confidence``.

    >>> round(one_run_epsilon_lower_bound(1000, 200, 200, delta=1e-5), 2)
    4.17
    >>> one_run_epsilon_lower_bound(1000, 200, 100, delta=1e-5)
    0.0
    """
    beta = 1.0 - validation.check_rate("confidence", confidence)
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    if not 0 <= num_correct <= num_guesses <= 2 * num_canaries:
        raise ValueError("need 0 <= num_correct <= num_guesses and num_guesses <= 2 * num_canaries")

    def rejected(eps):  # the observation is too unlikely under eps-DP
        return one_run_p_value(num_canaries, num_guesses, num_correct, eps, delta) <= beta

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, max_epsilon
    if rejected(hi):
        return hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


@dataclasses.dataclass(frozen=True)
class OneRunResult:
    """A one-run audit: guesses, right guesses and the ε lower bound."""

    epsilon_lower: float
    num_guesses: int
    num_correct: int
    num_canaries: int
    confidence: float
    score: str = "sum"


def one_run_audit(scores, included, *, delta: float, confidence: float = 0.95,
                  num_guesses: Optional[int] = None, score: str = "sum") -> OneRunResult:
    """Guess "included" for the ``num_guesses/2`` highest scores and "excluded"
    for the ``num_guesses/2`` lowest, abstain on the rest, and convert the count
    of right guesses into an ε lower bound (:func:`one_run_epsilon_lower_bound`).

    ``num_guesses`` must be fixed before looking at the scores (default: a
    fifth of the canaries); choosing it afterwards invalidates the confidence.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError("scores and included must be 1-D arrays of the same length")
    m = scores.shape[0]
    r = max(2, m // 5) if num_guesses is None else int(num_guesses)
    k = min(r // 2, m // 2)
    order = np.argsort(scores, kind="stable")
    correct = int(included[order[m - k:]].sum() + (~included[order[:k]]).sum())
    eps = one_run_epsilon_lower_bound(m, 2 * k, correct, delta=delta, confidence=confidence)
    return OneRunResult(eps, 2 * k, correct, m, confidence, score)


# --------------------------------------------------------------------------
# Statistics: multi-run bound (Clopper–Pearson)
# --------------------------------------------------------------------------


def clopper_pearson(successes: int, trials: int, alpha: float = 0.05):
    """Two-sided ``1 - alpha`` Clopper–Pearson interval for a binomial rate."""
    k, n = int(successes), int(trials)
    if not 0 <= k <= n or n <= 0:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {k}, {n}")
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def multi_run_epsilon_lower_bound(false_positives: int, negatives: int,
                                  false_negatives: int, positives: int, *,
                                  delta: float, confidence: float = 0.95) -> float:
    """ε lower bound from a membership test run on many independent trainings.

    With Clopper–Pearson upper bounds ``FPR_hi``, ``FNR_hi`` (one-sided at
    level ``1 - confidence`` each, Bonferroni over the two), any (ε, δ)-DP
    mechanism satisfies ``FPR + e^ε FNR >= 1 - δ`` and the symmetric
    inequality, so ::

        ε >= max(log((1 - δ - FNR_hi) / FPR_hi), log((1 - δ - FPR_hi) / FNR_hi))

    >>> round(multi_run_epsilon_lower_bound(0, 500, 0, 500, delta=1e-5), 2)
    4.91
    """
    beta = 1.0 - validation.check_rate("confidence", confidence)
    # One-sided upper bounds at beta/2 each = two-sided intervals at level beta.
    fpr_hi = clopper_pearson(false_positives, negatives, beta)[1]
    fnr_hi = clopper_pearson(false_negatives, positives, beta)[1]
    best = 0.0
    for a, b in ((fnr_hi, fpr_hi), (fpr_hi, fnr_hi)):
        num = 1.0 - delta - a
        if num > 0 and b > 0:
            best = max(best, math.log(num / b))
    return best


# --------------------------------------------------------------------------
# Membership inference
# --------------------------------------------------------------------------


def roc_curve(member_scores, nonmember_scores):
    """(fpr, tpr) over all thresholds; a higher score means "member"."""
    pos = np.asarray(member_scores, np.float64)
    neg = np.asarray(nonmember_scores, np.float64)
    s = np.concatenate([pos, neg])
    lab = np.concatenate([np.ones_like(pos), np.zeros_like(neg)])
    order = np.argsort(-s, kind="stable")
    s, lab = s[order], lab[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(lab)[distinct]
    fp = np.cumsum(1 - lab)[distinct]
    tpr = np.r_[0.0, tp / max(pos.size, 1)]
    fpr = np.r_[0.0, fp / max(neg.size, 1)]
    return fpr, tpr


@dataclasses.dataclass(frozen=True)
class MembershipResult:
    """Membership-inference attack quality: AUC, TPR at low FPR, ROC curve."""

    auc: float
    tpr_at_fpr: Dict[float, float]
    fpr: np.ndarray
    tpr: np.ndarray


def membership_inference(member_scores, nonmember_scores,
                         fprs: Sequence[float] = (0.001, 0.01)) -> MembershipResult:
    """Threshold attack on a per-example score (higher = member).

    For the loss attack pass ``-loss``. AUC counts ties as ½ (Mann–Whitney).
    TPR at FPR f is the best TPR among thresholds with FPR <= f.
    """
    pos = np.asarray(member_scores, np.float64)
    neg = np.asarray(nonmember_scores, np.float64)
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
    auc = float(u) / (pos.size * neg.size)
    fpr, tpr = roc_curve(pos, neg)
    at = {float(f): float(tpr[fpr <= f + 1e-12].max()) for f in fprs}
    return MembershipResult(auc, at, fpr, tpr)


def label_only_scores(predict: Callable, x, y, *, noise_std: float = 0.1,
                      num_draws: int = 16, seed: int = 0) -> np.ndarray:
    """Label-only membership score: the fraction of ``num_draws`` noisy copies
    of each input (Gaussian, std ``noise_std``) plus the clean input that the
    model still labels correctly. ``predict(x) -> labels``; only predicted
    labels are used. With ``num_draws=0`` this is plain correctness."""
    x = np.asarray(x)
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    hits = (np.asarray(predict(x)) == y).astype(np.float64)
    for _ in range(num_draws):
        noisy = (x + noise_std * rng.standard_normal(x.shape)).astype(x.dtype)
        hits += np.asarray(predict(noisy)) == y
    return hits / (num_draws + 1)


# --------------------------------------------------------------------------
# Canaries
# --------------------------------------------------------------------------


def canary_directions(num_params: int, num_canaries: int, seed: int = 0) -> np.ndarray:
    """``(m, d)`` float32 rows: independent uniformly random unit vectors."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((num_canaries, num_params)).astype(np.float32)
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def input_canaries(x, y, num_canaries: int, *, num_classes: int = 10, seed: int = 0):
    """Black-box canaries: ``num_canaries`` examples of ``x`` with a wrong label
    (uniform over the other classes). Returns ``(x_canary, y_canary)``."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x), size=num_canaries, replace=False)
    shift = rng.integers(1, num_classes, size=num_canaries)
    return np.asarray(x)[idx], ((np.asarray(y)[idx] + shift) % num_classes).astype(np.int32)


# --------------------------------------------------------------------------
# White-box audit of DP-SGD with gradient-space canaries
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Result of :func:`audit_dpsgd` / :func:`audit_input_canaries`."""

    epsilon_lower: float  # the empirical lower bound (best over scores, Bonferroni-corrected)
    epsilon_accounted: float
    delta: float
    confidence: float
    audits: Dict[str, OneRunResult]  # per score
    scores: Dict[str, np.ndarray]  # (m,) per score
    included: np.ndarray
    setting: Dict[str, Any]

    def summary(self) -> str:
        best = max(self.audits.values(), key=lambda a: a.epsilon_lower)
        return (f"empirical epsilon >= {self.epsilon_lower:.3f} at {self.confidence:.0%} confidence "
                f"(score {best.score!r}: {best.num_correct}/{best.num_guesses} right guesses on "
                f"{best.num_canaries} canaries); accounted epsilon = {self.epsilon_accounted:.3f} "
                f"(delta = {self.delta:g})")


def default_optimizer_factory(*, noise_multiplier, l2_clip_norm, sampler, seed, learning_rate,
                              accumulation_steps=1, noise=None):
    """dpjax's DP-SGD: ``privatize(optax.sgd(learning_rate), ..., sampler=sampler, noise=noise)``."""
    return privatize(optax.sgd(learning_rate), noise_multiplier=noise_multiplier,
                     l2_clip_norm=l2_clip_norm, sampler=sampler, seed=seed,
                     accumulation_steps=accumulation_steps, noise=noise)


def _mlp(hidden):
    from dpjax.models import MLP

    return MLP(num_classes=10, hidden=hidden)


def _combine(audits: Dict[str, OneRunResult]) -> float:
    return max(a.epsilon_lower for a in audits.values())


# The loop forms the audit can run, each exactly as the README writes it.
LOOP_FORMS = ("plain", "accumulation", "microbatch", "nnx")
_ACCUMULATION_STEPS = 4
_MICROBATCH_SIZE = 128


@dataclasses.dataclass(frozen=True)
class _AuditedLoop:
    """What one run of the audited training loop needs."""

    form: str
    data: Dict[str, np.ndarray]  # real rows, then one row per included canary
    directions: jax.Array  # (m, d) canary directions
    canary_norm: float
    l2_clip_norm: float
    noise_multiplier: float
    learning_rate: float
    method: str
    seed: int


def _canary_population(x, y, included: np.ndarray) -> Dict[str, np.ndarray]:
    """The audited data set: the real rows and a row for every included canary.

    A canary row ``j`` holds ``canary = j`` (real rows: ``-1``); its loss is
    linear in the parameters (see :func:`_with_canaries`), so its gradient is
    ``canary_norm · u_j``, whatever the model.
    """
    ids = np.flatnonzero(included).astype(np.int32)
    zeros_x = np.zeros((len(ids),) + np.shape(x)[1:], np.float32)
    return {"x": np.concatenate([np.asarray(x, np.float32), zeros_x]),
            "y": np.concatenate([np.asarray(y, np.int32), np.zeros(len(ids), np.int32)]),
            "canary": np.concatenate([np.full(len(x), -1, np.int32), ids])}


def _with_canaries(logits_of, flat_params_of, canary_norm: float):
    """The per-example loss: cross-entropy for real rows, ``canary_norm·⟨u_j, θ⟩`` for canary j."""

    def loss_fn(params, batch, directions):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits_of(params, batch["x"]), batch["y"])
        is_canary = batch["canary"] >= 0
        u = directions[jnp.maximum(batch["canary"], 0)]
        linear = canary_norm * (u @ flat_params_of(params))
        return jnp.mean(jnp.where(is_canary, linear, ce))

    return loss_fn


def _linen_updates(loop: _AuditedLoop, sampler, params0, model, optimizer_factory, clip_factory):
    """Noisy updates of the plain, accumulation or microbatch loop (flat, one per noisy step)."""
    loss_fn = _with_canaries(model.apply, lambda p: ravel_pytree(p)[0], loop.canary_norm)
    microbatch = _MICROBATCH_SIZE if loop.form == "microbatch" else None
    grad_fn = clip_factory(loss_fn, l2_clip_norm=loop.l2_clip_norm, method=loop.method,
                           microbatch_size=microbatch)
    k = _ACCUMULATION_STEPS if loop.form == "accumulation" else 1
    tx = optimizer_factory(noise_multiplier=loop.noise_multiplier, l2_clip_norm=loop.l2_clip_norm,
                           sampler=sampler, seed=loop.seed + 20_000, learning_rate=loop.learning_rate,
                           **({"accumulation_steps": k} if k > 1 else {}))

    @jax.jit
    def step(params, state, batch, directions):
        updates, state = tx.update(grad_fn(params, batch, directions), state, params)
        return optax.apply_updates(params, updates), state, ravel_pytree(updates)[0]

    params, state = params0, tx.init(params0)

    def one_step():
        nonlocal params, state
        parts = [sampler.sample()] if k == 1 else sampler.sample_micro_batches(k)
        total = 0.0
        for part in parts:  # zero updates until the last micro-batch of the draw
            params, state, flat = step(params, state, part.take(loop.data), loop.directions)
            total = total + flat
        return total

    return one_step, lambda: state


def _nnx_updates(loop: _AuditedLoop, sampler, hidden: int, optimizer_factory, clip_factory):
    """Noisy updates of the NNX loop (``dpjax.nnx.Optimizer`` under ``nnx.jit``)."""
    from flax import nnx

    from dpjax.models import NnxMLP
    from dpjax.nnx import Optimizer

    in_features = int(np.prod(loop.data["x"].shape[1:]))
    model = NnxMLP(in_features, 10, hidden, rngs=nnx.Rngs(loop.seed))

    def flat_params(m):
        return ravel_pytree(nnx.as_pure(nnx.state(m, nnx.Param)))[0]

    loss_fn = _with_canaries(lambda m, x: m(x), flat_params, loop.canary_norm)
    grad_fn = clip_factory(loss_fn, l2_clip_norm=loop.l2_clip_norm, method=loop.method, microbatch_size=None)
    tx = optimizer_factory(noise_multiplier=loop.noise_multiplier, l2_clip_norm=loop.l2_clip_norm,
                           sampler=sampler, seed=loop.seed + 20_000, learning_rate=loop.learning_rate)
    optimizer = Optimizer(model, tx)

    @nnx.jit
    def step(model, optimizer, batch, directions):
        updates = optimizer.update(model, grad_fn(model, batch, directions))
        return ravel_pytree(updates)[0]

    def one_step():
        return step(model, optimizer, sampler.sample().take(loop.data), loop.directions)

    return one_step, lambda: optimizer, int(flat_params(model).shape[0])


def _check_ledger(state, steps: int) -> None:
    """The ledger (if the optimizer has one: a planted one may not) counted every noisy step
    and refused none."""
    try:
        ledger = ledger_lib.find_ledger(state)
    except ValueError:
        return
    ledger_lib.check_budget(state)
    if int(ledger.steps) != steps:
        raise RuntimeError(f"the ledger counted {int(ledger.steps)} of {steps} noisy steps")


def audit_dpsgd(*, noise_multiplier: float = 3.0, steps: int = 10, sampling_rate: float = 0.5,
                num_canaries: int = 2000, num_real: int = 16, l2_clip_norm: float = 1.0,
                canary_norm: Optional[float] = None, learning_rate: float = 0.5,
                hidden: int = 128, delta: float = 1e-5, confidence: float = 0.95,
                num_guesses: Optional[int] = None, score: str = "auto", seed: int = 0,
                accountant: str = "pld", loop: str = "plain", method: str = "vmap",
                optimizer_factory: Callable = default_optimizer_factory,
                clip_factory: Callable = clipped_grad, noise=None, partitions: int = 1) -> AuditResult:
    """One-run white-box audit of dpjax's DP-SGD with gradient-space canaries.

    Trains an MLP (``hidden`` units) on ``num_real`` digits examples plus the
    included canaries with the real public API, in the loop form ``loop``:

    * ``"plain"``: ``clipped_grad`` + ``privatize(sampler=...)`` under ``jax.jit``;
    * ``"accumulation"``: ``privatize(accumulation_steps=4)`` fed the four parts
      of ``sampler.sample_micro_batches(4)``;
    * ``"microbatch"``: ``clipped_grad(microbatch_size=128)``;
    * ``"nnx"``: an NNX MLP, ``dpjax.nnx.Optimizer`` under ``nnx.jit``.

    Each of the ``num_canaries`` canaries is included in the data set with
    probability ½, as a row whose loss is ``canary_norm·⟨u_j, θ⟩``: its
    per-example gradient ``canary_norm·u_j`` goes through the same
    ``clipped_grad`` as the real rows and contributes ``C·u_j`` when sampled.
    Every row, canary or real, is Poisson-sampled at ``sampling_rate`` by a
    :class:`dpjax.PoissonSampler` and taken with ``batch.take`` (so
    ``privatize`` checks its provenance). The auditor sees every noisy update
    ``Δ_t`` and scores canary ``j`` by

    * ``"sum"``: ``-⟨u_j, Σ_t Δ_t⟩`` (SGD moves against the gradient);
    * ``"variance"``: the variance over steps of ``⟨u_j, Δ_t⟩`` (catches noise
      that does not change between steps);
    * ``"auto"`` (default): both, each at confidence ``1 - (1-confidence)/2``
      (Bonferroni), reporting the larger bound.

    ``optimizer_factory`` (keyword arguments ``noise_multiplier``,
    ``l2_clip_norm``, ``sampler``, ``seed``, ``learning_rate`` and, for the
    accumulation loop, ``accumulation_steps``) and ``clip_factory`` (called
    like :func:`dpjax.clipped_grad`) exist so tests can plant bugs; the
    accounted ε is always that of the *claimed* mechanism.
    """
    validation.check_choice("score", score, {"sum", "variance", "auto"})
    validation.check_choice("loop", loop, set(LOOP_FORMS))
    steps = validation.check_positive_int("steps", steps)
    m = validation.check_positive_int("num_canaries", num_canaries)
    canary_norm = 10.0 * l2_clip_norm if canary_norm is None else float(canary_norm)
    if canary_norm < l2_clip_norm:
        raise ValueError("canary_norm must be >= l2_clip_norm so each canary contributes exactly C")
    partitions = validation.check_positive_int("partitions", partitions)
    code, bands = correlated_noise.code_and_bands(noise)
    count, sampled = correlated_noise.compositions(code, steps, partitions, bands)
    eps_acc = accounting.epsilon(noise_multiplier=noise_multiplier, steps=count, delta=delta,
                                 sampling_rate=sampling_rate if sampled else 1.0, accountant=accountant)
    if noise is not None:
        optimizer_factory = functools.partial(optimizer_factory, noise=noise)
    from dpjax.datasets import load_digits

    data = load_digits(seed=0)
    x, y = data["x_train"][:num_real], data["y_train"][:num_real]
    included = np.random.default_rng([seed, 1]).random(m) < 0.5
    population = _canary_population(x, y, included)
    if noise is None and partitions == 1:
        sampler = PoissonSampler(len(population["y"]), sampling_rate=sampling_rate, seed=seed + 30_000,
                                 bucket_sizes=(len(population["y"]),))
    else:
        sampler = CyclicPoissonSampler(len(population["y"]), partitions=partitions, sampling_rate=sampling_rate,
                                       seed=seed + 30_000)
    model = _mlp(hidden)
    params = model.init(jax.random.PRNGKey(seed), jnp.asarray(x[:1]))
    d = int(ravel_pytree(params)[0].shape[0])
    settings = _AuditedLoop(loop, population, jnp.asarray(canary_directions(d, m, seed=seed + 10_000)),
                            canary_norm, l2_clip_norm, noise_multiplier, learning_rate, method, seed)
    if loop == "nnx":
        one_step, final_state, d_nnx = _nnx_updates(settings, sampler, hidden, optimizer_factory, clip_factory)
        assert d_nnx == d, (d_nnx, d)  # the same MLP, so the same directions fit
    else:
        one_step, final_state = _linen_updates(settings, sampler, params, model, optimizer_factory, clip_factory)
    proj = np.stack([np.asarray(settings.directions @ one_step()) for _ in range(steps)])  # (steps, m)
    _check_ledger(final_state(), steps)
    scores = {"sum": -proj.sum(axis=0), "variance": proj.var(axis=0)}
    names = ["sum", "variance"] if score == "auto" else [score]
    conf = 1.0 - (1.0 - confidence) / len(names)
    audits = {n: dataclasses.replace(
        one_run_audit(scores[n], included, delta=delta, confidence=conf, num_guesses=num_guesses),
        score=n) for n in names}
    setting = dict(noise_multiplier=noise_multiplier, steps=steps, sampling_rate=sampling_rate,
                   num_canaries=m, num_real=num_real, l2_clip_norm=l2_clip_norm,
                   canary_norm=canary_norm, num_params=d, accountant=accountant, seed=seed,
                   loop=loop, method=method, noise=repr(noise), partitions=partitions)
    return AuditResult(_combine(audits), eps_acc, delta, confidence, audits,
                       {n: scores[n] for n in names}, included, setting)


# --------------------------------------------------------------------------
# Training a classifier (for membership inference and black-box audits)
# --------------------------------------------------------------------------


def train_classifier(x, y, *, steps: int, noise_multiplier: Optional[float] = None,
                     l2_clip_norm: float = 1.0, sampling_rate: float = 1.0,
                     learning_rate: float = 0.1, hidden: int = 64, seed: int = 0):
    """Train an MLP on ``(x, y)``; returns ``(predict_logits, params)``.

    ``noise_multiplier=None``: non-private full-batch Adam (``learning_rate``).
    Otherwise dpjax's DP-SGD: Poisson sampling at ``sampling_rate``,
    :func:`dpjax.clipped_grad` and :func:`dpjax.privatize` around SGD.
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    model = _mlp(hidden)
    params = model.init(jax.random.PRNGKey(seed), x[:1])

    def loss_fn(p, batch):
        logits = model.apply(p, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    data = {"x": x, "y": y}
    if noise_multiplier is None:
        tx = optax.adam(learning_rate)
        state = tx.init(params)

        @jax.jit
        def step(p, s):
            grads = jax.grad(loss_fn)(p, data)
            u, s = tx.update(grads, s, p)
            return optax.apply_updates(p, u), s

        for _ in range(steps):
            params, state = step(params, state)
    else:
        n = x.shape[0]
        sampler = PoissonSampler(n, sampling_rate=sampling_rate, seed=seed + 2, bucket_sizes=(n,))
        tx = privatize(optax.sgd(learning_rate), noise_multiplier=noise_multiplier,
                       l2_clip_norm=l2_clip_norm, sampler=sampler, seed=seed + 1)
        state = tx.init(params)
        grad_fn = clipped_grad(loss_fn, l2_clip_norm=l2_clip_norm, method="vmap")

        @jax.jit
        def step(p, s, batch):
            u, s = tx.update(grad_fn(p, batch), s, p)
            return optax.apply_updates(p, u), s

        for _ in range(steps):
            params, state = step(params, state, sampler.sample().take(data))

    apply = jax.jit(model.apply)
    return (lambda inputs: apply(params, jnp.asarray(inputs))), params


def per_example_loss(logits_fn: Callable, x, y) -> np.ndarray:
    """Cross-entropy of every example."""
    logits = logits_fn(x)
    return np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)))


def membership_audit(*, num_members: int = 200, steps: int = 300,
                     noise_multiplier: Optional[float] = None, seed: int = 0,
                     **train_kwargs) -> Dict[str, MembershipResult]:
    """Train on ``num_members`` random digits examples; attack them against as
    many other examples from the same pool (same distribution, never trained
    on) with the loss attack and the label-only attack."""
    from dpjax.datasets import load_digits

    data = load_digits(seed=0)
    x = np.concatenate([data["x_train"], data["x_test"]])
    y = np.concatenate([data["y_train"], data["y_test"]])
    idx = np.random.default_rng([seed, 3]).permutation(len(x))[: 2 * num_members]
    xm, ym = x[idx[:num_members]], y[idx[:num_members]]
    xn, yn = x[idx[num_members:]], y[idx[num_members:]]
    logits_fn, _ = train_classifier(xm, ym, steps=steps, noise_multiplier=noise_multiplier,
                                    seed=seed, **train_kwargs)
    loss = membership_inference(-per_example_loss(logits_fn, xm, ym),
                                -per_example_loss(logits_fn, xn, yn))

    def predict(inputs):
        return np.asarray(jnp.argmax(logits_fn(inputs), axis=-1))

    label = membership_inference(label_only_scores(predict, xm, ym, seed=seed),
                                 label_only_scores(predict, xn, yn, seed=seed + 1))
    return {"loss": loss, "label_only": label}


def audit_input_canaries(*, num_canaries: int = 200, num_real: int = 200, steps: int = 100,
                         noise_multiplier: float = 1.0, sampling_rate: float = 0.5,
                         l2_clip_norm: float = 1.0, learning_rate: Optional[float] = None,
                         delta: float = 1e-5, confidence: float = 0.95,
                         num_guesses: Optional[int] = None, seed: int = 0,
                         accountant: str = "pld") -> AuditResult:
    """Black-box one-run audit: mislabelled digits canaries, each included with
    probability ½, scored by minus their loss on the wrong label in the final
    model (``noise_multiplier=None`` trains without privacy, for comparison).
    ``learning_rate`` defaults to 0.5 for DP-SGD and 1e-2 for the non-private Adam."""
    if learning_rate is None:
        learning_rate = 1e-2 if noise_multiplier is None else 0.5
    from dpjax.datasets import load_digits

    data = load_digits(seed=0)
    xr, yr = data["x_train"][:num_real], data["y_train"][:num_real]
    pool_x, pool_y = data["x_train"][num_real:], data["y_train"][num_real:]
    xc, yc = input_canaries(pool_x, pool_y, num_canaries, seed=seed)
    included = np.random.default_rng([seed, 2]).random(num_canaries) < 0.5
    xt = np.concatenate([xr, xc[included]])
    yt = np.concatenate([yr, yc[included]])
    logits_fn, _ = train_classifier(xt, yt, steps=steps, noise_multiplier=noise_multiplier,
                                    l2_clip_norm=l2_clip_norm, sampling_rate=sampling_rate,
                                    learning_rate=learning_rate, seed=seed)
    s = -per_example_loss(logits_fn, xc, yc)
    audit = one_run_audit(s, included, delta=delta, confidence=confidence, num_guesses=num_guesses,
                          score="loss")
    eps_acc = (math.inf if noise_multiplier is None else accounting.epsilon(
        noise_multiplier=noise_multiplier, steps=steps, delta=delta,
        sampling_rate=sampling_rate, accountant=accountant))
    setting = dict(noise_multiplier=noise_multiplier, steps=steps, sampling_rate=sampling_rate,
                   num_canaries=num_canaries, num_real=num_real, seed=seed)
    return AuditResult(audit.epsilon_lower, eps_acc, delta, confidence, {"loss": audit},
                       {"loss": s}, included, setting)


# --------------------------------------------------------------------------
# Plot, run() and the CLI
# --------------------------------------------------------------------------


def plot_scores(result: AuditResult, path: str) -> None:
    """Histograms of the canary scores, included vs excluded, one panel per score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.scores)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.4), squeeze=False)
    for ax, n in zip(axes[0], names):
        s = result.scores[n]
        bins = np.histogram_bin_edges(s, bins=40)
        ax.hist(s[result.included], bins=bins, alpha=0.6, label="included")
        ax.hist(s[~result.included], bins=bins, alpha=0.6, label="excluded")
        a = result.audits[n]
        ax.set_title(f"score '{n}': {a.num_correct}/{a.num_guesses} right, eps >= {a.epsilon_lower:.2f}",
                     fontsize=9)
        ax.set_xlabel("canary score")
        ax.legend(fontsize=8)
    fig.suptitle(f"one-run audit: empirical eps >= {result.epsilon_lower:.2f}, "
                 f"accounted eps = {result.epsilon_accounted:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(*, out: Optional[str] = None, **kwargs) -> AuditResult:
    """The digits demo: :func:`audit_dpsgd` with its defaults (or ``kwargs``),
    summary printed; with ``out``, writes ``audit_scores.png`` and ``audit.json``."""
    result = audit_dpsgd(**kwargs)
    s = result.setting
    print(f"DP-SGD audit ({s['loop']} loop): {s['num_canaries']} gradient canaries, {s['num_real']} real "
          f"digits examples, {s['num_params']} parameters; sigma = {s['noise_multiplier']:g}, "
          f"q = {s['sampling_rate']:g}, steps = {s['steps']}")
    for a in result.audits.values():
        print(f"  score {a.score!r}: {a.num_correct}/{a.num_guesses} right guesses -> "
              f"epsilon >= {a.epsilon_lower:.3f}")
    print(f"empirical epsilon lower bound = {result.epsilon_lower:.3f} "
          f"({result.confidence:.0%} confidence)")
    print(f"accounted epsilon             = {result.epsilon_accounted:.3f} "
          f"(delta = {result.delta:g}, {s['accountant']})")
    if result.epsilon_lower > result.epsilon_accounted:
        print("WARNING: the empirical lower bound exceeds the accounted epsilon: "
              "the implementation or its analysis is wrong")
    if out:
        os.makedirs(out, exist_ok=True)
        plot_scores(result, os.path.join(out, "audit_scores.png"))
        with open(os.path.join(out, "audit.json"), "w") as f:
            json.dump({"epsilon_lower": result.epsilon_lower,
                       "epsilon_accounted": result.epsilon_accounted,
                       "delta": result.delta, "confidence": result.confidence,
                       "audits": {k: dataclasses.asdict(v) for k, v in result.audits.items()},
                       "setting": s}, f, indent=2)
        print(f"wrote {os.path.join(out, 'audit_scores.png')} and audit.json")
    return result


def run_cli(args: argparse.Namespace) -> int:
    """``dpjax audit``."""
    if args.demo_config:
        from dpjax import accounting, datasets, training

        steps = int(training.DEFAULTS["epochs"])  # full batch: one step per epoch
        args.steps, args.sampling_rate = steps, 1.0
        args.num_real = len(datasets.load_digits()["x_train"])
        args.noise_multiplier = accounting.calibrate_noise_multiplier(
            target_epsilon=3.0, delta=args.delta, sampling_rate=1.0, steps=steps)
    run(out=args.out, noise_multiplier=args.noise_multiplier, steps=args.steps,
        sampling_rate=args.sampling_rate, num_canaries=args.num_canaries,
        num_real=args.num_real, delta=args.delta, confidence=args.confidence, seed=args.seed,
        loop=args.loop)
    return 0
