"""Privacy accounting for DP-SGD, built on Google's ``dp_accounting``.

dpjax never derives privacy bounds itself: it describes the training mechanism
as a ``dp_accounting`` :class:`~dp_accounting.DpEvent` and lets dp_accounting's
accountants (RDP or PLD) do the math.  This module adds what a training library
needs around that:

* **Input validation** before anything reaches dp_accounting (which silently
  returns ε = 0 for σ = NaN or δ = NaN, returns 0 for δ ≥ 1, and raises on
  0 steps).
* **Honest sampling.**  Two sampling schemes can be analysed:

  - ``POISSON`` (default): at every step each example is included
    independently with probability ``q``.  Neighbouring datasets differ by
    adding or removing one example.
  - ``FIXED_SIZE``: every step draws a uniformly random subset of exactly
    ``batch_size`` of the ``dataset_size`` examples, independently of the
    other steps.  Neighbouring datasets differ by replacing one example.
    Only the RDP accountant supports this.

  Shuffled / epoch-based batching (each example exactly once per epoch) is
  *refused*: it is neither of the above, and analysing it as Poisson would
  overstate privacy.
* **No log floods.**  dp_accounting's RDP accountant logs a "failed to
  converge" warning for each fractional order it cannot evaluate and drops
  that order.  dpjax swallows those records and emits a single
  :class:`RdpConvergenceWarning` instead, because the resulting ε, while still
  a valid upper bound, can be far from tight (use ``accountant="pld"``).
* **PLD grid refinement.**  The PLD accountant discretises the privacy loss on
  a grid of width ``PLD_VALUE_DISCRETIZATION_INTERVAL`` (1e-4).  Its
  pessimistic estimate is always a valid upper bound, but a grid that is too
  coarse overstates ε.  When the PLD value exceeds the RDP value for the same
  setting (a sign the grid is too coarse), dpjax recomputes with a 10× finer
  grid, at most ``PLD_MAX_REFINEMENTS`` (2) times, and returns the last PLD
  value.
* Calibration (:func:`calibrate_noise_multiplier`), a step budget
  (:func:`max_steps`, :class:`BudgetGuard`) and a human-readable
  :func:`privacy_statement`.

Example (the TensorFlow Privacy MNIST tutorial setting):

>>> from dpjax import accounting
>>> eps = accounting.epsilon(noise_multiplier=1.1, sampling_rate=256 / 60000,
...                          steps=14063, delta=1e-5)
>>> round(eps, 3)
2.597
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import threading
import warnings
from typing import Callable, Iterator

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from dpjax import validation

__all__ = [
    "POISSON",
    "FIXED_SIZE",
    "SAMPLINGS",
    "RDP",
    "PLD",
    "ACCOUNTANTS",
    "PLD_VALUE_DISCRETIZATION_INTERVAL",
    "PLD_MAX_REFINEMENTS",
    "MAX_STEPS_CAP",
    "PrivacyBudgetExceeded",
    "RdpConvergenceWarning",
    "dp_event",
    "epsilon",
    "delta",
    "calibrate_noise_multiplier",
    "max_steps",
    "BudgetGuard",
    "privacy_statement",
]

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

POISSON = "poisson"
"""Poisson sampling: each example joins each batch independently with probability q."""

FIXED_SIZE = "fixed_size"
"""Each step draws a uniformly random subset of exactly ``batch_size`` examples."""

SAMPLINGS = (POISSON, FIXED_SIZE)

RDP = "rdp"
PLD = "pld"
ACCOUNTANTS = (RDP, PLD)

PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4
"""Initial grid width of the PLD accountant (dp_accounting's default)."""

PLD_MAX_REFINEMENTS = 2
"""How many times the PLD grid is made 10× finer when PLD ε exceeds RDP ε."""

MAX_STEPS_CAP = 10**8
""":func:`max_steps` never searches beyond this many steps (and returns it if the
budget allows even more)."""

# Range searched by calibrate_noise_multiplier.
_SIGMA_MIN = 1e-2
_SIGMA_MAX = 1e4

# What dpjax says about shuffled batches, in every error that refuses them.
_SHUFFLE_EXPLANATION = (
    "shuffled / epoch-based batching is not supported by the accountant: each "
    "example then appears exactly once per epoch, which is neither Poisson "
    "sampling nor independent fixed-size sampling, and accounting for it as "
    "Poisson would overstate privacy. Train with dpjax's PoissonSampler "
    f"(sampling={POISSON!r}, the default), or draw each batch as an independent "
    f"uniformly random subset of exactly batch_size examples "
    f"(sampling={FIXED_SIZE!r}, with dataset_size and batch_size)."
)


class PrivacyBudgetExceeded(RuntimeError):
    """Raised by :class:`BudgetGuard` *before* a step that would overspend the budget."""


class RdpConvergenceWarning(UserWarning):
    """dp_accounting's RDP accountant dropped orders it could not evaluate.

    The ε it reports is still a valid upper bound, but may be much larger than
    the true ε.  ``accountant="pld"`` gives a tighter answer.
    """


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _checked(check: Callable, name: str, value, allowed: str):
    """Runs a ``dpjax.validation`` check, adding the allowed range to its message."""
    try:
        return check(name, value)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} (allowed: {allowed})") from None


def _check_noise_multiplier(value) -> float:
    try:
        sigma = validation._as_real("noise_multiplier", value)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} (allowed: noise_multiplier > 0)") from None
    if sigma <= 0:
        raise ValueError(
            f"noise_multiplier must be > 0, got {value!r}: without noise the "
            "training is not differentially private (allowed: noise_multiplier > 0)"
        )
    return sigma


def _check_steps(value) -> int:
    return _checked(
        validation.check_non_negative_int, "steps", value, "an integer >= 0"
    )


def _check_delta(value) -> float:
    return _checked(validation.check_open_unit, "delta", value, "0 < delta < 1")


def _check_epsilon(name: str, value) -> float:
    return _checked(validation.check_non_negative, name, value, f"finite {name} >= 0")


def _check_accountant(value) -> str:
    return validation.check_choice("accountant", value, ACCOUNTANTS)


def _check_sampling(value) -> str:
    if value in SAMPLINGS:
        return value
    raise ValueError(
        f"sampling must be one of {list(SAMPLINGS)}, got {value!r}; "
        + _SHUFFLE_EXPLANATION
    )


class _Setting:
    """A validated description of the sampling, noise and accountant."""

    __slots__ = ("noise_multiplier", "sampling", "sampling_rate", "dataset_size",
                 "batch_size", "accountant")

    def __init__(self, noise_multiplier, sampling, sampling_rate, dataset_size,
                 batch_size, accountant):
        self.noise_multiplier = noise_multiplier
        self.sampling = sampling
        self.sampling_rate = sampling_rate
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.accountant = accountant

    def with_noise(self, noise_multiplier: float) -> "_Setting":
        return _Setting(noise_multiplier, self.sampling, self.sampling_rate,
                        self.dataset_size, self.batch_size, self.accountant)

    def with_accountant(self, accountant: str) -> "_Setting":
        return _Setting(self.noise_multiplier, self.sampling, self.sampling_rate,
                        self.dataset_size, self.batch_size, accountant)


def _validate_setting(*, noise_multiplier, sampling_rate, sampling, dataset_size,
                      batch_size, accountant=RDP, need_noise=True) -> _Setting:
    sigma = _check_noise_multiplier(noise_multiplier) if need_noise else None
    sampling = _check_sampling(sampling)
    accountant = _check_accountant(accountant)
    n = None if dataset_size is None else _checked(
        validation.check_positive_int, "dataset_size", dataset_size, "an integer >= 1")
    b = None if batch_size is None else _checked(
        validation.check_positive_int, "batch_size", batch_size, "an integer >= 1")
    if n is not None and b is not None and b > n:
        raise ValueError(
            f"batch_size must be <= dataset_size, got batch_size={batch_size!r} > "
            f"dataset_size={dataset_size!r} (allowed: 1 <= batch_size <= dataset_size)"
        )
    q = None if sampling_rate is None else _checked(
        validation.check_rate, "sampling_rate", sampling_rate, "0 < sampling_rate <= 1")

    if sampling == FIXED_SIZE:
        if n is None or b is None:
            raise ValueError(
                f"sampling={FIXED_SIZE!r} needs dataset_size and batch_size (got "
                f"dataset_size={dataset_size!r}, batch_size={batch_size!r})"
            )
        if accountant != RDP:
            raise ValueError(
                f"sampling={FIXED_SIZE!r} is only supported with accountant='rdp' "
                f"(got accountant={accountant!r}): dp_accounting's PLD accountant "
                "cannot analyse sampling without replacement"
            )
    if n is not None and b is not None:
        derived = b / n
        if q is not None and not math.isclose(q, derived, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(
                f"sampling_rate={sampling_rate!r} does not match batch_size / "
                f"dataset_size = {b}/{n} = {derived!r}; pass one or the other "
                "(allowed: sampling_rate == batch_size / dataset_size)"
            )
        q = derived
    if q is None:
        raise ValueError(
            "sampling_rate is required for Poisson sampling (the probability that "
            "an example is in a batch, 0 < sampling_rate <= 1), or pass "
            "dataset_size and batch_size to use batch_size / dataset_size"
        )
    return _Setting(sigma, sampling, q, n, b, accountant)


# --------------------------------------------------------------------------
# Events and accountants
# --------------------------------------------------------------------------


def _event(setting: _Setting, steps: int) -> dp_accounting.DpEvent:
    if steps == 0:
        return dp_accounting.NoOpDpEvent()
    sigma = setting.noise_multiplier
    if setting.sampling == POISSON:
        step = dp_accounting.PoissonSampledDpEvent(
            setting.sampling_rate, dp_accounting.GaussianDpEvent(sigma))
    else:
        # Why sigma / 2: dpjax adds Gaussian noise of std sigma * C to the SUM of
        # per-example gradients, each clipped to L2 norm <= C.  Under the
        # replace-one relation (needed for fixed-size batches, where the dataset
        # size is public) swapping one example for another can move that sum by
        # up to 2C, so the L2 sensitivity is 2C.  dp_accounting's noise
        # multiplier is the noise std divided by the sensitivity:
        # sigma * C / (2C) = sigma / 2.  Passing sigma would understate ε.
        step = dp_accounting.SampledWithoutReplacementDpEvent(
            setting.dataset_size, setting.batch_size,
            dp_accounting.GaussianDpEvent(sigma / 2))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _new_accountant(setting: _Setting, kind: str,
                    value_discretization_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL):
    if kind == RDP:
        relation = (dp_accounting.NeighboringRelation.REPLACE_ONE
                    if setting.sampling == FIXED_SIZE
                    else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    return pld_privacy_accountant.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=value_discretization_interval,
    )


# --------------------------------------------------------------------------
# Capturing dp_accounting's "failed to converge" log flood
# --------------------------------------------------------------------------

_CONVERGENCE_MARKER = "failed to converge"
_ABSL_LOGGER = "absl"
_capture_lock = threading.RLock()
_capture_stack: list = []


class _ConvergenceCapture(logging.Filter):
    """Logger filter on "absl" that swallows dp_accounting's convergence records.

    Matching records are counted (and the RDP order they mention remembered);
    other records are held back and re-emitted when the capture ends, so
    nothing unrelated is lost.
    """

    def __init__(self, original_level: int):
        super().__init__()
        self.count = 0
        self.orders: set = set()
        self.deferred: list = []
        self._original_level = original_level

    def filter(self, record: logging.LogRecord) -> bool:
        if not _capture_stack or _capture_stack[-1] is not self:
            return True  # an inner capture handles it
        if _CONVERGENCE_MARKER in str(record.msg):
            self.count += 1
            args = record.args
            if isinstance(args, tuple) and len(args) >= 4:
                try:
                    self.orders.add(float(args[3]))  # (iterations, q, sigma, alpha)
                except (TypeError, ValueError):
                    pass
            return False
        if record.levelno >= self._original_level:
            self.deferred.append(record)
        return False


@contextlib.contextmanager
def _capture_convergence_logs() -> Iterator[_ConvergenceCapture]:
    logger = logging.getLogger(_ABSL_LOGGER)
    with _capture_lock:
        old_level = logger.level
        capture = _ConvergenceCapture(logger.getEffectiveLevel())
        logger.addFilter(capture)
        _capture_stack.append(capture)
        # Make sure the records are created even if the user silenced "absl",
        # so that the warning below is never lost.
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        # absl.logging calls logging.basicConfig() when the root logger has no
        # handler; a placeholder avoids that global side effect.
        root = logging.getLogger()
        placeholder = None
        if not root.handlers:
            placeholder = logging.NullHandler()
            root.addHandler(placeholder)
        try:
            yield capture
        finally:
            _capture_stack.remove(capture)
            logger.removeFilter(capture)
            logger.setLevel(old_level)
            if placeholder is not None:
                root.removeHandler(placeholder)
    for record in capture.deferred:
        logger.handle(record)


def _dropped_orders(setting: _Setting, accountant, capture: _ConvergenceCapture) -> tuple:
    """RDP orders dp_accounting could not evaluate (empty if none)."""
    orders = set(capture.orders)
    if setting.sampling == POISSON and setting.sampling_rate < 1:
        # Second line of evidence, in case logging was disabled globally: the
        # accountant stores +inf for every order it dropped.
        rdp = np.asarray(accountant.rdp)
        all_orders = np.asarray(accountant.orders)
        bad = ~np.isfinite(rdp) & (all_orders != np.floor(all_orders))
        orders.update(float(o) for o in all_orders[bad])
    if capture.count and not orders:
        orders.add(float("nan"))  # dropped, order unknown
    return tuple(sorted(orders))


_WARNED_SETTINGS: set = set()


def _warn_dropped(setting: _Setting, orders: tuple, what: str) -> None:
    # Once per (sampling rate, noise multiplier, what) in a process, and attributed to
    # "dpjax" rather than to a source line: the line would only repeat the call.
    key = (setting.sampling_rate, setting.noise_multiplier, what)
    if key in _WARNED_SETTINGS:
        return
    _WARNED_SETTINGS.add(key)
    shown = ", ".join(f"{o:g}" for o in orders)
    warnings.warn_explicit(
        f"dp_accounting's RDP accountant failed to converge for RDP order(s) "
        f"[{shown}] at sampling_rate={setting.sampling_rate:g}, "
        f"noise_multiplier={setting.noise_multiplier:g} and dropped them. {what} "
        "Use accountant='pld' for a tighter answer.",
        RdpConvergenceWarning, filename="dpjax.accounting", lineno=0, module="dpjax.accounting",
    )


# --------------------------------------------------------------------------
# Core computations (inputs already validated)
# --------------------------------------------------------------------------


def _query(accountant, quantity: str, target: float) -> float:
    if quantity == "epsilon":
        return float(accountant.get_epsilon(target))
    return float(accountant.get_delta(target))


def _rdp_value(setting: _Setting, steps: int, quantity: str, target: float):
    """(value, dropped RDP orders) from dp_accounting's RDP accountant."""
    accountant = _new_accountant(setting, RDP)
    with _capture_convergence_logs() as capture:
        accountant.compose(_event(setting, steps))
        value = _query(accountant, quantity, target)
    return value, _dropped_orders(setting, accountant, capture)


def _pld_value(setting: _Setting, steps: int, quantity: str, target: float) -> float:
    """Value from dp_accounting's PLD accountant, refining a too-coarse grid."""
    event = _event(setting, steps)
    reference, _ = _rdp_value(setting, steps, quantity, target)
    interval = PLD_VALUE_DISCRETIZATION_INTERVAL
    for attempt in range(PLD_MAX_REFINEMENTS + 1):
        accountant = _new_accountant(setting, PLD, interval)
        accountant.compose(event)
        value = _query(accountant, quantity, target)
        # PLD is tighter than RDP whenever its grid is fine enough; a larger
        # value means the discretisation error dominates.
        if value <= reference:
            break
        interval /= 10
    return value


def _value(setting: _Setting, steps: int, quantity: str, target: float):
    """(value, dropped RDP orders); steps == 0 gives exactly 0."""
    if steps == 0:
        return 0.0, ()
    if setting.accountant == RDP:
        return _rdp_value(setting, steps, quantity, target)
    return _pld_value(setting, steps, quantity, target), ()


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def dp_event(*, noise_multiplier, steps, sampling_rate=None, sampling=POISSON,
             dataset_size=None, batch_size=None) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event describing ``steps`` steps of DP-SGD.

    * ``sampling="poisson"``: ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
      GaussianDpEvent(σ)), steps)``, for the add-or-remove-one relation
      (``ADD_OR_REMOVE_ONE``, dp_accounting's default).
    * ``sampling="fixed_size"``: ``SelfComposedDpEvent(
      SampledWithoutReplacementDpEvent(dataset_size, batch_size,
      GaussianDpEvent(σ / 2)), steps)``, to be analysed with
      ``RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)``.
      The σ/2 is because replacing one example moves the noised sum of
      clipped gradients by up to 2C, while the noise std is σ·C.

    ``steps == 0`` gives ``NoOpDpEvent()``.  For Poisson sampling, pass
    ``sampling_rate`` (or ``dataset_size`` and ``batch_size``, giving
    ``q = batch_size / dataset_size``).

    >>> from dpjax.accounting import dp_event
    >>> ev = dp_event(noise_multiplier=1.1, sampling_rate=0.01, steps=100)
    >>> type(ev).__name__, ev.count, ev.event.sampling_probability
    ('SelfComposedDpEvent', 100, 0.01)
    """
    setting = _validate_setting(noise_multiplier=noise_multiplier,
                                sampling_rate=sampling_rate, sampling=sampling,
                                dataset_size=dataset_size, batch_size=batch_size)
    return _event(setting, _check_steps(steps))


def epsilon(*, noise_multiplier, steps, delta, sampling_rate=None, accountant=RDP,
            sampling=POISSON, dataset_size=None, batch_size=None) -> float:
    """ε spent after ``steps`` steps of DP-SGD, for a given δ.

    Args:
      noise_multiplier: σ; the noise added to the sum of clipped gradients has
        std σ·C.  Must be > 0.
      steps: number of noisy steps taken (an integer >= 0; 0 gives ε = 0).
      delta: δ, in (0, 1); typically well below 1 / dataset_size.
      sampling_rate: q, the probability that an example is in a batch
        (Poisson), in (0, 1].  May be omitted if ``dataset_size`` and
        ``batch_size`` are given.
      accountant: ``"rdp"`` (default) or ``"pld"`` (tighter, slower).
      sampling: ``"poisson"`` (default) or ``"fixed_size"`` (needs
        ``dataset_size`` and ``batch_size``; RDP only).

    With ``accountant="rdp"``, emits one :class:`RdpConvergenceWarning` if
    dp_accounting had to drop RDP orders (ε is then valid but possibly loose).
    With ``accountant="pld"``, the grid is refined when the PLD value exceeds
    the RDP value (see the module docstring).

    >>> from dpjax.accounting import epsilon
    >>> round(epsilon(noise_multiplier=1.1, sampling_rate=256 / 60000,
    ...               steps=14063, delta=1e-5, accountant="pld"), 2)
    2.38
    >>> epsilon(noise_multiplier=1.1, sampling_rate=0.01, steps=0, delta=1e-5)
    0.0
    """
    setting = _validate_setting(noise_multiplier=noise_multiplier,
                                sampling_rate=sampling_rate, sampling=sampling,
                                dataset_size=dataset_size, batch_size=batch_size,
                                accountant=accountant)
    steps = _check_steps(steps)
    target = _check_delta(delta)
    value, dropped = _value(setting, steps, "epsilon", target)
    if dropped:
        _warn_dropped(setting, dropped,
                      "The returned epsilon is a valid but possibly loose upper bound.")
    return value


def delta(*, noise_multiplier, steps, epsilon, sampling_rate=None, accountant=RDP,
          sampling=POISSON, dataset_size=None, batch_size=None) -> float:
    """δ such that ``steps`` steps of DP-SGD are (ε, δ)-DP, for a given ε >= 0.

    Takes the same arguments as :func:`epsilon`, with ``epsilon`` in place of
    ``delta``.  ``steps == 0`` gives δ = 0.

    >>> from dpjax.accounting import delta
    >>> d = delta(noise_multiplier=1.1, sampling_rate=256 / 60000, steps=14063,
    ...           epsilon=2.6)
    >>> d < 1e-5
    True
    """
    setting = _validate_setting(noise_multiplier=noise_multiplier,
                                sampling_rate=sampling_rate, sampling=sampling,
                                dataset_size=dataset_size, batch_size=batch_size,
                                accountant=accountant)
    steps = _check_steps(steps)
    target = _check_epsilon("epsilon", epsilon)
    value, dropped = _value(setting, steps, "delta", target)
    if dropped:
        _warn_dropped(setting, dropped,
                      "The returned delta is a valid but possibly loose upper bound.")
    return value


def _bracket_sigma(setting: _Setting, steps: int, target_epsilon: float, delta_: float,
                   start: float = 1.0, shrink: float = 0.5) -> tuple:
    """(lo, hi) with ε(lo) > target >= ε(hi), within [_SIGMA_MIN, _SIGMA_MAX]."""

    def ok(sigma):
        return _value(setting.with_noise(sigma), steps, "epsilon", delta_)[0] <= target_epsilon

    if ok(start):
        hi = start
        while True:
            if hi <= _SIGMA_MIN:
                raise ValueError(
                    f"target_epsilon={target_epsilon!r} is met even with "
                    f"noise_multiplier={_SIGMA_MIN}: the budget is so loose that "
                    "calibration is meaningless; choose a smaller target_epsilon "
                    f"(allowed: target_epsilon reachable with {_SIGMA_MIN} <= "
                    f"noise_multiplier <= {_SIGMA_MAX:g})")
            lo = max(hi * shrink, _SIGMA_MIN)
            if not ok(lo):
                return lo, hi
            hi = lo
    lo = start
    while True:
        if lo >= _SIGMA_MAX:
            raise ValueError(
                f"target_epsilon={target_epsilon!r} cannot be met with "
                f"noise_multiplier <= {_SIGMA_MAX:g} for steps={steps}, "
                f"sampling_rate={setting.sampling_rate:g}, delta={delta_!r}; "
                "increase target_epsilon or delta, or reduce steps or the "
                "sampling rate")
        hi = min(lo * 2, _SIGMA_MAX)
        if ok(hi):
            return lo, hi
        lo = hi


def calibrate_noise_multiplier(*, target_epsilon, delta, steps, sampling_rate=None,
                               accountant=RDP, sampling=POISSON, dataset_size=None,
                               batch_size=None, tol=1e-3) -> float:
    """The smallest σ (to within ``tol``) with ε(σ) <= ``target_epsilon``.

    Uses ``dp_accounting.calibrate_dp_mechanism`` inside a bracket found by
    doubling / halving from σ = 1 (within [0.01, 10^4]), then checks that the
    result really satisfies ε <= target_epsilon.  Raises ``ValueError`` if the
    target cannot be met in that range.  ``tol`` is an absolute tolerance on σ.

    >>> from dpjax.accounting import calibrate_noise_multiplier, epsilon
    >>> sigma = calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5,
    ...                                    sampling_rate=256 / 60000, steps=14063)
    >>> round(sigma, 2)
    1.01
    >>> epsilon(noise_multiplier=sigma, sampling_rate=256 / 60000, steps=14063,
    ...         delta=1e-5) <= 3.0
    True
    """
    setting = _validate_setting(noise_multiplier=None, sampling_rate=sampling_rate,
                                sampling=sampling, dataset_size=dataset_size,
                                batch_size=batch_size, accountant=accountant,
                                need_noise=False)
    target = _checked(validation.check_positive, "target_epsilon", target_epsilon,
                      "finite target_epsilon > 0")
    delta_ = _check_delta(delta)
    steps = _checked(validation.check_positive_int, "steps", steps, "an integer >= 1")
    tol = _checked(validation.check_positive, "tol", tol, "finite tol > 0")

    def calibrate(kind, lo, hi):
        def make_accountant():
            return _new_accountant(setting, kind)

        def make_event(sigma):
            return _event(setting.with_noise(sigma), steps)

        return float(dp_accounting.calibrate_dp_mechanism(
            make_accountant, make_event, target, delta_,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=tol))

    # Bracket with RDP (cheap).  PLD's answer is normally a little below RDP's,
    # so for PLD the RDP answer is the starting point of a narrow bracket.
    lo, hi = _bracket_sigma(setting.with_accountant(RDP), steps, target, delta_)
    with _capture_convergence_logs() as capture:
        sigma = calibrate(RDP, lo, hi)
    if setting.accountant == PLD:
        lo, hi = _bracket_sigma(setting, steps, target, delta_, start=sigma, shrink=0.9)
        sigma = calibrate(PLD, lo, hi)
    # Check the promise with the same code path users call.
    for candidate in (sigma, sigma + tol, hi):
        value, dropped = _value(setting.with_noise(candidate), steps, "epsilon", delta_)
        if value <= target:
            sigma = candidate
            break
    else:  # pragma: no cover - would be a dp_accounting bug
        raise RuntimeError(
            f"calibration failed: epsilon({sigma}) = {value} > {target}")
    if setting.accountant == RDP and (capture.count or dropped):
        orders = tuple(sorted(capture.orders | set(dropped))) or (float("nan"),)
        _warn_dropped(setting.with_noise(sigma), orders,
                      "The calibrated noise_multiplier is valid but may be larger "
                      "than necessary.")
    return sigma


def _log_log_estimate(n1: int, e1: float, n2: int, e2: float, target: float):
    """Where ε(n) = target if log ε is linear in log n through the two points."""
    if not (0 < e1 < e2 and math.isfinite(e2) and target > 0 and n1 != n2):
        return None
    slope = (math.log(e2) - math.log(e1)) / (math.log(n2) - math.log(n1))
    try:
        return math.exp(math.log(n1) + (math.log(target) - math.log(e1)) / slope)
    except OverflowError:
        return None


def _largest_feasible(eps: Callable[[int], float], target: float, guess: int,
                      cap: int) -> int:
    """Largest n in [0, cap] with eps(n) <= target, for eps non-decreasing in n.

    Brackets the boundary from ``guess`` (growing at most 16x per probe), then
    narrows it with log-log interpolation, probing both sides of each estimate,
    and falls back to bisection whenever an interpolation step does not at least
    halve the bracket.  It stops only when eps(lo) <= target < eps(hi) with
    hi = lo + 1 have both been evaluated (or lo == cap).
    """
    if eps(1) > target:
        return 0
    lo, e_lo = 1, eps(1)
    n = min(max(guess, 1), cap)
    e_n = eps(n)
    if e_n <= target:
        lo, e_lo = n, e_n
        while True:  # grow until infeasible
            if lo >= cap:
                return cap
            estimate = _log_log_estimate(1, eps(1), lo, e_lo, target)
            step = 2 * lo if estimate is None else math.ceil(1.05 * estimate)
            n = min(max(step, lo + 1, math.ceil(1.1 * lo)), 16 * lo, cap)
            e_n = eps(n)
            if e_n > target:
                hi, e_hi = n, e_n
                break
            lo, e_lo = n, e_n
    else:
        hi, e_hi = n, e_n
    interpolate = True
    while hi - lo > 1:
        width = hi - lo
        estimate = _log_log_estimate(lo, e_lo, hi, e_hi, target) if interpolate else None
        if estimate is None:
            probes = ((lo + hi) // 2,)
        else:
            m = min(max(math.floor(estimate), lo + 1), hi - 1)
            probes = (m, m + 1)
        for n in probes:
            if not lo < n < hi:
                continue
            e_n = eps(n)
            if e_n <= target:
                lo, e_lo = n, e_n
            else:
                hi, e_hi = n, e_n
                break
        interpolate = (hi - lo) <= width // 2
    return lo


def _max_steps(setting: _Setting, target: float, delta_: float) -> tuple:
    """(largest n <= MAX_STEPS_CAP with ε(n) <= target, dropped orders)."""
    dropped: set = set()
    cache: dict = {}

    def eps(n):
        if n not in cache:
            value, orders = _value(setting, n, "epsilon", delta_)
            dropped.update(orders)
            cache[n] = value
        return cache[n]

    guess = 1
    if setting.accountant == PLD:
        # The RDP answer is cheap and usually a little below PLD's.
        guess = max(1, _max_steps(setting.with_accountant(RDP), target, delta_)[0])
    result = _largest_feasible(eps, target, guess, MAX_STEPS_CAP)
    return result, tuple(sorted(dropped))


def max_steps(*, target_epsilon, delta, noise_multiplier, sampling_rate=None,
              accountant=RDP, sampling=POISSON, dataset_size=None,
              batch_size=None) -> int:
    """The largest number of steps whose ε is <= ``target_epsilon``.

    Returns 0 if even one step exceeds the target.  The search (doubling, then
    bisection) evaluates both sides of the boundary, so
    ``ε(result) <= target_epsilon < ε(result + 1)``.  The search stops at
    :data:`MAX_STEPS_CAP` (10^8), which is returned if the budget allows even
    more.  With ``accountant="pld"`` each evaluation composes a PLD, which
    takes about a second for ~10^4 steps and grows with the step count.

    >>> from dpjax.accounting import max_steps
    >>> max_steps(target_epsilon=3.0, delta=1e-5, noise_multiplier=1.1,
    ...           sampling_rate=256 / 60000)
    18338
    """
    setting = _validate_setting(noise_multiplier=noise_multiplier,
                                sampling_rate=sampling_rate, sampling=sampling,
                                dataset_size=dataset_size, batch_size=batch_size,
                                accountant=accountant)
    target = _check_epsilon("target_epsilon", target_epsilon)
    delta_ = _check_delta(delta)
    result, dropped = _max_steps(setting, target, delta_)
    if dropped:
        _warn_dropped(setting, dropped,
                      "The returned number of steps is safe but may be smaller "
                      "than necessary.")
    return result


class BudgetGuard:
    """Refuses a training step *before* it would take ε past a target.

    The maximum number of steps is computed once, at construction.  Call
    :meth:`check` before every noisy step (or block of steps); it raises
    :class:`PrivacyBudgetExceeded` if those steps would overspend the budget.

    >>> from dpjax.accounting import BudgetGuard, PrivacyBudgetExceeded
    >>> guard = BudgetGuard(target_epsilon=1.0, delta=1e-5, noise_multiplier=1.1,
    ...                     sampling_rate=256 / 60000)
    >>> guard.max_steps
    1709
    >>> guard.check(steps_done=1708)          # the last allowed step: fine
    >>> guard.remaining(1000)
    709
    >>> try:
    ...     guard.check(steps_done=1709)
    ... except PrivacyBudgetExceeded:
    ...     print("stopped")
    stopped
    """

    def __init__(self, *, target_epsilon, delta, noise_multiplier, sampling_rate=None,
                 accountant=RDP, sampling=POISSON, dataset_size=None, batch_size=None):
        self._setting = _validate_setting(
            noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
            sampling=sampling, dataset_size=dataset_size, batch_size=batch_size,
            accountant=accountant)
        self.target_epsilon = _check_epsilon("target_epsilon", target_epsilon)
        self.delta = _check_delta(delta)
        self.noise_multiplier = self._setting.noise_multiplier
        self.sampling_rate = self._setting.sampling_rate
        self.accountant = self._setting.accountant
        self.sampling = self._setting.sampling
        steps, dropped = _max_steps(self._setting, self.target_epsilon, self.delta)
        if dropped:
            _warn_dropped(self._setting, dropped,
                          "BudgetGuard.max_steps is safe but may be smaller than "
                          "necessary.")
        self._max_steps = steps

    @property
    def max_steps(self) -> int:
        """Largest number of steps with ε <= target_epsilon."""
        return self._max_steps

    def remaining(self, steps_done) -> int:
        """Steps still allowed after ``steps_done`` steps (never negative)."""
        return max(0, self._max_steps - _checked(
            validation.check_non_negative_int, "steps_done", steps_done, "an integer >= 0"))

    def epsilon_spent(self, steps_done) -> float:
        """ε after ``steps_done`` steps, under this guard's accountant."""
        steps = _checked(validation.check_non_negative_int, "steps_done", steps_done,
                         "an integer >= 0")
        value, dropped = _value(self._setting, steps, "epsilon", self.delta)
        if dropped:
            _warn_dropped(self._setting, dropped,
                          "The returned epsilon is a valid but possibly loose upper bound.")
        return value

    def check(self, steps_done, upcoming=1) -> None:
        """Raises :class:`PrivacyBudgetExceeded` if ``steps_done + upcoming > max_steps``."""
        done = _checked(validation.check_non_negative_int, "steps_done", steps_done,
                        "an integer >= 0")
        upcoming = _checked(validation.check_non_negative_int, "upcoming", upcoming,
                            "an integer >= 0")
        total = done + upcoming
        if total <= self._max_steps:
            return
        would_be = _value(self._setting, total, "epsilon", self.delta)[0]
        raise PrivacyBudgetExceeded(
            f"privacy budget exceeded: {done} noisy steps done and {upcoming} more "
            f"requested, but target_epsilon={self.target_epsilon:g} at "
            f"delta={self.delta:g} allows at most {self._max_steps} steps "
            f"(noise_multiplier={self.noise_multiplier:g}, "
            f"sampling_rate={self.sampling_rate:g}, accountant={self.accountant!r}); "
            f"after {total} steps epsilon would be {_round_up(would_be, 6)}. Nothing was "
            "applied. Stop training here, or start a new run with a larger "
            "noise_multiplier, a smaller sampling rate, or a larger target_epsilon "
            "chosen before training."
        )

    def __repr__(self) -> str:
        return (f"BudgetGuard(target_epsilon={self.target_epsilon!r}, "
                f"delta={self.delta!r}, noise_multiplier={self.noise_multiplier!r}, "
                f"sampling_rate={self.sampling_rate!r}, accountant={self.accountant!r}, "
                f"sampling={self.sampling!r}, max_steps={self._max_steps})")


def _dp_accounting_version() -> str:
    try:
        return importlib.metadata.version("dp-accounting")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _round_up(x: float, significant: int = 4) -> str:
    """``x`` rounded *up* to ``significant`` digits (a safe way to print ε)."""
    if x == 0 or not math.isfinite(x):
        return repr(float(x))
    exponent = math.floor(math.log10(abs(x)))
    decimals = significant - 1 - exponent
    factor = 10.0 ** decimals
    return f"{math.ceil(x * factor) / factor:.{max(0, decimals)}f}"


_PLD_STATEMENT_MAX_EPSILON = 100.0


def privacy_statement(*, noise_multiplier, steps, delta, sampling_rate=None,
                      l2_clip_norm=None, sampling=POISSON, dataset_size=None,
                      batch_size=None) -> str:
    """A short human-readable report of the guarantee, for a model card or log.

    Names the mechanism, the neighbouring relation, q, σ, C (if given), steps,
    δ, ε under RDP and under PLD (PLD only for Poisson sampling) and the
    dp-accounting version.  ε values are rounded *up* to 4 significant digits.

    >>> from dpjax.accounting import privacy_statement
    >>> text = privacy_statement(noise_multiplier=1.1, sampling_rate=256 / 60000,
    ...                          steps=14063, delta=1e-5, l2_clip_norm=1.0)
    >>> print(text.splitlines()[-3])
    epsilon (RDP accountant): 2.597
    """
    setting = _validate_setting(noise_multiplier=noise_multiplier,
                                sampling_rate=sampling_rate, sampling=sampling,
                                dataset_size=dataset_size, batch_size=batch_size)
    steps = _check_steps(steps)
    delta_ = _check_delta(delta)
    clip = None if l2_clip_norm is None else _checked(
        validation.check_positive, "l2_clip_norm", l2_clip_norm, "finite l2_clip_norm > 0")
    sigma, q = setting.noise_multiplier, setting.sampling_rate
    c_text = "C" if clip is None else f"C = {clip:g}"
    noise_text = "sigma*C" if clip is None else f"sigma*C = {sigma * clip:g}"

    lines = [
        "Differential privacy statement (dpjax)",
        f"Mechanism: DP-SGD. Every example's gradient is clipped to L2 norm <= "
        f"{c_text}; Gaussian noise of std {noise_text} is added to the sum of "
        "clipped gradients once per step.",
    ]
    if setting.sampling == POISSON:
        lines += [
            f"Sampling: Poisson; each example is in each batch independently with "
            f"probability q = {q:.6g}.",
            "Neighbouring datasets: differ by adding or removing one example.",
        ]
    else:
        lines += [
            f"Sampling: fixed size; each step uses a uniformly random subset of "
            f"{setting.batch_size} of the {setting.dataset_size} examples, drawn "
            f"independently per step (q = {q:.6g}).",
            "Neighbouring datasets: differ by replacing one example (the dataset "
            "size is public); the sum's sensitivity is 2C, so the RDP analysis "
            "uses noise multiplier sigma/2.",
        ]
    lines += [
        f"Noise multiplier: sigma = {sigma:g}",
    ]
    if clip is not None:
        lines.append(f"Clipping norm: C = {clip:g}")
    lines += [
        f"Steps: {steps}",
        f"delta: {delta_:g}",
    ]
    rdp_eps, dropped = _value(setting.with_accountant(RDP), steps, "epsilon", delta_)
    rdp_line = f"epsilon (RDP accountant): {_round_up(rdp_eps)}"
    if dropped:
        rdp_line += (" (some RDP orders failed to converge and were dropped; "
                     "valid but possibly loose)")
    lines.append(rdp_line)
    if setting.sampling == POISSON and rdp_eps > _PLD_STATEMENT_MAX_EPSILON:
        # PLD's grid grows with the privacy loss; at such ε it would need huge
        # memory and says nothing useful.
        lines.append(f"epsilon (PLD accountant): not computed (RDP epsilon above "
                     f"{_PLD_STATEMENT_MAX_EPSILON:g}: no meaningful guarantee)")
    elif setting.sampling == POISSON:
        pld_eps, _ = _value(setting.with_accountant(PLD), steps, "epsilon", delta_)
        lines.append(f"epsilon (PLD accountant): {_round_up(pld_eps)}")
    else:
        lines.append("epsilon (PLD accountant): not available (dp-accounting's PLD "
                     "accountant does not support fixed-size sampling)")
    lines.append(f"Computed with dp-accounting {_dp_accounting_version()}.")
    return "\n".join(lines)
