"""The two-line change on a real model and data, and invariant 6 (the
sampling that trains is the sampling the accountant analyses)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax import accounting


def test_private_training_on_digits_learns_and_accounts(mlp_setup, digits):
    model, params, loss_fn = mlp_setup
    x, y = digits
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    sampler = dpjax.PoissonSampler(len(x_train), expected_batch_size=100, seed=0)
    grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0)
    tx = dpjax.privatize(optax.adam(3e-3), noise_multiplier=1.0, l2_clip_norm=1.0, sampler=sampler, seed=0)
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        g = grad_fn(params, batch)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    data = {"x": x_train, "y": y_train}
    for _ in range(150):
        params, state = step(params, state, sampler.sample().take(data))
    acc = float(jnp.mean(jnp.argmax(model.apply(params, x_test), -1) == y_test))
    assert acc > 0.75, acc
    eps = dpjax.epsilon(state, delta=1e-5)
    expected = accounting.epsilon(noise_multiplier=1.0, steps=150, delta=1e-5, sampling_rate=100 / 1500)
    assert eps == pytest.approx(expected, rel=1e-5)
    assert 0 < eps < 10
    statement = dpjax.privacy_statement(state, delta=1e-5, l2_clip_norm=1.0)
    assert "150" in statement
    assert "provenance: verified" in statement


def test_ledger_describes_the_sampler_that_trains():
    for sampler in (
        dpjax.PoissonSampler(1000, expected_batch_size=64, seed=1),
        dpjax.FixedSizeSampler(1000, batch_size=64, seed=1),
    ):
        tx = dpjax.privatize(optax.sgd(0.1), noise_multiplier=1.0, l2_clip_norm=1.0, sampler=sampler, seed=0)
        led = dpjax.ledger.find_ledger(tx.init({"w": jnp.zeros(2)}))
        assert float(led.sampling_rate) == pytest.approx(sampler.sampling_rate, rel=1e-6)
        assert float(led.sampling_rate) >= sampler.sampling_rate
        assert dpjax.ledger._SAMPLING_NAMES[int(led.sampling)] == sampler.sampling
        # The empirical inclusion rate of the sampler is the q the ledger accounts.
        counts = np.zeros(1000)
        for _ in range(300):
            b = sampler.sample()
            counts[b.indices[: b.size]] += 1
        assert counts.mean() / 300 == pytest.approx(float(led.sampling_rate), rel=0.05)


def test_sampler_and_explicit_arguments_are_exclusive():
    sampler = dpjax.PoissonSampler(100, expected_batch_size=10, seed=0)
    with pytest.raises(ValueError, match="not both"):
        dpjax.privatize(optax.sgd(0.1), noise_multiplier=1.0, l2_clip_norm=1.0, sampler=sampler, num_examples=100)


def test_shuffled_batches_are_refused_by_the_accountant():
    with pytest.raises(ValueError, match="shuffle|Poisson"):
        accounting.epsilon(noise_multiplier=1.0, steps=10, delta=1e-5, sampling_rate=0.1, sampling="shuffle")
    with pytest.raises(ValueError, match="sampling"):
        dpjax.privatize(optax.sgd(0.1), noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=10,
                        num_examples=100, sampling="shuffle")
