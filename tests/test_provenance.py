"""Invariant 7 (provenance) and the loop mistakes users make: each one is refused
with its cause and fix, or handled correctly, and a refused step changes nothing."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpjax
from dpjax.models import NnxMLP

CLIP = 1.0


@pytest.fixture(scope="module")
def setup(digits, mlp_setup):
    model, params, loss_fn = mlp_setup
    x, y = digits
    data = {"x": x[:512], "y": y[:512]}
    return model, params, loss_fn, data


def private(sampler, accumulation_steps=1, **kw):
    return dpjax.privatize(optax.sgd(0.5), noise_multiplier=1.0, l2_clip_norm=CLIP, sampler=sampler, seed=0,
                           accumulation_steps=accumulation_steps, **kw)


def make_step(tx, grad_fn):
    @jax.jit
    def step(params, state, batch):
        updates, state = tx.update(grad_fn(params, batch), state, params)
        return optax.apply_updates(params, updates), state

    return step


def leaves_equal(a, b):
    return all(np.array_equal(np.asarray(u), np.asarray(v))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ------------------------------------------------- row 1: padding without its mask


def test_sampled_batch_carries_its_mask_so_padding_never_counts(setup):
    _, params, loss_fn, data = setup
    sampler = dpjax.PoissonSampler(512, expected_batch_size=16, seed=3)
    b = sampler.sample()
    assert b.bucket_size > b.size  # there is padding (copies of example 0)
    grad_fn = jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap"))
    got = grad_fn(params, b.take(data))  # no mask= anywhere: the batch has it
    real = jax.tree_util.tree_map(lambda a: a[b.indices[: b.size]], data)
    want = grad_fn(params, real)
    assert int(got.num_examples) == b.size
    for u, v in zip(jax.tree_util.tree_leaves(got.sum), jax.tree_util.tree_leaves(want.sum)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_padded_rows_handed_over_without_their_mask_are_refused(setup):
    _, params, loss_fn, data = setup
    sampler = dpjax.PoissonSampler(512, expected_batch_size=16, seed=3)
    tx, grad_fn = private(sampler), jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap"))
    rows = sampler.sample().take(data).data  # the rows alone: padding looks real
    with pytest.raises(dpjax.BatchProvenanceError, match="no batch provenance.*take"):
        tx.update(grad_fn(params, rows), tx.init(params), params)
    with pytest.raises(ValueError, match="carries its own padding mask"):
        grad_fn(params, sampler.sample().take(data), mask=np.ones(16, bool))
    with pytest.raises(TypeError, match="indices, not rows"):
        grad_fn(params, sampler.sample())


# ------------------------------------------ row 2: the user's own batches


def test_own_shuffled_batches_are_refused_inside_jit(setup):
    _, params, loss_fn, data = setup
    sampler = dpjax.PoissonSampler(512, expected_batch_size=64, seed=0)
    tx = private(sampler)
    step = make_step(tx, jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap")))
    perm = np.random.default_rng(0).permutation(512)[:64]
    with pytest.raises(dpjax.BatchProvenanceError, match="trust_unverified_batches"):
        step(params, tx.init(params), {k: v[perm] for k, v in data.items()})


def test_explicit_opt_out_accepts_own_batches_and_says_so(setup):
    _, params, loss_fn, data = setup
    sampler = dpjax.PoissonSampler(512, expected_batch_size=64, seed=0)
    with pytest.warns(dpjax.UnverifiedBatchesWarning, match="NOT checked"):
        tx = private(sampler, trust_unverified_batches=True)
    step = make_step(tx, jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap")))
    state = tx.init(params)
    perm = np.random.default_rng(0).permutation(512)[:64]
    params2, state = step(params, state, {k: v[perm] for k, v in data.items()})
    assert dpjax.steps_taken(state) == 1
    statement = dpjax.privacy_statement(state, 1e-5)
    assert "NOT VERIFIED" in statement and "trust_unverified_batches" in statement
    with pytest.raises(TypeError, match="True or False"):
        private(sampler, trust_unverified_batches="yes")


# ----------------------------------------------- row 3: gradient accumulation


def test_accumulation_with_a_fresh_draw_per_micro_step_is_refused(setup):
    _, params, loss_fn, data = setup
    sampler = dpjax.PoissonSampler(512, expected_batch_size=64, seed=1)
    tx = private(sampler, accumulation_steps=4)
    grad_fn = jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap"))
    state = tx.init(params)
    with pytest.raises(dpjax.BatchProvenanceError, match="one logical draw.*sample_micro_batches"):
        tx.update(grad_fn(params, sampler.sample().take(data)), state, params)
    # Inside jit: refused, and the accumulator, the micro-step and the ledger stay as they were.
    update = jax.jit(tx.update)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        u, after = update(grad_fn(params, sampler.sample().take(data)), state, params)
        jax.block_until_ready(u)
    assert any(issubclass(w.category, dpjax.BatchProvenanceWarning) for w in caught)
    assert leaves_equal(after.accumulated, state.accumulated) and int(after.micro_step) == 0
    assert dpjax.steps_taken(after) == 0 and int(after.ledger.refused_batches) == 1
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(u))
    with pytest.raises(dpjax.BatchProvenanceError, match="refused inside jit.*one logical draw"):
        dpjax.check_budget(after)


def test_accumulation_of_one_draw_equals_the_whole_draw(setup):
    _, params, loss_fn, data = setup
    grad_fn = jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap"))
    s_acc = dpjax.PoissonSampler(512, expected_batch_size=64, seed=5)
    s_one = dpjax.PoissonSampler(512, expected_batch_size=64, seed=5)
    tx_acc, tx_one = private(s_acc, accumulation_steps=4), private(s_one)
    update_acc, update_one = jax.jit(tx_acc.update), jax.jit(tx_one.update)
    st_acc, st_one = tx_acc.init(params), tx_one.init(params)
    for _ in range(3):
        parts = s_acc.sample_micro_batches(4)
        whole = s_one.sample()
        assert len({p.bucket_size for p in parts}) == 1
        assert sorted(np.concatenate([p.indices[p.mask] for p in parts])) == sorted(whole.indices[whole.mask])
        for part in parts:
            u_acc, st_acc = update_acc(grad_fn(params, part.take(data)), st_acc, params)
        u_one, st_one = update_one(grad_fn(params, whole.take(data)), st_one, params)
        for a, b in zip(jax.tree_util.tree_leaves(u_acc), jax.tree_util.tree_leaves(u_one)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert dpjax.steps_taken(st_acc) == dpjax.steps_taken(st_one) == 3
    assert dpjax.epsilon(st_acc, 1e-5) == dpjax.epsilon(st_one, 1e-5)


def test_micro_batches_fed_out_of_order_or_twice_are_refused(setup):
    _, params, loss_fn, data = setup
    sampler = dpjax.PoissonSampler(512, expected_batch_size=64, seed=2)
    tx = private(sampler, accumulation_steps=2)
    grad_fn = jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap"))
    first, second = sampler.sample_micro_batches(2)
    state = tx.init(params)
    with pytest.raises(dpjax.BatchProvenanceError, match="in order"):
        tx.update(grad_fn(params, second.take(data)), state, params)
    _, state = tx.update(grad_fn(params, first.take(data)), state, params)
    with pytest.raises(dpjax.BatchProvenanceError, match="in order"):
        tx.update(grad_fn(params, first.take(data)), state, params)
    with pytest.raises(ValueError, match="already a micro-batch"):
        first.micro_batches(2)


# ----------------------------------------- row 4: a sampler built for another N


def test_sampler_for_another_data_size_is_refused(setup, tmp_path):
    _, params, loss_fn, data = setup
    small = dpjax.PoissonSampler(100, expected_batch_size=10, seed=0)
    with pytest.raises(ValueError, match=r"shape \(512, .*draws from 100 rows"):
        small.sample().take(data)
    b = small.sample()
    with pytest.raises(ValueError, match="dataset_size=512"):
        b.attach(jax.tree_util.tree_map(lambda a: a[b.indices], data), dataset_size=512)
    with pytest.raises(ValueError, match="one row per slot"):
        b.attach({"x": data["x"][:3]})
    # A batch of a sampler for another N (or rate, or scheme) is refused by the ledger.
    tx = private(dpjax.PoissonSampler(512, expected_batch_size=10, seed=0))
    rows = jax.tree_util.tree_map(lambda a: a[:100], data)
    g = jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap"))(params, dpjax.PoissonSampler(100, expected_batch_size=10,
                                                                                  seed=0).sample().take(rows))
    with pytest.raises(dpjax.BatchProvenanceError, match="another sampling scheme, data-set size N, rate q"):
        tx.update(g, tx.init(params), params)
    fixed = dpjax.FixedSizeSampler(512, batch_size=10, seed=0).sample().take(data)
    with pytest.raises(dpjax.BatchProvenanceError, match="another sampling scheme"):
        tx.update(jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap"))(params, fixed), tx.init(params), params)


# ------------------------------------------------ once each, in order (jit)


def test_replayed_skipped_or_restarted_draws_are_refused_and_nothing_is_applied(setup):
    _, params, loss_fn, data = setup
    sampler = dpjax.PoissonSampler(512, expected_batch_size=32, seed=4)
    tx = private(sampler, target_epsilon=50.0, target_delta=1e-5)
    step = make_step(tx, jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap")))
    state = tx.init(params)
    batch = sampler.sample().take(data)
    p1, s1 = step(params, state, batch)
    for bad in (batch,                                        # the same draw twice
                (sampler.sample(), sampler.sample())[1].take(data),  # one draw skipped
                dpjax.PoissonSampler(512, expected_batch_size=32, seed=4).sample().take(data)):  # restarted
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dpjax.BatchProvenanceWarning)
            p2, s2 = step(p1, s1, bad)
        assert leaves_equal(p2, p1), "a refused step must not move the parameters"
        assert dpjax.steps_taken(s2) == 1 and leaves_equal(s2.inner_state, s1.inner_state)
        assert int(s2.ledger.refused_batches) == 1 and int(s2.ledger.refused_steps) == 0
        with pytest.raises(dpjax.BatchProvenanceError, match="not drawn for the step the ledger is at"):
            dpjax.check_budget(s2)
    # Outside jit the same mistake raises before anything is applied.
    with pytest.raises(dpjax.BatchProvenanceError, match="batch drawn for step 0.*ledger at step 1"):
        tx.update(jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap"))(params, batch), s1, p1)


def test_a_resumed_run_needs_the_restored_sampler(setup):
    _, params, loss_fn, data = setup
    sampler = dpjax.PoissonSampler(512, expected_batch_size=32, seed=6)
    tx = private(sampler)
    step = make_step(tx, jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap")))
    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state, sampler.sample().take(data))
    saved = sampler.state_dict()
    fresh = dpjax.PoissonSampler(512, expected_batch_size=32, seed=6)
    with pytest.raises(dpjax.BatchProvenanceError, match="restore the sampler"):
        tx.update(jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap"))(params, fresh.sample().take(data)), state, params)
    fresh = dpjax.PoissonSampler(512, expected_batch_size=32, seed=6)
    fresh.load_state_dict(saved)
    params, state = step(params, state, fresh.sample().take(data))
    assert dpjax.steps_taken(state) == 4


# ------------------------------------------- rows you load yourself (disk, loaders)


def test_rows_read_from_disk_by_index_keep_provenance(setup, tmp_path):
    model, params, loss_fn, data = setup
    np.save(tmp_path / "x.npy", data["x"])
    np.save(tmp_path / "y.npy", data["y"])
    x_disk = np.load(tmp_path / "x.npy", mmap_mode="r")  # rows stay on disk until read
    y_disk = np.load(tmp_path / "y.npy", mmap_mode="r")
    grad_fn = jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method="vmap"))
    runs = {}
    for how in ("disk", "memory"):
        sampler = dpjax.PoissonSampler(len(x_disk), expected_batch_size=32, seed=8)
        tx = private(sampler)
        step, p, s = make_step(tx, grad_fn), params, tx.init(params)
        for _ in range(3):
            b = sampler.sample()
            if how == "disk":
                rows = {"x": np.asarray(x_disk[b.indices]), "y": np.asarray(y_disk[b.indices])}
                batch = b.attach(rows, dataset_size=len(x_disk))
            else:
                batch = b.take(data)
            p, s = step(p, s, batch)
        runs[how] = (p, dpjax.steps_taken(s))
    assert runs["disk"][1] == runs["memory"][1] == 3
    assert leaves_equal(runs["disk"][0], runs["memory"][0])


# --------------------------------------------------------------- row 5: NNX


def _nnx_loss(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()


def test_plain_nnx_optimizer_is_refused_with_the_fix(setup):
    *_, data = setup
    model = NnxMLP(64, 10, 32, rngs=nnx.Rngs(0))
    sampler = dpjax.PoissonSampler(512, expected_batch_size=32, seed=0)
    optimizer = nnx.Optimizer(model, private(sampler), wrt=nnx.Param)
    g = nnx.jit(dpjax.clipped_grad(_nnx_loss, l2_clip_norm=CLIP, method="vmap"))(model, sampler.sample().take(data))
    with pytest.raises(TypeError, match=r"dpjax\.nnx\.Optimizer\(model, tx\)"):
        optimizer.update(model, g)
    with pytest.raises(ValueError, match="no privacy ledger"):
        dpjax.nnx.Optimizer(model, optax.adam(1e-3))
    with pytest.raises(TypeError, match="ClippedGradient"):
        dpjax.nnx.Optimizer(model, private(sampler)).update(model, nnx.grad(_nnx_loss)(model, {
            "x": data["x"][:4], "y": data["y"][:4]}))


def test_nnx_loop_trains_accounts_and_refuses_a_replay(digits):
    x, y = digits
    data, test = {"x": x[:1500], "y": y[:1500]}, (x[1500:], y[1500:])
    model = NnxMLP(64, 10, 32, rngs=nnx.Rngs(0))
    sampler = dpjax.PoissonSampler(1500, expected_batch_size=150, seed=0)
    grad_fn = dpjax.clipped_grad(_nnx_loss, l2_clip_norm=CLIP, method="vmap")
    optimizer = dpjax.nnx.Optimizer(model, dpjax.privatize(optax.adam(1e-2), noise_multiplier=1.0,
                                                           l2_clip_norm=CLIP, sampler=sampler, seed=0))

    @nnx.jit
    def train_step(model, optimizer, batch):
        optimizer.update(model, grad_fn(model, batch))

    for _ in range(60):
        train_step(model, optimizer, sampler.sample().take(data))
    accuracy = float(jnp.mean(jnp.argmax(model(test[0]), -1) == test[1]))
    assert accuracy > 0.75, accuracy
    assert dpjax.steps_taken(optimizer) == 60
    assert dpjax.epsilon(optimizer, 1e-5) == pytest.approx(dpjax.accounting.epsilon(
        noise_multiplier=1.0, steps=60, delta=1e-5, sampling_rate=0.1), rel=1e-5)
    batch = sampler.sample().take(data)
    train_step(model, optimizer, batch)
    before = nnx.state(model, nnx.Param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dpjax.BatchProvenanceWarning)
        train_step(model, optimizer, batch)  # the same draw again
    assert leaves_equal(nnx.state(model, nnx.Param), before)
    with pytest.raises(dpjax.BatchProvenanceError):
        dpjax.check_budget(optimizer)


@pytest.mark.parametrize("module", ["sampling", "noise", "nnx", "clipping", "ledger", "provenance"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"dpjax.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
