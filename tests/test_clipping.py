"""clipped_grad: invariants 1 (bounded contribution, NaN -> 0) and 2 (masks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dpjax
from dpjax.clipping import ClippedGradient


def tree_allclose(a, b, rtol=1e-5, atol=1e-6):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def tree_norm(t):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(t))))


def loop_reference(loss_fn, params, batch, clip, mask=None):
    """Plain Python loop: per-example jax.grad, clip, sum (the spec)."""
    n = len(batch["y"])
    total = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, np.float64), params)
    for i in range(n):
        if mask is not None and not mask[i]:
            continue
        ex = {k: v[i : i + 1] for k, v in batch.items()}
        g = jax.grad(loss_fn)(params, ex)
        norm = tree_norm(g)
        if not np.isfinite(norm):
            continue
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        total = jax.tree_util.tree_map(lambda t, x: t + scale * np.asarray(x, np.float64), total, g)
    return total


def batch_of(digits, n, start=0):
    x, y = digits
    return {"x": jnp.asarray(x[start : start + n]), "y": jnp.asarray(y[start : start + n])}


@pytest.mark.parametrize("setup", ["mlp_setup", "cnn_setup"])
def test_equals_python_loop(setup, digits, request):
    _, params, loss_fn = request.getfixturevalue(setup)
    batch = batch_of(digits, 16)
    clip = 0.5
    g = jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=clip))(params, batch)
    assert isinstance(g, ClippedGradient)
    assert g.sensitivity == clip
    assert int(g.num_examples) == 16 and int(g.num_nonfinite) == 0
    tree_allclose(g.sum, loop_reference(loss_fn, params, batch, clip))


def test_some_examples_are_actually_clipped(mlp_setup, digits):
    # Guard against a vacuous comparison: with this clip, most norms exceed C.
    _, params, loss_fn = mlp_setup
    batch = batch_of(digits, 16)
    g = dpjax.clipped_grad(loss_fn, l2_clip_norm=0.5, return_per_example=True)(params, batch)
    assert np.sum(np.asarray(g.per_example_norm) > 0.5) >= 8


@pytest.mark.parametrize("n, micro", [(16, 4), (13, 4), (13, 5), (7, 100)])
def test_microbatched_equals_unchunked(mlp_setup, digits, n, micro):
    _, params, loss_fn = mlp_setup
    batch = batch_of(digits, n)
    full = dpjax.clipped_grad(loss_fn, l2_clip_norm=0.7, return_per_example=True)(params, batch)
    chunked = jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=0.7, microbatch_size=micro, return_per_example=True))(
        params, batch
    )
    tree_allclose(full.sum, chunked.sum, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(full.per_example_loss, chunked.per_example_loss, rtol=1e-6)
    np.testing.assert_allclose(full.per_example_norm, chunked.per_example_norm, rtol=1e-6)
    assert int(chunked.num_examples) == n


def test_masked_examples_contribute_exactly_zero(mlp_setup, digits):
    _, params, loss_fn = mlp_setup
    grad_fn = jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0))
    batch = batch_of(digits, 12)
    mask = np.array([True] * 8 + [False] * 4)
    masked = grad_fn(params, batch, mask=mask)
    # Same shape, different garbage (including NaN) in the padded slots: bit-identical.
    garbage = {
        "x": batch["x"].at[8:].set(jnp.nan),
        "y": batch["y"].at[8:].set(3),
    }
    masked_garbage = grad_fn(params, garbage, mask=mask)
    for a, b in zip(jax.tree_util.tree_leaves(masked.sum), jax.tree_util.tree_leaves(masked_garbage.sum)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(masked_garbage.num_nonfinite) == 0  # padding is not counted as a NaN example
    assert int(masked.num_examples) == 8
    # And equal to the unpadded 8-example batch.
    tree_allclose(masked.sum, grad_fn(params, batch_of(digits, 8)).sum, rtol=1e-6, atol=1e-7)
    tree_allclose(masked.sum, loop_reference(loss_fn, params, batch, 1.0, mask))


def test_nan_examples_contribute_zero_and_are_counted(mlp_setup, digits):
    _, params, loss_fn = mlp_setup
    batch = batch_of(digits, 10)
    bad = {"x": batch["x"].at[3].set(jnp.nan).at[7, 0, 0, 0].set(jnp.inf), "y": batch["y"]}
    g = jax.jit(dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0, microbatch_size=4))(params, bad)
    assert int(g.num_nonfinite) == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(g.sum))
    keep = np.ones(10, bool)
    keep[[3, 7]] = False
    tree_allclose(g.sum, loop_reference(loss_fn, params, batch, 1.0, keep))


def test_huge_finite_gradient_is_bounded(digits):
    # An example whose squared norm overflows float32 must still contribute <= C (here: 0).
    def loss(w, batch):
        return jnp.mean(batch["x"] @ w)

    batch = {"x": jnp.array([[3e38, 3e38], [1.0, 0.0]], jnp.float32)}
    g = dpjax.clipped_grad(loss, l2_clip_norm=1.0)(jnp.zeros(2), batch)
    assert np.all(np.isfinite(np.asarray(g.sum)))
    assert np.linalg.norm(np.asarray(g.sum)) <= 2.0 + 1e-6


def test_per_layer_clipping(mlp_setup, digits):
    _, params, loss_fn = mlp_setup
    batch = batch_of(digits, 12)
    norms = {"params": {"Dense_0": 0.3, "Dense_1": 0.4}}
    grad_fn = jax.jit(dpjax.clipped_grad(loss_fn, per_layer_clip_norms=norms))
    g = grad_fn(params, batch)
    assert g.sensitivity == pytest.approx(0.5)
    # Reference: loop, clipping each layer's subtree separately.
    expected = {"params": {}}
    for layer, c in norms["params"].items():
        sub_total = jax.tree_util.tree_map(lambda p: np.zeros(p.shape), params["params"][layer])
        for i in range(12):
            ex = {k: v[i : i + 1] for k, v in batch.items()}
            sub = jax.grad(loss_fn)(params, ex)["params"][layer]
            n = tree_norm(sub)
            s = min(1.0, c / n)
            sub_total = jax.tree_util.tree_map(lambda t, x: t + s * np.asarray(x), sub_total, sub)
        expected["params"][layer] = sub_total
    tree_allclose(g.sum, expected)
    # Each example's contribution per layer is within that layer's norm.
    for i in range(12):
        one = grad_fn(params, batch, mask=np.arange(12) == i)
        for layer, c in norms["params"].items():
            assert tree_norm(one.sum["params"][layer]) <= c * (1 + 1e-5)


def test_even_layer_clip_norms_keep_total_sensitivity(mlp_setup, digits):
    _, params, loss_fn = mlp_setup
    norms = dpjax.even_layer_clip_norms(params, 2.0)
    g = dpjax.clipped_grad(loss_fn, per_layer_clip_norms=norms)(params, batch_of(digits, 4))
    assert g.sensitivity == pytest.approx(2.0)


@settings(max_examples=25, deadline=None)
@given(
    clip=st.floats(1e-3, 10.0),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 9),
)
def test_property_every_contribution_within_clip_norm(clip, scale, seed, n):
    """Invariant 1 for arbitrary data scales: any single example's contribution is <= C."""
    rng = np.random.default_rng(seed)
    w = {"a": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}

    def loss(params, batch):
        h = jnp.tanh(batch["x"] @ params["a"] + params["b"])
        return jnp.mean(jnp.sum((h - batch["t"]) ** 2, axis=1)) * scale

    batch = {"x": jnp.asarray(rng.normal(size=(n, 5)) * scale, jnp.float32), "t": jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)}
    grad_fn = _jitted_property_grad(loss, clip)
    for i in range(n):
        one = grad_fn(w, batch, mask=jnp.arange(n) == i)
        assert tree_norm(one.sum) <= clip * (1 + 1e-5)
    total = grad_fn(w, batch, mask=jnp.ones(n, bool))
    assert tree_norm(total.sum) <= n * clip * (1 + 1e-5)


def _jitted_property_grad(loss, clip):
    return jax.jit(dpjax.clipped_grad(loss, l2_clip_norm=clip))


def test_return_per_example(mlp_setup, digits):
    _, params, loss_fn = mlp_setup
    batch = batch_of(digits, 5)
    g = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0, return_per_example=True)(params, batch)
    for i in range(5):
        ex = {k: v[i : i + 1] for k, v in batch.items()}
        np.testing.assert_allclose(g.per_example_loss[i], loss_fn(params, ex), rtol=1e-5)
        np.testing.assert_allclose(g.per_example_norm[i], tree_norm(jax.grad(loss_fn)(params, ex)), rtol=1e-5)
    plain = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0)(params, batch)
    assert plain.per_example_loss is None and plain.per_example_norm is None


def test_extra_args_are_broadcast(digits):
    def loss(w, batch, offset):
        return jnp.mean((batch["x"] @ w - offset) ** 2)

    batch = {"x": jnp.ones((3, 2))}
    g = dpjax.clipped_grad(loss, l2_clip_norm=100.0)(jnp.zeros(2), batch, 2.0)
    np.testing.assert_allclose(np.asarray(g.sum), 3 * np.array([-4.0, -4.0]), rtol=1e-6)


def test_bad_inputs(mlp_setup, digits):
    _, params, loss_fn = mlp_setup
    with pytest.raises(ValueError, match="l2_clip_norm"):
        dpjax.clipped_grad(loss_fn, l2_clip_norm=0.0)
    with pytest.raises(ValueError, match="l2_clip_norm"):
        dpjax.clipped_grad(loss_fn, l2_clip_norm=float("nan"))
    with pytest.raises(ValueError, match="exactly one"):
        dpjax.clipped_grad(loss_fn)
    with pytest.raises(ValueError, match="exactly one"):
        dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0, per_layer_clip_norms={"a": 1.0})
    with pytest.raises(ValueError, match="per_layer_clip_norms"):
        dpjax.clipped_grad(loss_fn, per_layer_clip_norms={"a": -1.0})
    with pytest.raises(ValueError, match="microbatch_size"):
        dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0, microbatch_size=0)
    grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0)
    x, y = digits
    with pytest.raises(ValueError, match="mismatched batch axes"):
        grad_fn(params, {"x": jnp.asarray(x[:4]), "y": jnp.asarray(y[:5])})
    with pytest.raises(ValueError, match="mask must have shape"):
        grad_fn(params, batch_of(digits, 4), mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="prefix"):
        dpjax.clipped_grad(loss_fn, per_layer_clip_norms={"nope": 1.0})(params, batch_of(digits, 2))

    def vector_loss(params, batch):
        return jnp.ones(3)

    with pytest.raises(TypeError, match="scalar"):
        dpjax.clipped_grad(vector_loss, l2_clip_norm=1.0)(params, batch_of(digits, 2))
