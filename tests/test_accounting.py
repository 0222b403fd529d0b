"""Tests for dpjax.accounting against the real dp_accounting (no mocks)."""

from __future__ import annotations

import doctest
import logging
import math
import re
import subprocess
import sys
import warnings

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from dpjax import accounting
from dpjax.accounting import (
    BudgetGuard,
    PrivacyBudgetExceeded,
    RdpConvergenceWarning,
    calibrate_noise_multiplier,
    dp_event,
    epsilon,
    max_steps,
    privacy_statement,
)

# TF Privacy MNIST tutorial: 60,000 examples, batch 256, sigma 1.1, 60 epochs.
N, B, SIGMA, EPOCHS, DELTA = 60000, 256, 1.1, 60, 1e-5
Q = B / N
STEPS = math.ceil(EPOCHS * N / B)  # 14063, TF Privacy's convention
MNIST = dict(noise_multiplier=SIGMA, sampling_rate=Q, steps=STEPS)

# A setting where dp_accounting's RDP accountant fails to converge for the
# fractional orders 1.1-1.5 (and logs one "failed to converge" per order).
NONCONVERGING = dict(noise_multiplier=1.0, sampling_rate=0.1, steps=100)


def poisson_event(q, sigma, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


def direct_rdp(q, sigma, steps, delta):
    return RdpAccountant().compose(poisson_event(q, sigma, steps)).get_epsilon(delta)


def direct_pld(q, sigma, steps, delta, interval=1e-4):
    acct = PLDAccountant(value_discretization_interval=interval)
    return acct.compose(poisson_event(q, sigma, steps)).get_epsilon(delta)


def direct_fixed_size_rdp(n, b, sigma, steps, delta):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            n, b, dp_accounting.GaussianDpEvent(sigma / 2)), steps)
    acct = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    return acct.compose(event).get_epsilon(delta)


@pytest.fixture(autouse=True)
def _no_stray_warnings():
    # Any RdpConvergenceWarning a test does not expect fails it. (The warning is
    # shown once per setting and process: forget the ones shown by earlier tests.)
    accounting._WARNED_SETTINGS.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RdpConvergenceWarning)
        yield


# --------------------------------------------------------------------------
# Agreement with dp_accounting
# --------------------------------------------------------------------------


@pytest.mark.parametrize("q,sigma,steps,delta", [
    (Q, SIGMA, STEPS, DELTA),
    (0.01, 2.0, 1000, 1e-6),
    (1.0, 5.0, 10, 1e-5),
])
def test_rdp_epsilon_equals_dp_accounting(q, sigma, steps, delta):
    got = epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=delta)
    assert got == direct_rdp(q, sigma, steps, delta)


@pytest.mark.parametrize("q,sigma,steps,delta", [
    (Q, SIGMA, STEPS, DELTA),
    (0.01, 2.0, 100, 1e-6),
])
def test_pld_epsilon_equals_dp_accounting(q, sigma, steps, delta):
    got = epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=delta,
                  accountant="pld")
    assert got == direct_pld(q, sigma, steps, delta)


def test_dataset_and_batch_size_give_the_same_poisson_rate():
    a = epsilon(noise_multiplier=SIGMA, dataset_size=N, batch_size=B, steps=STEPS,
                delta=DELTA)
    assert a == epsilon(delta=DELTA, **MNIST)


@pytest.mark.parametrize("n,b,sigma,steps", [(N, B, SIGMA, STEPS), (1000, 10, 2.0, 500)])
def test_fixed_size_uses_replace_one_and_half_sigma(n, b, sigma, steps):
    got = epsilon(noise_multiplier=sigma, steps=steps, delta=DELTA, sampling="fixed_size",
                  dataset_size=n, batch_size=b)
    assert got == direct_fixed_size_rdp(n, b, sigma, steps, DELTA)
    # sigma/2 matters: with sigma itself dp_accounting reports a smaller epsilon.
    assert got > direct_fixed_size_rdp(n, b, 2 * sigma, steps, DELTA)


def test_dp_event_structure():
    ev = dp_event(noise_multiplier=1.3, sampling_rate=0.02, steps=7)
    assert ev == poisson_event(0.02, 1.3, 7)
    ev = dp_event(noise_multiplier=1.3, steps=7, sampling="fixed_size",
                  dataset_size=500, batch_size=20)
    assert ev == dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            500, 20, dp_accounting.GaussianDpEvent(0.65)), 7)
    assert dp_event(noise_multiplier=1.3, sampling_rate=0.02, steps=0) == \
        dp_accounting.NoOpDpEvent()


def test_fixed_size_refuses_pld():
    with pytest.raises(ValueError, match="only supported with accountant='rdp'"):
        epsilon(noise_multiplier=1.0, steps=10, delta=DELTA, sampling="fixed_size",
                dataset_size=100, batch_size=10, accountant="pld")


# --------------------------------------------------------------------------
# The MNIST tutorial numbers
# --------------------------------------------------------------------------


def test_mnist_tutorial_epsilons():
    assert STEPS == 14063
    assert epsilon(delta=DELTA, **MNIST) == pytest.approx(2.597, abs=1e-3)
    assert epsilon(delta=DELTA, accountant="pld", **MNIST) == pytest.approx(2.382, abs=1e-3)


def test_published_3_01_is_the_old_rdp_conversion():
    """The published ε = 3.01 is the classic conversion of the same RDP curve.

    Classic (Mironov 2017, Prop. 3): ε = min_α RDP(α) + log(1/δ) / (α - 1),
    over TF Privacy's historical orders.  dp_accounting now uses the tighter
    conversion of Canonne, Kamath & Steinke (2020), which gives 2.597.
    """
    old_orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    acct = RdpAccountant(orders=old_orders).compose(poisson_event(Q, SIGMA, STEPS))
    rdp, orders = acct.rdp, acct.orders
    assert np.all(np.isfinite(rdp))
    classic = float(np.min(rdp + math.log(1 / DELTA) / (orders - 1)))
    assert round(classic, 2) == 3.01
    # Same RDP curve, new conversion: what dpjax reports.
    assert acct.get_epsilon(DELTA) == pytest.approx(epsilon(delta=DELTA, **MNIST), abs=1e-9)


# --------------------------------------------------------------------------
# delta, steps = 0, calibration, max_steps
# --------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_delta_inverts_epsilon(accountant):
    eps = epsilon(delta=DELTA, accountant=accountant, **MNIST)
    d = accounting.delta(epsilon=eps, accountant=accountant, **MNIST)
    assert d == pytest.approx(DELTA, rel=1e-3)
    # Monotone: a larger epsilon needs a smaller delta.
    assert accounting.delta(epsilon=eps * 1.1, accountant=accountant, **MNIST) < d


def test_delta_equals_dp_accounting():
    got = accounting.delta(epsilon=1.5, **MNIST)
    want = RdpAccountant().compose(poisson_event(Q, SIGMA, STEPS)).get_delta(1.5)
    assert got == want


@pytest.mark.parametrize("kwargs", [
    dict(sampling_rate=0.01),
    dict(sampling_rate=0.01, accountant="pld"),
    dict(sampling="fixed_size", dataset_size=100, batch_size=10),
])
def test_zero_steps_is_exactly_zero(kwargs):
    assert epsilon(noise_multiplier=1.0, steps=0, delta=DELTA, **kwargs) == 0.0
    assert accounting.delta(noise_multiplier=1.0, steps=0, epsilon=0.0, **kwargs) == 0.0


def test_calibrate_round_trip_rdp():
    tol = 1e-3
    sigma = calibrate_noise_multiplier(target_epsilon=3.0, delta=DELTA, sampling_rate=Q,
                                       steps=STEPS, tol=tol)
    eps = epsilon(noise_multiplier=sigma, sampling_rate=Q, steps=STEPS, delta=DELTA)
    assert eps <= 3.0
    assert eps > 3.0 - 0.01
    assert epsilon(noise_multiplier=sigma - 2 * tol, sampling_rate=Q, steps=STEPS,
                   delta=DELTA) > 3.0
    # The tutorial's sigma = 1.1 spends 2.597 < 3, so 3.0 needs less noise.
    assert 1.0 < sigma < SIGMA


def test_calibrate_round_trip_pld():
    kwargs = dict(sampling_rate=0.05, steps=200, delta=DELTA)
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, accountant="pld", **kwargs)
    assert epsilon(noise_multiplier=sigma, accountant="pld", **kwargs) <= 2.0
    assert epsilon(noise_multiplier=sigma - 2e-3, accountant="pld", **kwargs) > 2.0
    # PLD is tighter, so it needs less noise than RDP for the same target.
    assert sigma < calibrate_noise_multiplier(target_epsilon=2.0, **kwargs)


def test_calibrate_fixed_size():
    kwargs = dict(steps=100, delta=DELTA, sampling="fixed_size", dataset_size=1000,
                  batch_size=10)
    sigma = calibrate_noise_multiplier(target_epsilon=4.0, **kwargs)
    assert epsilon(noise_multiplier=sigma, **kwargs) <= 4.0
    assert epsilon(noise_multiplier=sigma - 2e-3, **kwargs) > 4.0


def test_calibrate_impossible_targets():
    with pytest.raises(ValueError, match="cannot be met"):
        calibrate_noise_multiplier(target_epsilon=0.01, delta=DELTA, sampling_rate=1.0,
                                   steps=10**6)
    with pytest.raises(ValueError, match="so loose"):
        calibrate_noise_multiplier(target_epsilon=1e6, delta=DELTA, sampling_rate=0.01,
                                   steps=10)
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(target_epsilon=0.0, delta=DELTA, sampling_rate=0.01,
                                   steps=10)
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise_multiplier(target_epsilon=1.0, delta=DELTA, sampling_rate=0.01,
                                   steps=0)


@pytest.mark.parametrize("accountant,q,sigma,target", [
    ("rdp", Q, SIGMA, 3.0),
    ("rdp", 0.01, 1.0, 2.0),
    ("pld", 0.05, 1.5, 2.0),
])
def test_max_steps_boundary(accountant, q, sigma, target):
    n = max_steps(target_epsilon=target, delta=DELTA, noise_multiplier=sigma,
                  sampling_rate=q, accountant=accountant)
    assert n > 0

    def eps(steps):
        return epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=DELTA,
                       accountant=accountant)

    assert eps(n) <= target < eps(n + 1)


def test_max_steps_mnist_covers_the_tutorial():
    # 60 epochs (14063 steps) spend 2.597 < 3, so a budget of 3 allows more.
    assert max_steps(target_epsilon=3.0, delta=DELTA, noise_multiplier=SIGMA,
                     sampling_rate=Q) > STEPS


def test_max_steps_zero_when_one_step_is_too_many():
    assert max_steps(target_epsilon=0.01, delta=DELTA, noise_multiplier=0.5,
                     sampling_rate=1.0) == 0
    assert max_steps(target_epsilon=0.0, delta=DELTA, noise_multiplier=1.0,
                     sampling_rate=0.01) == 0


def test_max_steps_is_capped():
    n = max_steps(target_epsilon=100.0, delta=DELTA, noise_multiplier=50.0,
                  sampling_rate=1e-4)
    assert n == accounting.MAX_STEPS_CAP


@settings(max_examples=200, deadline=None)
@given(
    increments=st.lists(st.floats(0, 3, allow_nan=False), min_size=1, max_size=60),
    target=st.floats(0, 40, allow_nan=False),
    guess=st.integers(1, 100),
)
def test_largest_feasible_search_matches_brute_force(increments, target, guess):
    # A non-decreasing step function on 1..len, constant afterwards.
    values = np.concatenate([[0.0], 0.1 + np.cumsum(increments)])
    cap = len(values) - 1

    def eps(n):
        return float(values[min(n, cap)])

    want = max(n for n in range(cap + 1) if n == 0 or eps(n) <= target)
    assert accounting._largest_feasible(eps, target, guess, cap) == want


# --------------------------------------------------------------------------
# BudgetGuard
# --------------------------------------------------------------------------


def test_budget_guard_stops_before_overspending():
    guard = BudgetGuard(target_epsilon=1.0, delta=DELTA, noise_multiplier=SIGMA,
                        sampling_rate=Q)
    assert guard.max_steps == max_steps(target_epsilon=1.0, delta=DELTA,
                                        noise_multiplier=SIGMA, sampling_rate=Q)
    steps_done = 0
    with pytest.raises(PrivacyBudgetExceeded) as info:
        while True:
            guard.check(steps_done)  # before the step
            steps_done += 1          # "apply" the noisy step
    assert steps_done == guard.max_steps
    assert guard.epsilon_spent(steps_done) <= 1.0
    assert guard.remaining(steps_done) == 0
    message = str(info.value)
    for piece in (f"{steps_done} noisy steps done", f"at most {guard.max_steps} steps",
                  "epsilon would be", "noise_multiplier", "target_epsilon=1"):
        assert piece in message
    would_be = float(re.search(r"epsilon would be ([0-9]+(?:\.[0-9]+)?)", message).group(1))
    assert would_be > 1.0


def test_budget_guard_blocks_and_remaining():
    guard = BudgetGuard(target_epsilon=2.0, delta=DELTA, noise_multiplier=1.0,
                        sampling_rate=0.01)
    m = guard.max_steps
    guard.check(0, upcoming=m)  # exactly the budget: allowed
    with pytest.raises(PrivacyBudgetExceeded):
        guard.check(0, upcoming=m + 1)
    with pytest.raises(PrivacyBudgetExceeded):
        guard.check(m + 5)       # already overspent (e.g. a restored run)
    assert guard.remaining(10) == m - 10
    assert guard.remaining(m + 5) == 0
    assert guard.epsilon_spent(0) == 0.0
    assert guard.epsilon_spent(100) == epsilon(noise_multiplier=1.0, sampling_rate=0.01,
                                               steps=100, delta=DELTA)
    with pytest.raises(ValueError, match="steps_done"):
        guard.check(-1)
    with pytest.raises(ValueError, match="target_epsilon"):
        BudgetGuard(target_epsilon=float("nan"), delta=DELTA, noise_multiplier=1.0,
                    sampling_rate=0.01)


# --------------------------------------------------------------------------
# dp_accounting's convergence log flood
# --------------------------------------------------------------------------


def test_convergence_failure_gives_one_warning_and_no_logs(caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with pytest.warns(RdpConvergenceWarning) as record:
        eps = epsilon(delta=DELTA, **NONCONVERGING)
    assert len(record) == 1
    message = str(record[0].message)
    assert "valid but possibly loose upper bound" in message
    assert "accountant='pld'" in message
    assert "1.1" in message
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]
    out, err = capfd.readouterr()
    assert "failed to converge" not in out + err
    # Same number as dp_accounting gives (it just does not hide the logs).
    assert eps == direct_rdp(0.1, 1.0, 100, DELTA)
    # PLD does not drop orders: no warning, and a tighter value.
    assert epsilon(delta=DELTA, accountant="pld", **NONCONVERGING) < eps


def test_convergence_warning_once_per_setting_without_a_source_line():
    with pytest.warns(RdpConvergenceWarning) as record:
        for _ in range(3):
            epsilon(delta=DELTA, **NONCONVERGING)
    assert len(record) == 1
    assert record[0].filename == "dpjax.accounting" and record[0].lineno == 0  # no source line to print
    with pytest.warns(RdpConvergenceWarning):  # another setting warns again
        epsilon(delta=DELTA, **dict(NONCONVERGING, noise_multiplier=0.9))


def test_convergence_warning_once_per_call_for_searches(caplog):
    caplog.set_level(logging.WARNING)
    with pytest.warns(RdpConvergenceWarning) as record:
        max_steps(target_epsilon=8.0, delta=DELTA, noise_multiplier=1.0, sampling_rate=0.1)
    assert len(record) == 1
    with pytest.warns(RdpConvergenceWarning) as record:
        calibrate_noise_multiplier(target_epsilon=8.0, delta=DELTA, sampling_rate=0.1,
                                   steps=100)
    assert len(record) == 1
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]


def test_convergence_warning_even_when_absl_is_silenced():
    absl = logging.getLogger("absl")
    old = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        with pytest.warns(RdpConvergenceWarning):
            epsilon(delta=DELTA, **NONCONVERGING)
    finally:
        absl.setLevel(old)
    assert absl.level == old


def test_unrelated_absl_records_are_not_lost(caplog):
    caplog.set_level(logging.WARNING)
    with accounting._capture_convergence_logs() as capture:
        logging.getLogger("absl").warning("something else %d", 42)
        logging.getLogger("absl").warning("x failed to converge y")
    assert capture.count == 1
    messages = [r.getMessage() for r in caplog.records]
    assert "something else 42" in messages
    assert not any("failed to converge" in m for m in messages)


def test_no_log_flood_and_no_logging_side_effect_in_a_fresh_process():
    code = (
        "import logging, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from dpjax import accounting\n"
        "accounting.epsilon(noise_multiplier=1.0, sampling_rate=0.1, steps=100,"
        " delta=1e-5)\n"
        "print('root handlers:', len(logging.getLogger().handlers))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "failed to converge" not in result.stdout + result.stderr
    assert "root handlers: 0" in result.stdout


# --------------------------------------------------------------------------
# PLD grid refinement
# --------------------------------------------------------------------------


def test_pld_grid_is_refined_when_coarser_than_rdp():
    q, sigma, steps = 1e-4, 5.0, 10**5
    rdp = direct_rdp(q, sigma, steps, DELTA)
    coarse = direct_pld(q, sigma, steps, DELTA, 1e-4)
    assert coarse > rdp  # the default grid is too coarse here
    got = epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=DELTA,
                  accountant="pld")
    assert got == direct_pld(q, sigma, steps, DELTA, 1e-5)
    assert got <= rdp


# --------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------

GOOD = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=10, delta=1e-5)


@pytest.mark.parametrize("change,name", [
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier"),
    (dict(noise_multiplier=float("inf")), "noise_multiplier"),
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(delta=2.0), "delta"),
    (dict(delta=float("nan")), "delta"),
    (dict(delta=-1e-5), "delta"),
    (dict(sampling_rate=0.0), "sampling_rate"),
    (dict(sampling_rate=1.5), "sampling_rate"),
    (dict(sampling_rate=float("nan")), "sampling_rate"),
    (dict(sampling_rate=None), "sampling_rate"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(sampling_rate=None, dataset_size=100, batch_size=101), "batch_size"),
    (dict(sampling_rate=None, dataset_size=0, batch_size=1), "dataset_size"),
    (dict(sampling_rate=0.5, dataset_size=100, batch_size=10), "sampling_rate"),
    (dict(accountant="moments"), "accountant"),
    (dict(accountant="RDP"), "accountant"),
    (dict(sampling="shuffle"), "sampling"),
    (dict(sampling="fixed_size"), "dataset_size"),
])
@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_bad_inputs_raise_value_error_naming_the_parameter(change, name, accountant):
    kwargs = dict(GOOD, accountant=accountant)
    kwargs.update(change)
    with pytest.raises(ValueError, match=name) as info:
        epsilon(**kwargs)
    # ... and says what is allowed.
    assert any(word in str(info.value)
               for word in ("allowed", "one of", "needs", "required"))


def test_delta_function_validates_epsilon():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="epsilon"):
            accounting.delta(noise_multiplier=1.0, sampling_rate=0.01, steps=10,
                             epsilon=bad)


def test_shuffle_error_explains_why_and_what_to_use():
    with pytest.raises(ValueError) as info:
        epsilon(noise_multiplier=1.0, sampling_rate=0.01, steps=10, delta=1e-5,
                sampling="shuffle")
    message = str(info.value)
    assert "exactly once per epoch" in message
    assert "overstate privacy" in message
    assert "PoissonSampler" in message and "fixed_size" in message


def test_numpy_and_jax_integer_steps_are_accepted():
    jnp = pytest.importorskip("jax.numpy")
    want = epsilon(**GOOD)
    assert epsilon(**dict(GOOD, steps=np.int64(10))) == want
    assert epsilon(**dict(GOOD, steps=jnp.asarray(10, dtype=jnp.int32))) == want


# --------------------------------------------------------------------------
# privacy_statement and docstrings
# --------------------------------------------------------------------------


def _number_after(label, text):
    return float(re.search(re.escape(label) + r"\s*([0-9]+(?:\.[0-9]+)?)", text).group(1))


def test_privacy_statement_poisson():
    text = privacy_statement(l2_clip_norm=1.0, delta=DELTA, **MNIST)
    assert "q = 0.00426667" in text
    assert "sigma = 1.1" in text
    assert "C = 1" in text
    assert "Steps: 14063" in text
    assert "delta: 1e-05" in text
    assert "adding or removing one example" in text
    rdp = _number_after("epsilon (RDP accountant):", text)
    pld = _number_after("epsilon (PLD accountant):", text)
    # Rounded up to 4 significant digits, never down.
    assert epsilon(delta=DELTA, **MNIST) <= rdp < epsilon(delta=DELTA, **MNIST) + 1e-3
    assert epsilon(delta=DELTA, accountant="pld", **MNIST) <= pld < 2.382 + 1e-3
    assert f"dp-accounting {accounting._dp_accounting_version()}" in text
    assert accounting._dp_accounting_version()[0].isdigit()


def test_privacy_statement_fixed_size():
    text = privacy_statement(noise_multiplier=2.0, steps=100, delta=DELTA,
                             sampling="fixed_size", dataset_size=1000, batch_size=10)
    assert "replacing one example" in text
    assert "q = 0.01" in text
    assert "PLD accountant): not available" in text
    rdp = _number_after("epsilon (RDP accountant):", text)
    want = direct_fixed_size_rdp(1000, 10, 2.0, 100, DELTA)
    assert want <= rdp <= want * 1.001


def test_privacy_statement_mentions_dropped_orders_without_warning():
    text = privacy_statement(delta=DELTA, **NONCONVERGING)
    assert "failed to converge" in text


def test_docstring_examples_run():
    result = doctest.testmod(accounting, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 10
    assert result.failed == 0
