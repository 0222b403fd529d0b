"""Invariant 8 (per-example separability), per-example randomness and has_aux.

dpjax evaluates the loss on one example at a time; a model or loss that mixes
examples, or one random key shared by every example, is refused when tracing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpjax
from dpjax.separability import CrossExampleError, SharedRandomnessError

X = jnp.asarray(np.random.default_rng(0).normal(size=(6, 8, 8, 1)), jnp.float32)
Y = jnp.arange(6) % 10


class ConvNorm(nn.Module):
    norm: str = "batch"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Conv(4, (3, 3))(x)
        if self.norm == "batch":
            x = nn.BatchNorm(use_running_average=not train)(x)
        else:
            x = nn.GroupNorm(num_groups=2)(x)
        x = nn.Dropout(self.dropout, deterministic=self.dropout == 0.0)(nn.relu(x))
        return nn.Dense(10)(x.mean((1, 2)))


def _linen_loss(model, variables, train, **apply_kw):
    def loss(p, batch, **kw):
        out = model.apply({**variables, "params": p}, batch["x"], train=train,
                          mutable=["batch_stats"] if "batch_stats" in variables else False, **apply_kw, **kw)
        logits = out[0] if "batch_stats" in variables else out
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return loss


@pytest.mark.parametrize("method", ["vmap", "fast"])
def test_batchnorm_in_training_mode_is_refused(method):
    model = ConvNorm("batch")
    v = model.init(jax.random.PRNGKey(0), X[:1])
    grad_fn = dpjax.clipped_grad(_linen_loss(model, v, train=True), l2_clip_norm=1.0, method=method)
    with pytest.raises(CrossExampleError, match="BatchNorm.*GroupNorm.*use_running_average=True"):
        jax.jit(grad_fn)(v["params"], {"x": X, "y": Y})
    # Frozen statistics and GroupNorm are per-example: accepted.
    dpjax.clipped_grad(_linen_loss(model, v, train=False), l2_clip_norm=1.0, method=method)(
        v["params"], {"x": X, "y": Y})
    gn = ConvNorm("group")
    vg = gn.init(jax.random.PRNGKey(0), X[:1])
    dpjax.clipped_grad(_linen_loss(gn, vg, train=True), l2_clip_norm=1.0, method=method)(vg["params"], {"x": X, "y": Y})


def test_nnx_batchnorm_in_training_mode_is_refused():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.out = nnx.Linear(4, 10, rngs=rngs)

        def __call__(self, x):
            return self.out(self.bn(self.conv(x)).mean((1, 2)))

    model = Net(nnx.Rngs(0))

    def loss(m, batch):
        return optax.softmax_cross_entropy_with_integer_labels(m(batch["x"]), batch["y"]).mean()

    with pytest.raises(CrossExampleError, match="statistics of the whole batch"):
        dpjax.clipped_grad(loss, l2_clip_norm=1.0)(model, {"x": X, "y": Y})
    model.eval()  # frozen statistics
    dpjax.clipped_grad(loss, l2_clip_norm=1.0)(model, {"x": X, "y": Y})


def _features(w, batch):
    return batch["x"].reshape(batch["x"].shape[0], -1) @ w


def test_batch_level_losses_are_refused_and_per_example_means_are_not():
    w = jnp.ones((64, 3)) / 64

    def logsumexp_over_batch(w, b):
        return jax.nn.logsumexp(_features(w, b).sum(-1))

    def contrastive(w, b):
        z = _features(w, b)
        return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(z @ z.T, axis=-1)))

    def token_mean(w, b):  # sum over real tokens / their number: a mean of per-example terms here
        ce = _features(w, b).sum(-1)
        return jnp.sum(ce * b["m"]) / jnp.sum(b["m"])

    batch = {"x": X, "y": Y, "m": jnp.ones(6)}
    with pytest.raises(CrossExampleError, match="statistics of the whole batch"):
        dpjax.clipped_grad(logsumexp_over_batch, l2_clip_norm=1.0)(w, batch)
    with pytest.raises(CrossExampleError, match="Gram or similarity matrix of the batch"):
        dpjax.clipped_grad(contrastive, l2_clip_norm=1.0)(w, batch)
    dpjax.clipped_grad(token_mean, l2_clip_norm=1.0)(w, batch)


def test_a_shared_dropout_key_is_refused():
    model = ConvNorm("group", dropout=0.5)
    v = model.init(jax.random.PRNGKey(0), X[:1])
    key = jax.random.PRNGKey(3)
    closed_over = _linen_loss(model, v, train=True, rngs={"dropout": key})
    with pytest.raises(SharedRandomnessError, match="every example shares.*rng=key"):
        dpjax.clipped_grad(closed_over, l2_clip_norm=1.0)(v["params"], {"x": X, "y": Y})

    def key_as_argument(p, batch, k):
        return _linen_loss(model, v, train=True, rngs={"dropout": k})(p, batch)

    with pytest.raises(SharedRandomnessError):
        dpjax.clipped_grad(key_as_argument, l2_clip_norm=1.0)(v["params"], {"x": X, "y": Y}, key)


def test_rng_gives_every_example_its_own_dropout_mask_and_fast_equals_vmap():
    model = ConvNorm("group", dropout=0.5)
    v = model.init(jax.random.PRNGKey(0), X[:1])

    def loss(p, batch, rng):
        return _linen_loss(model, v, train=True, rngs={"dropout": rng})(p, batch)

    same = {"x": jnp.repeat(X[:1], 6, 0), "y": jnp.repeat(Y[:1], 6)}  # six copies of one example
    key = jax.random.PRNGKey(7)
    out = {}
    for method in ("vmap", "fast"):
        grad_fn = jax.jit(dpjax.clipped_grad(loss, l2_clip_norm=0.5, method=method, return_per_example=True,
                                             microbatch_size=4))
        out[method] = grad_fn(v["params"], same, rng=key, mask=jnp.arange(6) < 5)
    losses = np.asarray(out["vmap"].per_example_loss)
    assert len(np.unique(np.round(losses, 5))) == 6, losses  # a different mask per example
    np.testing.assert_allclose(out["fast"].per_example_loss, losses, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(out["fast"].sum), jax.tree_util.tree_leaves(out["vmap"].sum)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Another key, other masks; the same key, the same masks.
    again = jax.jit(dpjax.clipped_grad(loss, l2_clip_norm=0.5, method="vmap", return_per_example=True))
    np.testing.assert_allclose(again(v["params"], same, rng=key).per_example_loss[:5], losses[:5], rtol=1e-5)
    assert not np.allclose(again(v["params"], same, rng=jax.random.PRNGKey(8)).per_example_loss, losses)
    with pytest.raises(TypeError, match="PRNG key"):
        again(v["params"], same, rng=7)


@pytest.mark.parametrize("method", ["vmap", "fast"])
def test_has_aux_returns_each_examples_aux(method):
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 3))

    def loss(w, b):
        out = _features(w, b)
        return jnp.mean(out ** 2), {"out": out, "mean": out.mean()}

    with pytest.raises(TypeError, match="has_aux=True"):
        dpjax.clipped_grad(loss, l2_clip_norm=1.0, method=method)(w, {"x": X})
    with pytest.raises(TypeError, match="pair"):
        dpjax.clipped_grad(lambda w, b: loss(w, b)[0], l2_clip_norm=1.0, has_aux=True, method=method)(w, {"x": X})
    g = jax.jit(dpjax.clipped_grad(loss, l2_clip_norm=1.0, has_aux=True, method=method, microbatch_size=4))(
        w, {"x": X})
    assert g.aux["out"].shape == (6, 1, 3) and g.aux["mean"].shape == (6,)
    np.testing.assert_allclose(g.aux["out"][:, 0], _features(w, {"x": X}), rtol=1e-5)
    plain = dpjax.clipped_grad(lambda w, b: loss(w, b)[0], l2_clip_norm=1.0, method=method)(w, {"x": X})
    np.testing.assert_allclose(g.sum, plain.sum, rtol=1e-5, atol=1e-7)  # jit + microbatches reorder float sums
