"""The fast clipping engine equals the vmap path (sums and per-example norms)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpjax
from dpjax import fast_clipping, models

RNG = np.random.default_rng(0)


def ce_loss(apply):
    def loss(params, batch):
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, batch["x"]), batch["y"]).mean()

    return loss


def compare(loss_fn, params, batch, rtol=1e-5, mask=None, **kw):
    kw.setdefault("l2_clip_norm", 0.3)
    slow = jax.jit(dpjax.clipped_grad(loss_fn, method="vmap", return_per_example=True, **kw))(params, batch, mask=mask)
    fast = jax.jit(dpjax.clipped_grad(loss_fn, method="fast", return_per_example=True, **kw))(params, batch, mask=mask)
    np.testing.assert_allclose(fast.per_example_norm, slow.per_example_norm, rtol=rtol)
    np.testing.assert_allclose(fast.per_example_loss, slow.per_example_loss, rtol=rtol)
    overall = max(float(np.max(np.abs(a))) for a in jax.tree_util.tree_leaves(slow.sum))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(slow.sum), jax.tree_util.tree_leaves(fast.sum)):
        # Relative to the leaf, or to the whole gradient for leaves whose exact
        # gradient is ~0 (e.g. attention key biases, which softmax ignores).
        scale = max(float(np.max(np.abs(a))), 1e-2 * overall)
        err = float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale
        assert err <= rtol, (jax.tree_util.keystr(path), err)
    assert int(fast.num_nonfinite) == int(slow.num_nonfinite)
    return slow, fast


def leaf_names(params):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def fast_leaves(loss_fn, params, batch):
    plan = fast_clipping.plan_for(loss_fn, params, batch)
    names = leaf_names(params)
    return {names[m.leaf] for m in plan.matched.values()}


def AnchorCNN(widths=(8, 16, 16, 32)):
    """The CNN of ANCHORS.md (4 convs, ReLU, avg-pool, linear head), at small width."""
    return models.ConvNet(widths=widths)


def Encoder(vocab=40, layers=2, tied=False):
    """The transformer of ANCHORS.md (pre-LN encoder, mean-pool classifier), at small size."""
    return models.Encoder(vocab=vocab, d=16, heads=2, ff=64, layers=layers, classes=10, tied=tied)


def image_batch(n=6, hw=8, c=3):
    return {"x": jnp.asarray(RNG.normal(size=(n, hw, hw, c)), jnp.float32), "y": jnp.asarray(RNG.integers(0, 10, n))}


def token_batch(n=5, t=7, vocab=40):
    return {"x": jnp.asarray(RNG.integers(0, vocab, (n, t))), "y": jnp.asarray(RNG.integers(0, 10, n))}


def test_mlp(mlp_setup, digits):
    model, params, loss_fn = mlp_setup
    x, y = digits
    batch = {"x": jnp.asarray(x[:9]), "y": jnp.asarray(y[:9])}
    compare(loss_fn, params, batch)
    assert {n for n in leaf_names(params) if "kernel" in n} <= fast_leaves(loss_fn, params, batch)


def test_anchor_cnn_small():
    model = AnchorCNN()
    batch = image_batch()
    params = model.init(jax.random.PRNGKey(0), batch["x"][:1])
    loss_fn = ce_loss(model.apply)
    compare(loss_fn, params, batch)
    assert {n for n in leaf_names(params) if "kernel" in n} <= fast_leaves(loss_fn, params, batch)


@pytest.mark.parametrize("hw, keep_fraction, marker, extra", [
    # instantiated norms, per-example kernel gradients kept
    (8, float("inf"), (7, 9, 3, 8), {}),
    # instantiated norms, clipped sum recomputed by a second backward pass; microbatched
    (8, 0.0, None, {"microbatch_size": 3}),
    # 4x4 images: ghost norms (patch Gram) with book-keeping; per-layer clipping
    (4, 0.25, (7, 16, 16), {"l2_clip_norm": None,
                            "per_layer_clip_norms": {"params": {f"Conv_{i}": 0.1 * (i + 1) for i in range(4)}
                                                     | {"Dense_0": 0.2}}}),
])
def test_each_conv_strategy_with_masked_and_nan_rows(hw, keep_fraction, marker, extra):
    # tanh, not ReLU: ReLU's backward turns a NaN example's output gradients into
    # zeros, which would hide a missing row selection on G.
    class TanhCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i, w in enumerate((8, 16, 16, 32)):
                x = nn.tanh(nn.Conv(w, (3, 3))(x))
                if i % 2 == 1:
                    x = nn.avg_pool(x, (2, 2), (2, 2))
            return nn.Dense(10)(x.mean(axis=(1, 2)))

    model = TanhCNN()
    batch = image_batch(n=7, hw=hw)
    batch["x"] = batch["x"].at[2].set(jnp.nan)
    mask = jnp.array([True, True, True, True, False, True, False])
    params = model.init(jax.random.PRNGKey(0), batch["x"][:1])
    loss_fn = ce_loss(model.apply)
    slow, fast = compare(loss_fn, params, batch, mask=mask, keep_fraction=keep_fraction, **extra)
    assert int(fast.num_nonfinite) == 1 and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(fast.sum))
    grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0, method="fast", keep_fraction=keep_fraction)
    shapes = _all_shapes(grad_fn, params, batch)
    assert marker is None or marker in shapes
    if keep_fraction == 0.0:
        assert not any(len(s) == 4 and s[:2] == (7, 9) for s in shapes)  # nothing kept per example


@pytest.mark.parametrize("keep_fraction", [float("inf"), 0.0])
def test_long_sequences_and_transposed_convs_instantiate_exactly(keep_fraction):
    """Dense layers over long sequences (2T² > p·d) and a transposed conv (image
    patches of a dilated input) take instantiated norms; their clipped sums are
    kept per example or recomputed by the second backward pass."""

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.tanh(nn.Dense(4)(x))  # (B, 12, 3) -> (B, 12, 4): T = 12, d·p = 12
            img = nn.ConvTranspose(2, (3, 3), strides=(2, 2))(h.reshape(h.shape[0], 4, 3, 4))
            return nn.Dense(10)(img.reshape(img.shape[0], -1))

    batch = {"x": jnp.asarray(RNG.normal(size=(6, 12, 3)), jnp.float32), "y": jnp.asarray(RNG.integers(0, 10, 6))}
    batch["x"] = batch["x"].at[1].set(jnp.inf)
    mask = jnp.array([True, True, True, False, True, True])
    params = M().init(jax.random.PRNGKey(3), batch["x"][:1])
    compare(ce_loss(M().apply), params, batch, mask=mask, keep_fraction=keep_fraction)
    names = fast_leaves(ce_loss(M().apply), params, batch)
    assert {"['params']['Dense_0']['kernel']", "['params']['ConvTranspose_0']['kernel']"} <= names


@pytest.mark.parametrize("conv_kw", [dict(strides=2, padding="VALID"), dict(kernel_dilation=2), dict(padding=((1, 2), (0, 1)))])
def test_conv_variants_2d(conv_kw):
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Conv(6, (3, 3), **conv_kw)(x))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    batch = image_batch(n=5, hw=9, c=2)
    params = M().init(jax.random.PRNGKey(1), batch["x"][:1])
    compare(ce_loss(M().apply), params, batch)
    assert "['params']['Conv_0']['kernel']" in fast_leaves(ce_loss(M().apply), params, batch)


def test_conv_1d():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(5, (3,), strides=2)(x))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    batch = {"x": jnp.asarray(RNG.normal(size=(4, 11, 3)), jnp.float32), "y": jnp.asarray(RNG.integers(0, 10, 4))}
    params = M().init(jax.random.PRNGKey(2), batch["x"][:1])
    compare(ce_loss(M().apply), params, batch)
    assert "['params']['Conv_0']['kernel']" in fast_leaves(ce_loss(M().apply), params, batch)


def test_anchor_transformer_small():
    model = Encoder()
    batch = token_batch()
    params = model.init(jax.random.PRNGKey(0), batch["x"][:1])
    loss_fn = ce_loss(model.apply)
    compare(loss_fn, params, batch)
    fast = fast_leaves(loss_fn, params, batch)
    assert any("query" in n for n in fast) and any("Dense" in n for n in fast)
    assert "['params']['Embed_0']['embedding']" in fast  # token-equality ghost norm


def test_embedding_with_repeated_tokens():
    model = Encoder(vocab=5, layers=1)
    batch = token_batch(n=6, t=9, vocab=5)  # every sequence repeats tokens
    params = model.init(jax.random.PRNGKey(3), batch["x"][:1])
    assert any(len(set(row.tolist())) < len(row) for row in np.asarray(batch["x"]))
    compare(ce_loss(model.apply), params, batch)


def test_tied_embeddings_are_fast_and_exact():
    # Lookup and LM head share the table: cross term sum_t sum_s G[s, tok_t] <h_s, e_t>.
    model = Encoder(tied=True)
    batch = token_batch()
    params = model.init(jax.random.PRNGKey(0), batch["x"][:1])
    loss_fn = ce_loss(model.apply)
    compare(loss_fn, params, batch)
    assert "['params']['Embed_0']['embedding']" in fast_leaves(loss_fn, params, batch)


def test_a_layer_applied_twice_is_fast_and_exact():
    # The same kernel at two places (same layout): cross Gram <A_1 A_2^T, G_1 G_2^T>.
    def loss(params, batch):
        h = jnp.tanh(batch["x"] @ params["w"])
        return jnp.mean((jnp.tanh(h @ params["w"]) @ params["v"] - batch["y"]) ** 2)

    params = {"w": jnp.asarray(RNG.normal(size=(5, 5)), jnp.float32) / 2,
              "v": jnp.asarray(RNG.normal(size=(5, 2)), jnp.float32)}
    batch = {"x": jnp.asarray(RNG.normal(size=(6, 3, 5)), jnp.float32),
             "y": jnp.asarray(RNG.normal(size=(6, 3, 2)), jnp.float32)}
    compare(loss, params, batch)
    assert fast_leaves(loss, params, batch) == {"['w']", "['v']"}


def test_custom_op_on_a_weight_falls_back_exactly():
    @jax.custom_jvp
    def soft_sign(w):
        return w / (1 + jnp.abs(w))

    @soft_sign.defjvp
    def _(primals, tangents):
        (w,), (t,) = primals, tangents
        return soft_sign(w), t / (1 + jnp.abs(w)) ** 2

    def loss(params, batch):
        h = jnp.tanh(batch["x"] @ soft_sign(params["w1"]))
        logits = h @ params["w2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    params = {"w1": jnp.asarray(RNG.normal(size=(6, 8)), jnp.float32), "w2": jnp.asarray(RNG.normal(size=(8, 10)), jnp.float32)}
    batch = {"x": jnp.asarray(RNG.normal(size=(7, 6)), jnp.float32), "y": jnp.asarray(RNG.integers(0, 10, 7))}
    compare(loss, params, batch)
    assert fast_leaves(loss, params, batch) == {"['w2']"}


def test_weight_used_twice_in_another_layout_falls_back():
    def loss(params, batch):
        h = jnp.tanh(batch["x"] @ params["w"])
        return jnp.mean((h @ params["w"].T - batch["x"]) ** 2)

    params = {"w": jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)}
    batch = {"x": jnp.asarray(RNG.normal(size=(6, 5)), jnp.float32)}
    compare(loss, params, batch)
    assert fast_leaves(loss, params, batch) == set()


def test_nnx_model_unmodified():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.norm = nnx.LayerNorm(4, rngs=rngs)
            self.out = nnx.Linear(4 * 8 * 8, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.norm(self.conv(x)))
            return self.out(x.reshape(x.shape[0], -1))

    model = Net(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    batch = image_batch(n=4)
    loss_fn = ce_loss(apply)
    compare(loss_fn, params, batch)
    fast = fast_leaves(loss_fn, params, batch)
    assert any("conv" in n and "kernel" in n for n in fast) and any("out" in n and "kernel" in n for n in fast)


def test_padded_batches_microbatching_and_nan(mlp_setup, digits):
    _, params, loss_fn = mlp_setup
    x, y = digits
    bad_x = jnp.asarray(x[:11]).at[4].set(jnp.nan)
    batch = {"x": bad_x, "y": jnp.asarray(y[:11])}
    mask = np.array([True] * 8 + [False] * 3)
    slow, fast = compare(loss_fn, params, batch, mask=mask, microbatch_size=4)
    assert int(fast.num_nonfinite) == 1 and int(fast.num_examples) == 8
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree_util.tree_leaves(fast.sum))


def test_per_layer_clipping(mlp_setup, digits):
    _, params, loss_fn = mlp_setup
    x, y = digits
    batch = {"x": jnp.asarray(x[:8]), "y": jnp.asarray(y[:8])}
    norms = {"params": {"Dense_0": 0.2, "Dense_1": 0.3}}
    slow, fast = compare(loss_fn, params, batch, l2_clip_norm=None, per_layer_clip_norms=norms)
    assert fast.sensitivity == slow.sensitivity


def test_mixed_precision_bf16_activations():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Dense(16, dtype=jnp.bfloat16)(x))
            return nn.Dense(10, dtype=jnp.bfloat16)(x).astype(jnp.float32)

    batch = {"x": jnp.asarray(RNG.normal(size=(6, 12)), jnp.float32), "y": jnp.asarray(RNG.integers(0, 10, 6))}
    params = M().init(jax.random.PRNGKey(0), batch["x"][:1])
    slow, fast = compare(ce_loss(M().apply), params, batch, rtol=2e-2)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(fast.sum))


def test_ghost_norm_does_not_materialise_per_example_weight_gradients():
    """For a sequence model where the ghost norm is cheaper, no (batch, d, p) array
    appears anywhere in the computation; the vmap path does form it."""
    d, p, t, b = 64, 48, 4, 16  # 2 T^2 = 32 <= p d

    def loss(params, batch):
        h = jnp.tanh(batch["x"] @ params["w"])
        return jnp.mean(h**2)

    params = {"w": jnp.asarray(RNG.normal(size=(d, p)), jnp.float32)}
    batch = {"x": jnp.asarray(RNG.normal(size=(b, t, d)), jnp.float32)}
    compare(loss, params, batch)

    def shapes(method):
        return _all_shapes(dpjax.clipped_grad(loss, l2_clip_norm=1.0, method=method), params, batch)

    assert (b, d, p) in shapes("vmap")
    assert (b, d, p) not in shapes("fast")


def _all_shapes(fn, *args):
    found = set()

    def walk(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                found.add(tuple(v.aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _kernel_shapes(params):
    return [x.shape for p, x in jax.tree_util.tree_leaves_with_path(params) if "kernel" in jax.tree_util.keystr(p)]


def test_cnn_fast_path_forms_per_example_kernel_gradients_only_within_the_budget():
    """Only the layers the plan lets keep per-example kernel gradients (bottom-up,
    within keep_fraction of the activations) form them; the others are never
    formed per example, in any layout, and nothing of size batch × parameters appears."""
    model = AnchorCNN(widths=(16, 32, 32, 64))
    b = 12
    batch = image_batch(n=b, hw=16)
    params = model.init(jax.random.PRNGKey(0), batch["x"][:1])
    loss_fn = ce_loss(model.apply)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

    def per_example_layouts(k):  # HWIO kernel: as is, flat, per-offset (B, K, C, O)
        return {(b,) + k, (b, int(np.prod(k))), (b, k[0] * k[1], k[2], k[3])}

    plan = fast_clipping.plan_for(loss_fn, params, batch)
    strategy = fast_clipping.strategies(plan, fast_clipping.KEEP_FRACTION)
    kept = [plan.matched[k].weight_shape for k, s in strategy.items() if s == "keep"]
    others = [plan.matched[k].weight_shape for k, s in strategy.items()
              if s != "keep" and plan.matched[k].kind == "conv"]
    assert (3, 3, 3, 16) in kept and others, (kept, others)  # the lowest conv keeps, the top ones do not
    budget = fast_clipping.KEEP_FRACTION * sum(np.prod(m.act_shape) + np.prod(m.out_shape)
                                               for m in plan.matched.values())
    assert sum(np.prod(k) for k in kept) <= budget
    vmap_shapes = _all_shapes(dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0, method="vmap"), params, batch)
    fast_shapes = _all_shapes(dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0, method="fast"), params, batch)
    for k in others:
        assert per_example_layouts(k) & vmap_shapes  # the check can see them when they are there
        assert not per_example_layouts(k) & fast_shapes, k
    for k in kept:
        assert (b, k[0] * k[1], k[2], k[3]) in fast_shapes  # kept, batch-first per offset
    convs = [k for k in _kernel_shapes(params) if len(k) == 4]
    # Image patches exist only for a slice of the batch at a time, never for all b examples.
    assert not any(len(s) == 3 and s[0] == b and s[2] == 9 * k[2] for k in convs for s in fast_shapes)
    assert (b, n_params) not in fast_shapes
    assert max(int(np.prod(s)) for s in fast_shapes) < b * n_params


def test_fast_path_scratch_memory_stays_near_non_private_on_the_anchors_cnn():
    """XLA's scratch (a compile-time number, not a timing) of the clipped gradient
    stays within 1.25x of the non-private gradient's on the ANCHORS CNN (32x32x3,
    convs 32-64-64-128); keeping every layer's per-example gradients instead of
    recomputing the wide top layers' clipped sums does not."""
    model = models.ConvNet()
    b = 128
    batch = {"x": jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.float32), "y": jax.ShapeDtypeStruct((b,), jnp.int32)}
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    loss_fn = ce_loss(model.apply)

    def scratch(fn):
        return jax.jit(fn).lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    non_private = scratch(jax.grad(loss_fn))
    fast = scratch(dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0, method="fast"))
    assert fast <= 1.25 * non_private, (fast, non_private)
    keep_all = scratch(dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0, method="fast", keep_fraction=float("inf")))
    assert keep_all > 1.25 * non_private, (keep_all, non_private)


@pytest.mark.parametrize("bad", [-0.1, "0.25", True, float("nan")])
def test_bad_keep_fraction_is_refused(bad):
    with pytest.raises(ValueError, match="keep_fraction"):
        dpjax.clipped_grad(lambda p, b: 0.0, l2_clip_norm=1.0, keep_fraction=bad)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method"):
        dpjax.clipped_grad(lambda p, b: 0.0, l2_clip_norm=1.0, method="ghostly")
