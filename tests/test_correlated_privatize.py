"""Correlated noise inside dpjax.privatize (noise=BandMF / TreeAggregation): the
noise the optimizer receives has the strategy's covariance across steps, the
ledger accounts the mechanism (b = 1 is DP-SGD; trees are Gaussian mechanisms of
their sensitivity), samplers that break the participation are refused, a resumed
run restores the noise buffers bit for bit, and the one-run canary audit passes."""

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax import accounting, correlated_noise as cn, datasets, models
from dpjax.sampling import CyclicPoissonSampler, PoissonSampler

N, DIM = 64, 8


def zero_loss(w, batch):  # gradient 0 for every example: what reaches the optimizer is the noise alone
    return jnp.mean(batch["x"] * 0.0) * jnp.sum(w)


def _data():
    return {"x": np.ones((N, 1), np.float32)}


def injected_noise(noise, steps, samples, partitions=4, sigma=1.0, clip=2.0):
    """(samples, steps) noisy gradients with zero clipped sums: one run with ``samples``
    coordinates, which are independent and identically distributed."""
    sampler = CyclicPoissonSampler(N, partitions=partitions, sampling_rate=1.0, seed=0)
    tx = dpjax.privatize(optax.identity(), noise_multiplier=sigma, l2_clip_norm=clip, sampler=sampler,
                         seed=0, noise=noise)
    grad_fn = dpjax.clipped_grad(zero_loss, l2_clip_norm=clip)
    w = jnp.zeros(samples)
    step = jax.jit(lambda st, batch: tx.update(grad_fn(w, batch), st, w))
    state, out, data = tx.init(w), [], _data()
    for _ in range(steps):
        updates, state = step(state, sampler.sample().take(data))
        out.append(np.asarray(updates))
    return np.stack(out, axis=1) / (sigma * clip / sampler.expected_batch_size)


def _tree_step_matrix(steps, restart=None):
    """Steps × nodes: step t's noise is Σ ± node noises (N_τ − N_τ−1 of its tree)."""
    nodes, rows = {}, []
    prefix = lambda tree, tau: {(tree,) + n for n in cn.tree_nodes(tau)}  # noqa: E731
    for t in range(steps):
        tree, tau = (0, t + 1) if restart is None else (t // restart, t % restart + 1)
        now, before = prefix(tree, tau), prefix(tree, tau - 1)
        row = {}
        for n in now - before:
            row[nodes.setdefault(n, len(nodes))] = 1.0
        for n in before - now:
            row[nodes.setdefault(n, len(nodes))] = -1.0
        rows.append(row)
    m = np.zeros((steps, len(nodes)))
    for t, row in enumerate(rows):
        for j, v in row.items():
            m[t, j] = v
    return m


def _empirical_cov(x):  # (samples, steps) -> steps × steps
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("noise, expected", [
    (cn.BandMF(bands=3), lambda t: np.linalg.inv(cn.strategy_matrix(cn.BandMF(bands=3).unit_coefficients(), t))),
    (cn.TreeAggregation(), lambda t: _tree_step_matrix(t, restart=4)),
    (cn.TreeAggregation(restarts=False), lambda t: _tree_step_matrix(t)),
    (None, lambda t: np.eye(t)),
])
def test_injected_noise_has_the_strategys_covariance_across_steps(noise, expected):
    steps = 9
    samples = injected_noise(noise, steps, samples=40_000)
    m = expected(steps)
    np.testing.assert_allclose(_empirical_cov(samples), m @ m.T, atol=0.06)
    # The point of it: the noise of the prefix sums (what SGD's parameters follow) is smaller.
    if noise is not None:
        assert np.cumsum(samples, axis=1)[:, -1].var() < 0.8 * steps


def test_tree_prefix_noise_is_the_sum_of_its_nodes_inside_jit():
    key = jax.random.PRNGKey(3)
    like = jnp.zeros(5)
    step_noise = jax.jit(lambda t: cn.tree_step_noise(key, t, like))
    total = sum(np.asarray(step_noise(t)) for t in range(11))
    np.testing.assert_allclose(total, np.asarray(cn.tree_prefix_noise(key, 11, like, height=4)), atol=1e-5)


def test_one_band_is_dp_sgd_bit_for_bit():
    data = {"x": np.random.default_rng(0).normal(size=(N, DIM)).astype(np.float32)}

    def loss(w, b):
        return jnp.mean((b["x"] @ w - 1.0) ** 2)

    def run(noise):
        sampler = PoissonSampler(N, expected_batch_size=8, seed=1)
        tx = dpjax.privatize(optax.sgd(0.1), noise_multiplier=1.3, l2_clip_norm=1.0, sampler=sampler, seed=5,
                             noise=noise)
        grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=1.0)
        w, st = jnp.zeros(DIM), None
        st = tx.init(w)
        for _ in range(6):
            u, st = tx.update(grad_fn(w, sampler.sample().take(data)), st, w)
            w = optax.apply_updates(w, u)
        return np.asarray(w), dpjax.epsilon(st, 1e-5)

    w0, e0 = run(None)
    w1, e1 = run(cn.BandMF(bands=1))
    np.testing.assert_array_equal(w0, w1)
    assert e0 == e1 == pytest.approx(accounting.epsilon(noise_multiplier=1.3, steps=6, sampling_rate=8 / N,
                                                      delta=1e-5), rel=1e-6)  # σ, q as float32


def _state_after(noise, steps, partitions=4, sigma=2.0, q=0.5):
    sampler = CyclicPoissonSampler(N, partitions=partitions, sampling_rate=q, seed=0)
    tx = dpjax.privatize(optax.sgd(0.1), noise_multiplier=sigma, l2_clip_norm=1.0, sampler=sampler, seed=0,
                         noise=noise)
    st = tx.init(jnp.zeros(DIM))
    return st._replace(ledger=st.ledger._replace(steps=jnp.int32(steps)))


def test_the_ledger_accounts_bandmf_as_one_dp_sgd_step_per_pass():
    st = _state_after(cn.BandMF(bands=4), steps=10)
    assert dpjax.epsilon(st, 1e-5) == accounting.epsilon(noise_multiplier=2.0, steps=3, sampling_rate=0.5,
                                                         delta=1e-5)
    assert "banded matrix factorisation (BandMF), 4 bands" in dpjax.privacy_statement(st, 1e-5)


@pytest.mark.parametrize("restarts, sensitivity_squared", [(True, 3 * 3), (False, 3 * 3 * 4)])
def test_the_ledger_accounts_a_tree_as_a_gaussian_mechanism_of_its_sensitivity(restarts, sensitivity_squared):
    # 10 steps over 4 parts: 3 passes. Restarts: 3 trees of height 3, one leaf each (Δ² = 3·3);
    # one tree of height 4 (10 steps) and 3 participations: Δ ≤ 3·√4.
    st = _state_after(cn.TreeAggregation(restarts=restarts), steps=10)
    assert cn.tree_sensitivity(10, 3, restart_every=4 if restarts else None) ** 2 == pytest.approx(
        sensitivity_squared)
    acct = dp_accounting.rdp.RdpAccountant()
    acct.compose(dp_accounting.GaussianDpEvent(2.0 / np.sqrt(sensitivity_squared)))
    assert dpjax.epsilon(st, 1e-5) == pytest.approx(acct.get_epsilon(1e-5), rel=0.02)
    assert "without amplification" in dpjax.privacy_statement(st, 1e-5)


def test_the_budget_guard_counts_correlated_steps():
    sampler = CyclicPoissonSampler(N, partitions=4, sampling_rate=0.5, seed=0)
    tx = dpjax.privatize(optax.sgd(0.1), noise_multiplier=2.0, l2_clip_norm=1.0, sampler=sampler, seed=0,
                         noise=cn.BandMF(bands=4), target_epsilon=2.0, target_delta=1e-5)
    allowed = int(tx.init(jnp.zeros(DIM)).ledger.max_steps)
    passes = accounting.max_steps(target_epsilon=2.0, delta=1e-5, noise_multiplier=2.0, sampling_rate=0.5)
    assert allowed == 4 * passes > 0
    grad_fn = dpjax.clipped_grad(zero_loss, l2_clip_norm=1.0)
    step = jax.jit(lambda w, st, b: tx.update(grad_fn(w, b), st, w))
    w, st = jnp.zeros(DIM), tx.init(jnp.zeros(DIM))
    for _ in range(allowed - 1):
        _, st = step(w, st, sampler.sample().take(_data()))
    dpjax.check_budget(st)  # one allowed step left
    _, st = step(w, st, sampler.sample().take(_data()))
    with pytest.raises(dpjax.PrivacyBudgetExceeded):
        dpjax.check_budget(st)
    updates, st = step(w, st, sampler.sample().take(_data()))  # refused inside jit: nothing applied
    assert dpjax.steps_taken(st) == allowed and int(st.ledger.refused_steps) == 1
    assert not np.any(np.asarray(updates))


@pytest.mark.parametrize("noise, sampler, match", [
    (cn.BandMF(bands=4), PoissonSampler(N, expected_batch_size=8, seed=0), "CyclicPoissonSampler"),
    (cn.BandMF(bands=4), CyclicPoissonSampler(N, partitions=2, sampling_rate=0.5, seed=0), "fewer than the 4 bands"),
    (cn.TreeAggregation(), PoissonSampler(N, expected_batch_size=8, seed=0), "CyclicPoissonSampler"),
    (cn.TreeAggregation(), None, "needs sampler="),
    ("bandmf", CyclicPoissonSampler(N, partitions=2, sampling_rate=0.5, seed=0), "noise must be None"),
])
def test_samplers_that_break_the_participation_are_refused(noise, sampler, match):
    kw = dict(sampler=sampler) if sampler is not None else dict(expected_batch_size=8, num_examples=N)
    with pytest.raises((ValueError, TypeError), match=match):
        dpjax.privatize(optax.sgd(0.1), noise_multiplier=1.0, l2_clip_norm=1.0, noise=noise, **kw)


def test_a_batch_of_another_partitioning_is_refused_inside_jit():
    # Same N, q and parts, another secret partitioning: an example could be in consecutive steps.
    ours = CyclicPoissonSampler(N, partitions=4, sampling_rate=0.5, seed=0)
    other = CyclicPoissonSampler(N, partitions=4, sampling_rate=0.5, seed=1)
    assert ours.partition_id != other.partition_id
    tx = dpjax.privatize(optax.sgd(0.1), noise_multiplier=1.0, l2_clip_norm=1.0, sampler=ours, seed=0,
                         noise=cn.BandMF(bands=4))
    grad_fn = dpjax.clipped_grad(zero_loss, l2_clip_norm=1.0)
    w = jnp.zeros(DIM)
    st = tx.init(w)
    with pytest.raises(dpjax.BatchProvenanceError, match="partitioning"):
        tx.update(grad_fn(w, other.batch_at(0).take(_data())), st, w)
    step = jax.jit(lambda st, b: tx.update(grad_fn(w, b), st, w))
    with pytest.warns(dpjax.BatchProvenanceWarning):
        updates, st2 = step(st, other.batch_at(0).take(_data()))
        jax.block_until_ready(updates)
    assert dpjax.steps_taken(st2) == 0 and not np.any(np.asarray(updates))
    np.testing.assert_array_equal(np.asarray(st2.noise_state), np.asarray(st.noise_state))
    with pytest.raises(dpjax.BatchProvenanceError):
        dpjax.check_budget(st2)
    updates, st3 = step(st, ours.batch_at(0).take(_data()))  # the right batch is accepted
    assert dpjax.steps_taken(st3) == 1


SETTINGS = dict(epochs=3, batch_size=64, l2_clip_norm=1.0, target_epsilon=8.0, seed=0, progress=False,
                learning_rate=1.0)


@pytest.fixture(scope="module")
def digits():
    return datasets.load_digits()


@pytest.mark.parametrize("noise", [cn.BandMF(bands=4)])  # the tree keeps no buffers (stateless node keys)
def test_fit_resumes_the_noise_buffers_bit_for_bit(digits, noise, tmp_path):
    whole = dpjax.fit(models.MLP(), digits, noise=noise, **SETTINGS)
    dpjax.fit(models.MLP(), digits, noise=noise, checkpoint_dir=str(tmp_path), checkpoint_every=5, max_steps=7,
              **SETTINGS)
    resumed = dpjax.fit(models.MLP(), digits, noise=noise, checkpoint_dir=str(tmp_path), resume=True, **SETTINGS)
    for a, b in zip(jax.tree_util.tree_leaves(whole.opt_state), jax.tree_util.tree_leaves(resumed.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert whole.history[-1] == resumed.history[-1]  # (the interrupted call also logged its last step)
    if isinstance(noise, cn.BandMF):
        assert np.any(np.asarray(jax.tree_util.tree_leaves(resumed.opt_state.noise_state)[0]))
    led = resumed.opt_state.ledger
    assert int(led.mechanism) == noise.code and int(led.partitions) == 22  # 1437 // 64 parts, one per step
    assert resumed.history[-1]["epsilon"] <= 8.0


def test_fit_refuses_to_resume_with_another_noise(digits, tmp_path):
    dpjax.fit(models.MLP(), digits, noise=cn.BandMF(bands=4), checkpoint_dir=str(tmp_path), checkpoint_every=5,
              max_steps=5, **SETTINGS)
    with pytest.raises(Exception, match="noise"):
        dpjax.fit(models.MLP(), digits, noise=cn.BandMF(bands=2), checkpoint_dir=str(tmp_path), resume=True,
                  **SETTINGS)


def test_fit_refuses_what_its_samplers_cannot_account_before_training(digits):
    from dpjax import parallel

    with pytest.raises(ValueError, match="not supported with mesh="):  # the sharded sampler is not cyclic
        dpjax.fit(models.MLP(), digits, noise=cn.BandMF(bands=2), mesh=parallel.data_mesh(), **SETTINGS)
    with pytest.raises(ValueError, match=r"partitions must be in \[bands=4"):
        dpjax.fit(models.MLP(), digits, noise=cn.BandMF(bands=4), partitions=3, **SETTINGS)
    with pytest.raises(TypeError, match="noise must be None"):
        dpjax.fit(models.MLP(), digits, noise="bandmf", **SETTINGS)


@pytest.mark.parametrize("noise", [cn.BandMF(bands=4), cn.TreeAggregation()])
def test_the_one_run_canary_audit_passes_with_correlated_noise(noise):
    from dpjax import audit

    result = audit.audit_dpsgd(noise=noise, partitions=4, steps=8, sampling_rate=0.5, noise_multiplier=1.5)
    assert result.epsilon_lower <= result.epsilon_accounted, result.summary()
    assert result.setting["partitions"] == 4


def test_the_audit_catches_correlated_noise_that_is_smaller_than_claimed():
    from dpjax import audit

    def planted(*, noise_multiplier, **kw):  # claims σ, adds a tenth of it
        return audit.default_optimizer_factory(noise_multiplier=noise_multiplier / 10, **kw)

    result = audit.audit_dpsgd(noise=cn.BandMF(bands=4), partitions=4, steps=8, sampling_rate=0.5,
                               noise_multiplier=6.0, optimizer_factory=planted)
    assert result.epsilon_lower > result.epsilon_accounted, result.summary()
