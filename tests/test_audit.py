"""Tests for dpjax.audit: the one-run audit of dpjax's real DP-SGD stays below the
accounted epsilon, and catches deliberately broken DP-SGD variants."""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import audit
import dpjax
from dpjax.clipping import ClippedGradient

# The strong demo configuration: 2000 canaries, 16 real examples, large canary
# gradients (10 C before clipping), sigma = 3, q = 0.5, 10 steps.
CONFIG = dict(noise_multiplier=3.0, steps=10, sampling_rate=0.5, num_canaries=2000, num_real=16)


# --------------------------------------------------------------------------
# Broken DP-SGD variants, built here (dpjax itself refuses to do these)
# --------------------------------------------------------------------------


def _noise_step(*, noise_multiplier, l2_clip_norm, expected_batch_size, learning_rate, seed,
                key_per_step=True, extra_divide=1.0):
    """A hand-written noise step (+ SGD) taking a ClippedGradient, with planted bugs."""
    sgd = optax.sgd(learning_rate)
    key0 = jax.random.PRNGKey(seed)

    def init(params):
        return (jnp.zeros((), jnp.int32), sgd.init(params))

    def update(g: ClippedGradient, state, params=None):
        step, inner = state
        key = jax.random.fold_in(key0, step) if key_per_step else key0  # bug: same key every step
        leaves, treedef = jax.tree_util.tree_flatten(g.sum)
        keys = jax.random.split(key, len(leaves))
        std = noise_multiplier * l2_clip_norm / extra_divide  # bug: noise / B a second time
        noisy = [(x + std * jax.random.normal(k, x.shape, x.dtype)) / expected_batch_size
                 for k, x in zip(keys, leaves)]
        updates, inner = sgd.update(jax.tree_util.tree_unflatten(treedef, noisy), inner, params)
        return updates, (step + 1, inner)

    return optax.GradientTransformation(init, update)


def _no_noise(**kw):
    # The claimed sigma is accounted, but only sigma = 1e-6 is added.
    return audit.default_optimizer_factory(**{**kw, "noise_multiplier": 1e-6})


def _noise_divided_twice(*, noise_multiplier, l2_clip_norm, sampler, seed, learning_rate):
    return _noise_step(noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
                       expected_batch_size=sampler.expected_batch_size, learning_rate=learning_rate,
                       seed=seed, extra_divide=sampler.expected_batch_size)


def _reused_key(*, noise_multiplier, l2_clip_norm, sampler, seed, learning_rate):
    return _noise_step(noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
                       expected_batch_size=sampler.expected_batch_size, learning_rate=learning_rate,
                       seed=seed, key_per_step=False)


def _clipping_skipped(loss_fn, *, l2_clip_norm, **kw):
    # Clips at 100 C (so the 10 C canaries pass unclipped) but claims sensitivity C.
    grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=100 * l2_clip_norm, **kw)
    return lambda *a, **k: grad_fn(*a, **k).replace(sensitivity=l2_clip_norm)


BROKEN = {
    "no_noise": dict(optimizer_factory=_no_noise),
    "noise_divided_by_batch_twice": dict(optimizer_factory=_noise_divided_twice),
    "clipping_skipped": dict(clip_factory=_clipping_skipped),
    "prng_key_reused": dict(optimizer_factory=_reused_key),
}


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def test_one_run_bound_basic_properties():
    # All right guesses: the bound grows with the number of guesses, ~log(r / 3).
    b200 = audit.one_run_epsilon_lower_bound(1000, 200, 200, delta=1e-5)
    b1000 = audit.one_run_epsilon_lower_bound(1000, 1000, 1000, delta=1e-5)
    assert 3.5 < b200 < b1000 < 6.5
    # Chance-level guessing gives nothing; more right guesses never lower the bound.
    assert audit.one_run_epsilon_lower_bound(1000, 200, 100, delta=1e-5) == 0.0
    bounds = [audit.one_run_epsilon_lower_bound(1000, 200, v, delta=1e-5) for v in range(100, 201, 10)]
    assert bounds == sorted(bounds)
    # The bound is where the p-value crosses 1 - confidence.
    eps = audit.one_run_epsilon_lower_bound(1000, 200, 160, delta=1e-5)
    assert audit.one_run_p_value(1000, 200, 160, eps, 1e-5) <= 0.05
    assert audit.one_run_p_value(1000, 200, 160, eps + 0.01, 1e-5) > 0.05
    # A larger delta weakens the bound.
    assert audit.one_run_epsilon_lower_bound(1000, 200, 200, delta=1e-3) < b200


def test_one_run_bound_is_valid_for_randomized_response():
    # eps-DP randomized response on each canary bit: the bound exceeds eps in
    # at most ~5% of trials.
    rng = np.random.default_rng(0)
    eps, m = 1.0, 400
    over = 0
    for _ in range(40):
        included = rng.random(m) < 0.5
        keep = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
        scores = np.where(keep == included, 1.0, -1.0) + 1e-3 * rng.standard_normal(m)
        res = audit.one_run_audit(scores, included, delta=0.0, num_guesses=m)
        over += res.epsilon_lower > eps
    assert over <= 5


def test_clopper_pearson_and_multi_run_bound():
    lo, hi = audit.clopper_pearson(5, 100, 0.05)
    assert 0.016 < lo < 0.017 and 0.11 < hi < 0.12
    assert audit.clopper_pearson(0, 10)[0] == 0.0 and audit.clopper_pearson(10, 10)[1] == 1.0
    perfect = audit.multi_run_epsilon_lower_bound(0, 500, 0, 500, delta=1e-5)
    assert 4.5 < perfect < 5.5
    assert audit.multi_run_epsilon_lower_bound(250, 500, 250, 500, delta=1e-5) == 0.0


def test_roc_and_membership_metrics():
    r = audit.membership_inference([3, 4, 5], [0, 1, 2])
    assert r.auc == 1.0 and r.tpr_at_fpr[0.01] == 1.0
    r = audit.membership_inference([1, 1], [1, 1])
    assert r.auc == 0.5
    fpr, tpr = audit.roc_curve([2, 0], [1, 3])
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1


# --------------------------------------------------------------------------
# The white-box audit of dpjax's real DP-SGD
# --------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["accumulation", "microbatch", "nnx"])
def test_every_supported_loop_form_passes_the_audit(loop):
    """The canaries go through the loop exactly as a user writes it (sampler.take,
    clipped_grad, privatize with provenance checks): nothing is flagged."""
    res = audit.audit_dpsgd(seed=0, loop=loop, **CONFIG)
    assert 0.0 <= res.epsilon_lower <= res.epsilon_accounted, res.summary()
    assert res.audits["sum"].num_correct > 0.55 * res.audits["sum"].num_guesses
    assert res.setting["loop"] == loop


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_real_dpsgd_lower_bound_below_accounted(seed):
    res = audit.audit_dpsgd(seed=seed, **CONFIG)
    assert res.epsilon_accounted == pytest.approx(2.36, abs=0.05)
    assert 0.0 <= res.epsilon_lower <= res.epsilon_accounted
    # The audit is not vacuous: the sum score finds most included canaries.
    assert res.audits["sum"].num_correct > 0.55 * res.audits["sum"].num_guesses


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_broken_dpsgd_is_caught(variant):
    res = audit.audit_dpsgd(seed=0, **CONFIG, **BROKEN[variant])
    # Clearly above the accounted epsilon (2.36).
    assert res.epsilon_lower > res.epsilon_accounted + 1.0, res.summary()


def test_black_box_input_canaries_detect_memorisation():
    # Mislabelled digits canaries, non-private training: the model memorises the
    # included ones, and the black-box one-run audit shows it.
    res = audit.audit_input_canaries(num_canaries=200, num_real=100, steps=300,
                                     noise_multiplier=None, seed=0)
    assert res.epsilon_lower > 2.0, res.audits["loss"]


def test_canary_contribution_is_exactly_c_times_direction():
    """A canary row's gradient canary_norm·u_j is clipped by the real clipped_grad to C·u_j."""
    c = 0.7
    directions = jnp.asarray(audit.canary_directions(5, 3, seed=0))
    loss = audit._with_canaries(lambda p, x: jnp.zeros((x.shape[0], 10)) + p["w"][0], lambda p: p["w"], 10 * c)
    batch = audit._canary_population(np.zeros((0, 2)), np.zeros(0), np.array([True, False, True]))
    g = dpjax.clipped_grad(loss, l2_clip_norm=c)({"w": jnp.zeros(5)}, batch, directions)
    np.testing.assert_allclose(g.sum["w"], c * (directions[0] + directions[2]), rtol=1e-6)
    assert int(g.num_examples) == 2


# --------------------------------------------------------------------------
# Membership inference on trained models
# --------------------------------------------------------------------------


def test_membership_inference_private_vs_overfit():
    # Non-private Adam, 300 full-batch steps on 40 examples: memorises them.
    overfit = audit.membership_audit(num_members=40, steps=300, noise_multiplier=None,
                                     learning_rate=1e-2)
    # dpjax DP-SGD at sigma = 50, 50 steps, q = 1 (accounted epsilon ~0.5 at delta 1e-5).
    private = audit.membership_audit(num_members=200, steps=50, noise_multiplier=50.0,
                                     sampling_rate=1.0, learning_rate=0.5)
    assert overfit["loss"].auc > 0.7, overfit["loss"].auc
    assert overfit["label_only"].auc > 0.55, overfit["label_only"].auc
    assert abs(private["loss"].auc - 0.5) < 0.1, private["loss"].auc
    assert abs(private["label_only"].auc - 0.5) < 0.1, private["label_only"].auc
    assert set(overfit["loss"].tpr_at_fpr) == {0.001, 0.01}


def test_cli_audit_writes_plot(tmp_path):
    out = tmp_path / "audit"
    proc = subprocess.run(
        [sys.executable, "-m", "dpjax", "audit", "--num-canaries", "200", "--steps", "4", "--loop", "nnx",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "empirical epsilon lower bound" in proc.stdout and "(nnx loop)" in proc.stdout
    assert "accounted epsilon" in proc.stdout
    assert (out / "audit_scores.png").stat().st_size > 1000
    assert (out / "audit.json").exists()


def test_cli_audits_the_demo_configuration(tmp_path, capsys):
    from dpjax import cli

    assert cli.main(["audit", "--demo-config", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1437 real digits examples" in out and "q = 1" in out
    lower = float(out.split("empirical epsilon lower bound = ")[1].split()[0])
    accounted = float(out.split("accounted epsilon             = ")[1].split()[0])
    assert 0 <= lower <= accounted <= 3.0
    assert (tmp_path / "audit_scores.png").exists()
