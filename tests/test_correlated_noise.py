"""The banded Toeplitz strategy (dpjax.correlated_noise): the square root of the
prefix sums, the streamed noise C⁻¹z and its covariance, the sensitivity under
b-min-separated participation against a brute force, and b = 1 as DP-SGD."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import correlated_noise as cn


def test_the_full_toeplitz_square_root_squares_to_the_prefix_sums():
    steps = 12
    c = cn.strategy_matrix(cn.sqrt_prefix_sum_coefficients(steps), steps)
    np.testing.assert_allclose(c @ c, np.tril(np.ones((steps, steps))), atol=1e-12)


def _stream(coefficients, z):
    buffer = cn.init_buffer(coefficients, z[0])
    out = []
    for zt in z:
        w, buffer = cn.next_noise(coefficients, buffer, zt)
        out.append(w)
    return np.stack(out)


@pytest.mark.parametrize("bands", [1, 2, 4])
def test_the_streamed_noise_is_c_inverse_z(bands):
    steps = 10
    coefficients = cn.sqrt_prefix_sum_coefficients(bands)
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(bands), (steps, 3)), np.float64)
    want = np.linalg.solve(cn.strategy_matrix(coefficients, steps), z)
    np.testing.assert_allclose(_stream(coefficients, jnp.asarray(z, jnp.float32)), want, rtol=1e-5, atol=1e-5)


def test_the_noise_covariance_across_steps_is_the_strategys():
    steps, draws, bands = 6, 40_000, 3
    coefficients = cn.sqrt_prefix_sum_coefficients(bands)
    z = jax.random.normal(jax.random.PRNGKey(0), (steps, draws))  # each column one run
    w = _stream(coefficients, z)  # (steps, draws)
    inv = np.linalg.inv(cn.strategy_matrix(coefficients, steps))
    np.testing.assert_allclose(np.cov(w), inv @ inv.T, atol=0.03)
    assert abs(np.cov(w)[1, 0]) > 0.3  # really correlated: C⁻¹ has -1/2 below the diagonal


@pytest.mark.parametrize("bands,participations", [(1, 1), (1, 3), (2, 1), (2, 3), (3, 2), (4, 2)])
def test_sensitivity_matches_a_brute_force_over_separated_participations(bands, participations):
    steps = 10
    coefficients = cn.sqrt_prefix_sum_coefficients(bands)
    brute = cn.brute_force_sensitivity(cn.strategy_matrix(coefficients, steps), bands, participations)
    assert cn.sensitivity(coefficients, participations) == pytest.approx(brute, rel=1e-12)


def test_participations_closer_than_the_bands_would_cost_more():
    # Why the sampler must keep participations b apart: closer ones overlap and add up.
    coefficients = cn.sqrt_prefix_sum_coefficients(4)
    closer = cn.brute_force_sensitivity(cn.strategy_matrix(coefficients, 10), 1, 2)
    assert closer > cn.sensitivity(coefficients, 2) * 1.05


def test_one_band_is_dp_sgd():
    coefficients = cn.sqrt_prefix_sum_coefficients(1)
    assert coefficients.tolist() == [1.0] and cn.sensitivity(coefficients, 5) == pytest.approx(5 ** 0.5)
    z = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
    np.testing.assert_array_equal(_stream(coefficients, z), np.asarray(z))  # i.i.d. noise, as DP-SGD


@pytest.mark.parametrize("call,match", [
    (lambda: cn.sqrt_prefix_sum_coefficients(0), "bands"),
    (lambda: cn.sensitivity([0.0, 1.0]), "c\\[0\\] > 0"),
    (lambda: cn.sensitivity([1.0, float("nan")]), "finite"),
    (lambda: cn.sensitivity([1.0], participations=0), "participations"),
])
def test_bad_strategies_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_docstring_examples_run():
    result = doctest.testmod(cn)
    assert result.failed == 0 and result.attempted > 0


def test_cyclic_poisson_keeps_participations_apart_and_is_poisson_within_a_part():
    from dpjax.sampling import CyclicPoissonSampler

    n, parts, steps = 103, 4, 400
    sampler = CyclicPoissonSampler(n, partitions=parts, sampling_rate=0.3, seed=7)
    seen = {}
    counts = np.zeros(n)
    for t in range(steps):
        batch = sampler.sample()
        real = batch.indices[batch.mask]
        assert set(real.tolist()) <= set(sampler.partition(t).tolist())
        for i in real.tolist():
            assert t - seen.get(i, -parts) >= parts  # b-min-separated
            seen[i] = t
        counts[real] += 1
    # every example: Bernoulli(0.3) in each of its part's steps (steps / parts of them)
    np.testing.assert_allclose(counts.mean() / (steps / parts), 0.3, atol=0.02)
    assert sorted(np.concatenate([sampler.partition(p) for p in range(parts)]).tolist()) == list(range(n))
    assert sampler.max_participations(steps) == steps // parts


def test_cyclic_poisson_resumes_and_refuses_another_partitioning():
    from dpjax.sampling import CyclicPoissonSampler

    a = CyclicPoissonSampler(50, partitions=5, expected_batch_size=3, seed=1)
    [a.sample() for _ in range(7)]
    b = CyclicPoissonSampler(50, partitions=5, expected_batch_size=3, seed=2)
    b.load_state_dict(a.state_dict())
    assert a.sample() == b.sample()
    with pytest.raises(ValueError, match="partitions"):
        CyclicPoissonSampler(50, partitions=4, sampling_rate=0.3, seed=1).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="N / partitions"):
        CyclicPoissonSampler(50, partitions=5, expected_batch_size=11)


def test_a_sampler_that_breaks_the_participation_pattern_is_refused():
    from dpjax.sampling import CyclicPoissonSampler, FixedSizeSampler, PoissonSampler

    with pytest.raises(ValueError, match="CyclicPoissonSampler"):
        cn.check_participation(PoissonSampler(100, sampling_rate=0.1, seed=0), bands=3)
    with pytest.raises(ValueError, match="fewer than the 3 bands"):
        cn.check_participation(CyclicPoissonSampler(100, partitions=2, sampling_rate=0.1, seed=0), bands=3)
    with pytest.raises(ValueError, match="CyclicPoissonSampler"):
        cn.check_participation(FixedSizeSampler(100, batch_size=10, seed=0), bands=1)
    cn.check_participation(CyclicPoissonSampler(100, partitions=3, sampling_rate=0.1, seed=0), bands=3)
    cn.check_participation(PoissonSampler(100, sampling_rate=0.1, seed=0), bands=1)


def test_one_band_accounting_is_dp_sgds_and_bands_divide_the_compositions():
    from dpjax import accounting

    kw = dict(noise_multiplier=1.2, sampling_rate=0.05, delta=1e-5)
    assert cn.epsilon(bands=1, steps=300, **kw) == accounting.epsilon(steps=300, **kw)
    assert cn.epsilon(bands=4, steps=300, **kw) == accounting.epsilon(steps=75, **kw)
    assert cn.epsilon(bands=4, steps=301, **kw) == accounting.epsilon(steps=76, **kw)  # a part used once more


def test_bandmf_with_fewer_parts_than_bands_is_not_accounted():
    # Its columns would overlap: counting one composition per pass would understate ε.
    with pytest.raises(ValueError, match="4 bands needs at least as many partitions, got 3"):
        cn.compositions(cn.BANDED, steps=12, partitions=3, bands=4)
    with pytest.raises(ValueError, match="not accounted"):
        cn.max_noisy_steps(cn.BANDED, partitions=3, bands=4, max_compositions=5)
    assert cn.compositions(cn.BANDED, steps=12, partitions=4, bands=4) == (3, True)
    assert cn.max_noisy_steps(cn.BANDED, partitions=4, bands=4, max_compositions=5) == 20


def test_plain_privatize_accounts_a_cyclic_sampler_as_one_step_per_pass():
    # Independent noise with cyclic Poisson sampling: an example is in at most ceil(T / P) steps.
    import optax

    import dpjax
    from dpjax import accounting
    from dpjax.sampling import CyclicPoissonSampler

    sampler = CyclicPoissonSampler(100, partitions=4, sampling_rate=0.2, seed=0)
    tx = dpjax.privatize(optax.sgd(0.1), noise_multiplier=1.0, l2_clip_norm=1.0, sampler=sampler)
    state = tx.init(jnp.zeros(2))
    state = state._replace(ledger=state.ledger._replace(steps=jnp.int32(10)))
    q = float(state.ledger.sampling_rate)  # 0.2 rounded up to a float32
    assert dpjax.epsilon(state, 1e-5) == accounting.epsilon(noise_multiplier=1.0, steps=3, sampling_rate=q, delta=1e-5)


def test_tree_nodes_partition_the_prefix():
    for t in range(1, 40):
        covered = sorted(i for level, k in cn.tree_nodes(t) for i in range(k << level, (k + 1) << level))
        assert covered == list(range(t))
    assert cn.tree_nodes(0) == [] and cn.tree_height(8) == 4 and cn.tree_height(7) == 3


def test_tree_prefix_noise_covariance_is_the_shared_nodes():
    steps, draws = 7, 20_000
    keys = jax.random.split(jax.random.PRNGKey(3), draws)
    height = cn.tree_height(steps)
    noise = jax.vmap(lambda k: jnp.stack([cn.tree_prefix_noise(k, t, jnp.zeros(()), height)
                                          for t in range(1, steps + 1)]))(keys)
    shared = np.array([[len(set(cn.tree_nodes(s)) & set(cn.tree_nodes(t))) for t in range(1, steps + 1)]
                       for s in range(1, steps + 1)])
    np.testing.assert_allclose(np.cov(np.asarray(noise).T), shared, atol=0.06)


def test_tree_gradient_noise_sums_to_the_prefix_noise_inside_jit():
    key, like = jax.random.PRNGKey(0), {"w": jnp.zeros((3,)), "b": jnp.zeros(())}
    height = cn.tree_height(10)
    step_noise = jax.jit(lambda t: cn.tree_gradient_noise(key, t, like, height))
    running = jax.tree_util.tree_map(jnp.zeros_like, like)
    for t in range(1, 11):
        running = jax.tree_util.tree_map(jnp.add, running, step_noise(t))
        want = cn.tree_prefix_noise(key, t, like, height)
        for a, b in zip(jax.tree_util.tree_leaves(running), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(a, b, atol=1e-5)
    # a resumed run (a fresh compiled step, at step 7) draws the same noise: it depends on (key, step) only
    fresh = jax.jit(lambda t: cn.tree_gradient_noise(key, t, like, height))
    np.testing.assert_array_equal(step_noise(7)["w"], fresh(7)["w"])


@pytest.mark.parametrize("steps,participations", [(8, 1), (7, 1), (8, 2), (6, 3)])
def test_tree_sensitivity_bounds_a_brute_force(steps, participations):
    matrix = cn.tree_matrix(steps)
    brute = cn.brute_force_sensitivity(matrix, 1, participations)
    if participations == 1:
        assert brute == pytest.approx(cn.tree_sensitivity(steps, 1))  # every leaf: one node per level
    assert brute <= cn.tree_sensitivity(steps, participations) + 1e-12


def test_tree_restarts_give_each_participation_its_own_tree():
    epoch = 8
    blocks = np.kron(np.eye(3), cn.tree_matrix(epoch))  # three independent trees, one per epoch
    brute = cn.brute_force_sensitivity(blocks, epoch, 3)  # one participation per epoch
    assert brute == pytest.approx(cn.tree_sensitivity(3 * epoch, 3, restart_every=epoch))
