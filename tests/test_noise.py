"""privatize / dp_sgd / dp_adam: invariants 3 (noise on the sum, public
normaliser), 4 (fresh independent keys), 5 (step count) and the fail-safe
refusals."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax import accounting
from dpjax.clipping import ClippedGradient

SIGMA, CLIP, EB, N = 1.3, 0.8, 50.0, 1000
# Stamps of real draws of a sampler with the (N, q) that make_tx declares.
SAMPLER = dpjax.PoissonSampler(N, expected_batch_size=EB, seed=0)
FIXED = dpjax.FixedSizeSampler(N, batch_size=int(EB), seed=0)


def stamp(step, part=None, sampler=SAMPLER):
    """The provenance of the sampler's draw of ``step`` (of micro-batch ``part = (i, k)``)."""
    b = sampler.batch_at(step)
    return (b if part is None else b.micro_batches(part[1])[part[0]]).provenance()


def zero_clipped(params, step=0, sensitivity=CLIP, part=None, sampler=SAMPLER):
    """A clipped sum that is exactly zero, so updates are pure noise / E[B]."""
    return ClippedGradient(
        sensitivity=sensitivity,
        sum=jax.tree_util.tree_map(jnp.zeros_like, params),
        num_examples=jnp.zeros((), jnp.int32),
        num_nonfinite=jnp.zeros((), jnp.int32),
        provenance=stamp(step, part, sampler),
    )


def make_tx(inner=None, **kw):
    args = dict(noise_multiplier=SIGMA, l2_clip_norm=CLIP, expected_batch_size=EB, num_examples=N, seed=0)
    args.update(kw)
    return dpjax.privatize(inner or optax.identity(), **args)


PARAMS = {"a": jnp.zeros((200, 50)), "b": jnp.zeros((10_000,))}


def noise_draws(tx, steps, params=PARAMS, sampler=SAMPLER):
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for t in range(steps):
        u, state = update(zero_clipped(params, t, sampler=sampler), state, params)
        out.append(u)
    return out, state


def test_noise_std_is_sigma_c_over_expected_batch():
    draws, state = noise_draws(make_tx(), steps=4)
    expected = SIGMA * CLIP / EB
    for u in draws:
        for leaf in jax.tree_util.tree_leaves(u):
            x = np.asarray(leaf).ravel()
            n = x.size
            # std of the sample std ~ expected / sqrt(2n); allow 5 of those.
            assert abs(x.std() - expected) < 5 * expected / np.sqrt(2 * n)
            assert abs(x.mean()) < 5 * expected / np.sqrt(n)
    assert dpjax.steps_taken(state) == 4


def test_noise_independent_across_leaves_and_steps():
    draws, _ = noise_draws(make_tx(), steps=3)
    flat = [np.asarray(d["b"]) for d in draws] + [np.asarray(d["a"]).ravel()[:10_000] for d in draws]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            r = np.corrcoef(flat[i], flat[j])[0, 1]
            assert abs(r) < 5 / np.sqrt(10_000), (i, j, r)


def test_same_shape_leaves_do_not_share_noise():
    params = {"x": jnp.zeros(1000), "y": jnp.zeros(1000)}
    (u,), _ = noise_draws(make_tx(), 1, params)
    assert not np.allclose(u["x"], u["y"])
    assert abs(np.corrcoef(u["x"], u["y"])[0, 1]) < 0.2


def test_replicas_with_same_state_draw_same_noise_and_seeds_differ():
    a, _ = noise_draws(make_tx(seed=7), 2)
    b, _ = noise_draws(make_tx(seed=7), 2)
    c, _ = noise_draws(make_tx(seed=8), 2)
    np.testing.assert_array_equal(a[1]["b"], b[1]["b"])
    assert not np.allclose(a[1]["b"], c[1]["b"])
    assert not np.allclose(a[0]["b"], a[1]["b"])


def test_default_seed_comes_from_os_entropy():
    a, _ = noise_draws(make_tx(seed=None), 1)
    b, _ = noise_draws(make_tx(seed=None), 1)
    assert not np.allclose(a[0]["b"], b[0]["b"])


def test_divides_by_public_expected_batch_size_not_realised_size(mlp_setup, digits):
    # Two batches with different realised sizes, same noise state: the update
    # difference is exactly (sum1 - sum2) / E[B].
    _, params, loss_fn = mlp_setup
    x, y = digits
    grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP)
    g1 = grad_fn(params, {"x": x[:20], "y": y[:20]}).replace(provenance=stamp(0))
    g2 = grad_fn(params, {"x": x[20:27], "y": y[20:27]}).replace(provenance=stamp(0))
    tx = make_tx()
    state = tx.init(params)
    u1, _ = tx.update(g1, state, params)
    u2, _ = tx.update(g2, state, params)
    for a, b, s1, s2 in zip(*map(jax.tree_util.tree_leaves, (u1, u2, g1.sum, g2.sum))):
        np.testing.assert_allclose(np.asarray(a) - np.asarray(b), (np.asarray(s1) - np.asarray(s2)) / EB, atol=1e-6)


def test_refuses_plain_gradients(mlp_setup, digits):
    _, params, loss_fn = mlp_setup
    x, y = digits
    plain = jax.grad(loss_fn)(params, {"x": x[:4], "y": y[:4]})
    tx = make_tx()
    with pytest.raises(TypeError, match="clipped_grad"):
        tx.update(plain, tx.init(params), params)


def test_refuses_gradient_with_larger_sensitivity():
    tx = make_tx()
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="sensitivity"):
        tx.update(zero_clipped(PARAMS, sensitivity=CLIP * 2), state, PARAMS)


def test_ledger_counts_inside_jit_and_matches_accountant():
    tx = make_tx()
    _, state = noise_draws(tx, 5)
    led = dpjax.ledger.find_ledger(state)
    assert int(led.steps) == 5
    expected = accounting.epsilon(noise_multiplier=SIGMA, steps=5, delta=1e-5, sampling_rate=EB / N)
    assert dpjax.epsilon(state, delta=1e-5) == pytest.approx(expected, rel=1e-5)
    # The ledger rounds conservatively: never less epsilon than the exact values.
    assert dpjax.epsilon(state, delta=1e-5) >= expected


def test_ledger_survives_checkpoint_and_resume_continues():
    tx = make_tx()
    params = {"w": jnp.zeros(4)}
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(3):
        _, state = update(zero_clipped(params, t), state, params)
    blob = flax.serialization.to_bytes(state)
    restored = flax.serialization.from_bytes(tx.init(params), blob)
    assert dpjax.steps_taken(restored) == 3
    # Continuing from the restore equals continuing without it (same noise key stream).
    u_direct, s_direct = update(zero_clipped(params, 3), state, params)
    u_restored, s_restored = update(zero_clipped(params, 3), restored, params)
    np.testing.assert_array_equal(u_direct["w"], u_restored["w"])
    assert dpjax.steps_taken(s_restored) == 4
    assert dpjax.epsilon(s_restored, 1e-5) == dpjax.epsilon(s_direct, 1e-5)


def test_gradient_accumulation_adds_noise_once_per_logical_batch(mlp_setup, digits):
    _, params, loss_fn = mlp_setup
    x, y = digits
    grad_fn = jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP))
    parts = [grad_fn(params, {"x": x[i * 8 : (i + 1) * 8], "y": y[i * 8 : (i + 1) * 8]}).replace(
        provenance=stamp(0, (i, 4))) for i in range(4)]
    acc_tx = make_tx(accumulation_steps=4)
    one_tx = make_tx()
    state = acc_tx.init(params)
    update = jax.jit(acc_tx.update)
    for i, g in enumerate(parts):
        u, state = update(g, state, params)
        if i < 3:
            assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree_util.tree_leaves(u))
            assert dpjax.steps_taken(state) == 0
    assert dpjax.steps_taken(state) == 1
    total = ClippedGradient(
        sensitivity=CLIP,
        sum=jax.tree_util.tree_map(lambda *xs: sum(xs), *[p.sum for p in parts]),
        num_examples=jnp.int32(32),
        num_nonfinite=jnp.int32(0),
        provenance=stamp(0),
    )
    u_one, _ = one_tx.update(total, one_tx.init(params), params)
    for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(u_one)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_accumulated_noise_variance_is_exactly_one_draw():
    k = 4
    tx = make_tx(accumulation_steps=k)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    finals = []
    for i in range(3 * k):
        u, state = update(zero_clipped(PARAMS, i // k, part=(i % k, k)), state, PARAMS)
        if (i + 1) % k == 0:
            finals.append(np.asarray(u["b"]))
    assert dpjax.steps_taken(state) == 3
    expected = SIGMA * CLIP / EB  # sigma*C on the sum, once per logical step
    for x in finals:
        assert abs(x.std() - expected) < 5 * expected / np.sqrt(2 * x.size)


def test_budget_guard_raises_before_applying():
    tx = make_tx(target_epsilon=1.5, target_delta=1e-5, inner=optax.sgd(1.0))
    max_steps = accounting.max_steps(
        target_epsilon=1.5, delta=1e-5, noise_multiplier=SIGMA, sampling_rate=EB / N
    )
    assert 0 < max_steps < 1000
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    for t in range(max_steps):
        _, state = tx.update(zero_clipped(params, t), state, params)
    assert dpjax.epsilon(state, 1e-5) <= 1.5
    with pytest.raises(dpjax.PrivacyBudgetExceeded, match="budget"):
        tx.update(zero_clipped(params, max_steps), state, params)
    assert dpjax.steps_taken(state) == max_steps
    with pytest.raises(dpjax.PrivacyBudgetExceeded):
        dpjax.check_budget(state)


def test_budget_guard_under_jit_refuses_step():
    tx = make_tx(target_epsilon=1.5, target_delta=1e-5)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    max_steps = int(dpjax.ledger.find_ledger(state).max_steps)
    for t in range(max_steps):
        dpjax.check_budget(state)
        _, state = update(zero_clipped(params, t), state, params)
    u, state = update(zero_clipped(params, max_steps), state, params)
    np.testing.assert_array_equal(u["w"], 0.0)
    assert dpjax.steps_taken(state) == max_steps
    assert int(dpjax.ledger.find_ledger(state).refused_steps) == 1
    with pytest.raises(dpjax.PrivacyBudgetExceeded, match="refused"):
        dpjax.check_budget(state)


def test_dp_sgd_and_dp_adam_equal_privatize():
    sampler = dpjax.PoissonSampler(500, expected_batch_size=32, seed=0)

    def g(t):
        return ClippedGradient(sensitivity=1.0, sum={"w": jnp.arange(3.0)}, num_examples=jnp.int32(3),
                               num_nonfinite=jnp.int32(0), provenance=sampler.batch_at(t).provenance())

    params = {"w": jnp.ones(3)}
    pairs = [
        (
            dpjax.dp_sgd(0.1, 1.0, 1.1, 32, num_examples=500, momentum=0.9, seed=3),
            dpjax.privatize(optax.sgd(0.1, momentum=0.9), noise_multiplier=1.1, l2_clip_norm=1.0,
                            expected_batch_size=32, num_examples=500, seed=3),
        ),
        (
            dpjax.dp_adam(1e-3, 1.0, 1.1, 32, num_examples=500, seed=3),
            dpjax.privatize(optax.adam(1e-3), noise_multiplier=1.1, l2_clip_norm=1.0,
                            expected_batch_size=32, num_examples=500, seed=3),
        ),
    ]
    for a, b in pairs:
        sa, sb = a.init(params), b.init(params)
        for t in range(2):
            ua, sa = a.update(g(t), sa, params)
            ub, sb = b.update(g(t), sb, params)
            np.testing.assert_array_equal(ua["w"], ub["w"])


def test_composes_with_optax_chain():
    # privatize must come first: the chain hands it the ClippedGradient.
    tx = optax.chain(make_tx(inner=optax.sgd(0.1)), optax.scale(1.0))
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    _, state = jax.jit(tx.update)(zero_clipped(params), state, params)
    assert dpjax.steps_taken(state) == 1


def test_epsilon_needs_exactly_one_ledger():
    with pytest.raises(ValueError, match="no privacy ledger"):
        dpjax.epsilon(optax.adam(1e-3).init({"w": jnp.zeros(2)}), 1e-5)
    two = (make_tx().init(PARAMS), make_tx().init(PARAMS))
    with pytest.raises(ValueError, match="2 privacy ledgers"):
        dpjax.epsilon(two, 1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(noise_multiplier=0.0), "noise_multiplier"),
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(noise_multiplier=float("nan")), "noise_multiplier"),
        (dict(l2_clip_norm=0.0), "l2_clip_norm"),
        (dict(expected_batch_size=-5), "expected_batch_size"),
        (dict(expected_batch_size=N + 1), "expected_batch_size"),
        (dict(num_examples=None), "exactly one of num_examples"),
        (dict(sampling_rate=0.1), "exactly one of num_examples"),
        (dict(num_examples=None, sampling_rate=1.5), "sampling_rate"),
        (dict(accumulation_steps=0), "accumulation_steps"),
        (dict(sampling="shuffle"), "sampling"),
        (dict(target_epsilon=1.0), "target_delta"),
    ],
)
def test_bad_inputs_name_the_parameter(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_tx(**kw)


def test_fixed_size_sampling_ledger_uses_replace_one_accounting():
    tx = make_tx(sampling="fixed_size")
    _, state = noise_draws(tx, 2, {"w": jnp.zeros(2)}, sampler=FIXED)
    expected = accounting.epsilon(
        noise_multiplier=SIGMA, steps=2, delta=1e-5, sampling_rate=EB / N,
        sampling="fixed_size", dataset_size=N, batch_size=int(EB),
    )
    assert dpjax.epsilon(state, 1e-5) == pytest.approx(expected, rel=1e-5)
    assert dpjax.epsilon(state, 1e-5) > dpjax.epsilon(noise_draws(make_tx(), 2, {"w": jnp.zeros(2)})[1], 1e-5)


@pytest.mark.parametrize("value", [40.45385522465272, 1.1, 256 / 60000, 1 / 3, 2.0, 1e-7])
def test_ledger_rounding_is_conservative(value):
    up = dpjax.ledger.round_to_float32(value, +1.0)
    down = dpjax.ledger.round_to_float32(value, -1.0)
    assert up.dtype == np.float32 and down.dtype == np.float32
    assert float(down) <= value <= float(up)
    assert float(up) - float(down) <= 2 * np.spacing(np.float32(value))


def test_calibrated_sigma_survives_ledger_rounding():
    # The ledger stores sigma rounded down; fit rounds the calibrated sigma up first,
    # so the planned number of steps stays within the budget.
    sigma = accounting.calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sampling_rate=1.0, steps=100)
    stored = float(dpjax.ledger.round_to_float32(float(dpjax.ledger.round_to_float32(sigma, +1.0)), -1.0))
    assert stored >= sigma
    assert accounting.max_steps(target_epsilon=1.0, delta=1e-5, noise_multiplier=stored, sampling_rate=1.0) >= 100
