"""Tests for dpjax.pate (PATE with LNMax / GNMax / Confident-GNMax)."""

from __future__ import annotations

import math

import dp_accounting
import flax.linen as nn
import jax
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

from dpjax import pate

ORDERS = np.array([1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 32.0, 64.0, 128.0])


# ---------------------------------------------------------------- data-independent


@pytest.mark.parametrize("sigma,queries", [(5.0, 1), (20.0, 100), (40.0, 1000)])
def test_gnmax_data_independent_is_gaussian_composition(sigma, queries):
    expected = ORDERS * queries / sigma ** 2  # λ/σ² per query
    np.testing.assert_allclose(pate.rdp_gnmax_data_independent(sigma, queries, ORDERS), expected)
    # Gaussian mechanism of L2 sensitivity √2 with std σ: RDP λ·(√2)²/(2σ²) = λ/σ².
    np.testing.assert_allclose(
        pate.rdp_of_event(pate.gnmax_dp_event(sigma, queries), ORDERS), expected, rtol=1e-12)
    # and against dp_accounting directly, composing `queries` GaussianDpEvent(σ/√2)
    acc = rdp_privacy_accountant.RdpAccountant(orders=list(ORDERS))
    acc.compose(dp_accounting.GaussianDpEvent(sigma / math.sqrt(2)), queries)
    np.testing.assert_allclose(acc.rdp, expected, rtol=1e-12)
    eps, _ = pate.epsilon_from_rdp(expected, 1e-5, ORDERS)
    assert eps == pytest.approx(acc.get_epsilon(1e-5))


def test_confident_event_adds_threshold_cost():
    rdp = pate.rdp_of_event(pate.confident_gnmax_dp_event(50.0, 20.0, 300, 40), ORDERS)
    np.testing.assert_allclose(rdp, 300 * ORDERS / (2 * 50.0 ** 2) + 40 * ORDERS / 20.0 ** 2)


# ---------------------------------------------------------------- data-dependent


def _independent_rdp(votes, sigma, order):
    """Prop. 7 + Thm. 6 in plain floats, one μ2 at a time (no logs, no vectorisation)."""
    votes = [float(v) for v in votes]
    top = max(range(len(votes)), key=lambda i: votes[i])
    q = sum(0.5 * math.erfc((votes[top] - v) / (2 * sigma))
            for i, v in enumerate(votes) if i != top)
    q = min(q, 1.0)
    best = order / sigma ** 2
    if q == 0:
        return 0.0
    for mu2 in pate.MU_GRID:
        mu1 = mu2 + 1
        e1, e2 = mu1 / sigma ** 2, mu2 / sigma ** 2
        if not (q < 1 and order < mu1 and e2 + math.log(q) < 0
                and math.log(q) <= (mu2 - 1) * e2
                - mu2 * math.log(mu1 / (mu1 - 1) * mu2 / (mu2 - 1))):
            continue
        a = (1 - q) / (1 - (q * math.exp(e2)) ** ((mu2 - 1) / mu2))
        log_b = e1 - math.log(q) / (mu1 - 1)
        # log((1-q) A^(λ-1) + q B^(λ-1)) / (λ-1), with B in logs (it overflows)
        t1 = math.log(1 - q) + (order - 1) * math.log(a)
        t2 = math.log(q) + (order - 1) * log_b
        m = max(t1, t2)
        val = (m + math.log(math.exp(t1 - m) + math.exp(t2 - m))) / (order - 1)
        best = min(best, val)
    return best


HISTOGRAMS = {
    "unanimous": [250, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "strong": [200, 20, 10, 5, 5, 5, 5, 0, 0, 0],
    "split": [120, 80, 20, 10, 5, 5, 5, 5, 0, 0],
    "near_tie": [101, 99, 20, 10, 5, 5, 5, 5, 0, 0],
}


@pytest.mark.parametrize("name", list(HISTOGRAMS))
@pytest.mark.parametrize("sigma", [10.0, 40.0])
def test_data_dependent_matches_independent_computation(name, sigma):
    votes = HISTOGRAMS[name]
    got = pate.rdp_gnmax_data_dependent([votes], sigma, ORDERS)[0]
    want = [_independent_rdp(votes, sigma, o) for o in ORDERS]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert np.all(got <= ORDERS / sigma ** 2 + 1e-15)
    # Prop. 7 bound itself, against scipy's normal tail: ½erfc(g/2σ) = P[N(0,2σ²) > g]
    v = np.array(votes, float)
    gaps = v.max() - np.delete(v, v.argmax())
    q = min(stats.norm.sf(gaps, scale=math.sqrt(2) * sigma).sum(), 1.0)
    assert np.exp(pate.log_q_gnmax([votes], sigma)[0]) == pytest.approx(q, rel=1e-9)


def test_data_dependent_orders_and_epsilon_never_above_data_independent():
    rng = np.random.default_rng(0)
    sigma = 40.0
    votes = np.array(list(HISTOGRAMS.values()) * 25)
    dep = pate.rdp_gnmax_data_dependent(votes, sigma, ORDERS)
    assert np.all(dep[0] <= dep[1]) and np.all(dep[1] <= dep[2])  # larger gaps cost less
    assert dep[0, 1] < 0.05 * ORDERS[1] / sigma ** 2  # unanimous: far cheaper at low orders
    assert np.all(dep[3] == ORDERS / sigma ** 2)  # near tie: no gain
    assert dep[1, 2] < 0.5 * ORDERS[2] / sigma ** 2  # a strong consensus is cheaper
    for _ in range(5):
        v = rng.multinomial(250, rng.dirichlet(np.ones(10) * 0.3), size=50)
        ans = rng.random(50) < 0.5
        for agg in ("gnmax", "confident"):
            r = pate.privacy_analysis(v, aggregator=agg, delta=1e-5, sigma=sigma, sigma1=100.0,
                                      answered=ans if agg == "confident" else None)
            assert r["epsilon_data_dependent"] <= r["epsilon_data_independent"] + 1e-12


def test_data_dependent_is_monotone_in_q():
    logq = np.linspace(-200, 0, 400)
    r = pate.rdp_gnmax_from_logq(logq, 20.0, ORDERS)
    assert np.all(np.diff(r, axis=0) >= -1e-12)


def test_smooth_sensitivity():
    sigma, order, beta = 40.0, 16.0, 0.01
    unanimous, tie = HISTOGRAMS["unanimous"], HISTOGRAMS["near_tie"]
    ls = [pate.local_sensitivity(unanimous, sigma, order, k) for k in range(0, 130, 10)]
    assert ls[0] < 0.01 * order / sigma ** 2 and max(ls) <= order / sigma ** 2
    # the local-sensitivity bound really bounds |RDP(n') - RDP(n'')| for neighbours
    base = np.array(HISTOGRAMS["strong"])
    f = lambda v: pate.rdp_gnmax_data_dependent([v], sigma, [order])[0, 0]  # noqa: E731
    for k in (0, 5, 20):
        bound = pate.local_sensitivity(base, sigma, order, k)
        n1 = base.copy(); n1[0] -= k; n1[1] += k  # noqa: E702  (distance k)
        n2 = n1.copy(); n2[0] -= 1; n2[1] += 1  # noqa: E702  (its neighbour)
        assert abs(f(n1) - f(n2)) <= bound + 1e-12
    ss = pate.smooth_sensitivity([unanimous] * 5, sigma, order, beta)
    assert 0 < ss <= 5 * order / sigma ** 2
    assert ss >= 5 * ls[0]  # k = 0 term
    # a near tie already costs the data-independent λ/σ²: nearby histograms barely change it
    assert pate.smooth_sensitivity([tie] * 5, sigma, order, beta) <= 5 * order / sigma ** 2
    # β-smoothness: SS(n) <= e^β SS(n') for a neighbour n'
    n2 = [list(unanimous)] * 5
    n2[0] = [249, 1] + [0] * 8
    assert ss <= math.exp(beta) * pate.smooth_sensitivity(n2, sigma, order, beta) + 1e-15


# ---------------------------------------------------------------- mechanisms


def test_partition_disjoint_and_covering():
    shards = pate.partition(1437, 250, seed=3)
    allidx = np.concatenate(shards)
    assert len(allidx) == 1437 and len(np.unique(allidx)) == 1437
    assert set(allidx.tolist()) == set(range(1437))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        pate.partition(10, 11)


class _Logreg(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


@pytest.fixture(scope="module")
def small_teachers(digits):
    x, y = digits
    x, y = x[:600], y[:600]
    shards = pate.partition(len(x), 12, seed=0)
    model = pate.default_teacher_model()
    return model, x, y, shards


def test_votes_sum_to_n(small_teachers):
    model, x, y, shards = small_teachers
    params = pate.train_teachers(model, x, y, shards, steps=30)
    votes = pate.teacher_votes(model, params, x[:50])
    assert votes.shape == (50, 10)
    assert np.all(votes.sum(-1) == 12) and votes.min() >= 0


def test_vmapped_training_equals_one_by_one(small_teachers):
    model, x, y, shards = small_teachers
    kw = dict(steps=5, learning_rate=0.05, seed=1)
    a = pate.train_teachers(model, x, y, shards, vectorize=True, **kw)
    b = pate.train_teachers(model, x, y, shards, vectorize=False, **kw)
    for pa, pb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(pa, pb, rtol=1e-4, atol=1e-5)
    c = pate.train_teachers(model, x, y, shards, vectorize=True, **dict(kw, seed=2))
    assert not np.allclose(jax.tree_util.tree_leaves(a)[0], jax.tree_util.tree_leaves(c)[0])


def test_noise_scale():
    votes = np.zeros((20000, 2))
    votes[:, 0] = 1000.0  # noise never flips the answer; measure it through a difference
    key = jax.random.PRNGKey(0)
    sigma, gamma = 7.0, 0.25
    # Reproduce the aggregators' noise with the same keys and check the answers agree.
    noise = sigma * jax.random.normal(key, votes.shape)
    assert np.std(np.asarray(noise)) == pytest.approx(sigma, rel=0.02)
    assert np.array_equal(pate.gnmax(votes, sigma, key), np.argmax(votes + np.asarray(noise), -1))
    lap = np.asarray(jax.random.laplace(key, votes.shape)) / gamma
    assert np.std(lap) == pytest.approx(math.sqrt(2) / gamma, rel=0.03)  # Lap(b): std √2·b
    assert np.array_equal(pate.lnmax(votes, gamma, key), np.argmax(votes + lap, -1))
    # Empirically through the answers: with counts (0, g), GNMax answers class 0 with
    # probability P[N(0, 2σ²) > g], LNMax with P[Lap(1/γ) - Lap(1/γ) > g].
    g = 5.0
    tie = np.tile([0.0, g], (40000, 1))
    p_gn = np.mean(pate.gnmax(tie, sigma, jax.random.PRNGKey(1)) == 0)
    assert p_gn == pytest.approx(stats.norm.sf(g, scale=math.sqrt(2) * sigma), abs=0.01)
    p_ln = np.mean(pate.lnmax(tie, gamma, jax.random.PRNGKey(2)) == 0)
    b = 1 / gamma  # difference of two Lap(b): P[D > g] = e^{-g/b}(2 + g/b)/4
    assert p_ln == pytest.approx(math.exp(-g / b) * (2 + g / b) / 4, abs=0.01)


def test_confident_gnmax_abstains_at_gaussian_tail_rate():
    n, threshold, sigma1 = 40000, 150.0, 50.0
    votes = np.zeros((n, 10))
    votes[:, 3] = 120.0
    votes[:, 5] = 80.0
    labels, answered = pate.confident_gnmax(votes, threshold, sigma1, 10.0,
                                            jax.random.PRNGKey(0))
    p_answer = stats.norm.sf(threshold - 120.0, scale=sigma1)
    assert answered.mean() == pytest.approx(p_answer, abs=0.01)
    assert np.all(labels[~answered] == -1) and np.all(labels[answered] >= 0)
    r = pate.privacy_analysis(votes[:100], aggregator="confident", delta=1e-5, sigma=10.0,
                              sigma1=sigma1, answered=answered[:100])
    assert r["answered"] == answered[:100].sum()


def test_student_and_run_pate_small(digits):
    x, y = digits
    data = {"x_train": x[:1200], "y_train": y[:1200], "x_test": x[1200:], "y_test": y[1200:]}
    r = pate.run_pate(data, n_teachers=30, aggregator="gnmax", sigma=3.0, n_queries=200,
                      teacher_steps=100, student_steps=150)
    assert r.ensemble_accuracy > 0.8
    assert r.student_accuracy > 0.6
    assert r.answered == 200
    assert 0 < r.epsilon_data_dependent <= r.epsilon_data_independent


def test_cli(capsys):
    from dpjax import cli
    assert cli.main(["pate", "--teachers", "20", "--queries", "100", "--aggregator", "confident",
                     "--threshold", "12", "--sigma1", "4", "--sigma", "3"]) == 0
    out = capsys.readouterr().out
    for s in ("teacher ensemble accuracy", "student accuracy", "answered queries",
              "epsilon (data-independent)", "epsilon (data-dependent)"):
        assert s in out


def test_lnmax_event_is_2gamma_dp_per_query():
    gamma, queries = 0.1, 7
    rdp = pate.rdp_of_event(pate.lnmax_dp_event(gamma, queries), ORDERS)
    assert np.all(rdp <= queries * 2 * gamma + 1e-12)  # pure (2γ)-DP bounds every order
    assert rdp[-1] == pytest.approx(queries * 2 * gamma, rel=0.05)


def test_private_release_of_data_dependent_epsilon():
    import jax
    votes = np.array([[18, 1, 1, 0, 0, 0, 0, 0, 0, 0]] * 3)  # 20 teachers, 3 queries: keeps it fast
    order = 6.0
    # Theorem 23's cost, computed independently here.
    beta, s = 0.4 / order, 10.0
    expected = order * np.exp(2 * beta) / s**2 + (-0.5 * np.log(1 - 2 * order * beta) + beta * order) / (order - 1)
    assert pate.rdp_smooth_sensitivity_gaussian(beta, s, order) == pytest.approx(expected)
    with pytest.raises(ValueError, match="order"):
        pate.rdp_smooth_sensitivity_gaussian(0.4, s, 6.0)
    a = pate.release_data_dependent_epsilon(votes, sigma=20.0, delta=1e-5, order=order, key=jax.random.PRNGKey(0))
    b = pate.release_data_dependent_epsilon(votes, sigma=20.0, delta=1e-5, order=order, key=jax.random.PRNGKey(0))
    assert a == b and a["smooth_sensitivity"] >= 0 and a["release_cost_rdp"] > 0
    true_rdp = float(pate.rdp_gnmax_data_dependent(votes, 20.0, np.array([order])).sum(0)[0])
    # The noise is scaled by the smooth sensitivity: over many keys its spread matches SS * sigma_ss.
    draws = [pate.release_data_dependent_epsilon(votes, sigma=20.0, delta=1e-5, order=order,
                                                 key=jax.random.PRNGKey(i))["released_rdp"] for i in range(60)]
    assert np.mean(draws) == pytest.approx(true_rdp, abs=4 * a["smooth_sensitivity"] * 10 / np.sqrt(60) + 1e-9)
    assert np.std(draws) == pytest.approx(a["smooth_sensitivity"] * 10, rel=0.35)
