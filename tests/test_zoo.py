"""The fast path on the model zoo (benchmarks/zoo_models.py, small sizes): equal to
vmap with masks, NaN rows, microbatching and per-layer clipping; scanned and tied
weights never formed per example; ``benchmarks.zoo`` runs end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpjax
from benchmarks import zoo, zoo_models
from dpjax import fast_clipping

B = 5


def _batch(zm):
    batch = zm.batch(B)
    if batch["x"].dtype == jnp.float32:  # one example with a NaN input: it must drop out
        batch["x"] = batch["x"].at[1].set(jnp.nan)
    return batch


def _compare(zm, **kw):
    batch, mask = _batch(zm), jnp.arange(B) < B - 1  # the last example is padding
    out = {m: jax.jit(dpjax.clipped_grad(zm.loss_fn, method=m, return_per_example=True, **kw))(
        zm.params, batch, mask=mask) for m in ("vmap", "fast")}
    slow, fast = out["vmap"], out["fast"]
    real = np.isfinite(np.asarray(slow.per_example_norm))
    np.testing.assert_allclose(np.asarray(fast.per_example_norm)[real], np.asarray(slow.per_example_norm)[real],
                               rtol=1e-5)
    overall = max(float(np.max(np.abs(a))) for a in jax.tree_util.tree_leaves(slow.sum))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(slow.sum), jax.tree_util.tree_leaves(fast.sum)):
        scale = max(float(np.max(np.abs(a))), 1e-2 * overall)
        assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale <= 1e-5, jax.tree_util.keystr(path)
    assert int(fast.num_nonfinite) == int(slow.num_nonfinite)
    assert int(fast.num_examples) == B - 1
    return fast


@pytest.mark.parametrize("name", zoo_models.MODELS)
def test_fast_equals_vmap_on_every_zoo_model(name):
    zm = zoo_models.build(name, "small")
    # Per-layer clipping (a norm per top-level module), microbatches of 2, a padded row,
    # a NaN row for image and vector inputs.
    norms = {"params": {k: 0.2 for k in zm.params["params"]}} if "params" in zm.params else \
        dpjax.even_layer_clip_norms(zm.params, 0.5)
    fast = _compare(zm, per_layer_clip_norms=norms, microbatch_size=2)
    if zm.batch(B)["x"].dtype == jnp.float32:
        assert int(fast.num_nonfinite) == 1


@pytest.mark.parametrize("name", ["gpt2", "scan", "remat", "lora"])
def test_most_parameters_take_the_fast_path(name):
    zm = zoo_models.build(name, "small")
    plan = fast_clipping.plan_for(zm.loss_fn, zm.params, zm.batch(2))
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(zm.params)]
    fast = {names[m.leaf] for m in plan.matched.values()}
    kernels = {n for n in names if n.endswith("['kernel']") or "lora_" in n or "embedding" in n}
    assert kernels <= fast, kernels - fast


def test_plan_explains_every_leaf():
    zm = zoo_models.build("gpt2", "small")
    plan = fast_clipping.plan_for(zm.loss_fn, zm.params, zm.batch(2))
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(zm.params)]
    lines = dict(line.split(": ", 1) for line in plan.explain(names).splitlines())
    assert set(lines) == set(names)
    assert "shared weight" in lines["['params']['wte']['embedding']"]
    assert lines["['params']['Block_0']['Dense_0']['base']['bias']"].startswith("per-example gradient (fallback): used by")


def _all_shapes(fn, *args):
    found = set()

    def walk(jx):
        for eqn in jx.eqns:
            found.update(tuple(v.aval.shape) for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("name, leaf", [("gpt2", ("params", "wte", "embedding")),
                                        ("scan", ("params", "ScanResidualMLP_0", "Dense_0", "kernel")),
                                        ("remat", ("params", "ScanCheckpointResidualMLP_0", "Dense_1", "kernel"))])
def test_tied_and_scanned_weights_are_never_formed_per_example(name, leaf):
    zm = zoo_models.build(name, "small")
    batch = zm.batch(B)
    w = zm.params
    for k in leaf:
        w = w[k]
    per_example = {(B,) + w.shape, (B, int(np.prod(w.shape)))}  # whole, flat
    if name != "gpt2":  # a stacked kernel: one iteration's slice per example, too
        per_example |= {(B,) + w.shape[1:], (B, int(np.prod(w.shape[1:])))}
    vmap_shapes = _all_shapes(dpjax.clipped_grad(zm.loss_fn, l2_clip_norm=1.0, method="vmap"), zm.params, batch)
    fast_shapes = _all_shapes(dpjax.clipped_grad(zm.loss_fn, l2_clip_norm=1.0, method="fast"), zm.params, batch)
    assert per_example & vmap_shapes  # the check sees them where they are
    assert not per_example & fast_shapes, per_example & fast_shapes


def test_zoo_benchmark_writes_json_markdown_and_plot(tmp_path):
    assert zoo.main(["--models", "lora", "--size", "small", "--batch", "4", "--steps", "2",
                     "--out", str(tmp_path)]) == 0
    import json

    rows = json.loads((tmp_path / "zoo.json").read_text())["rows"]
    assert {r["method"] for r in rows} == set(zoo.METHODS)
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert all(0 < r["fast_fraction"] <= 1 for r in rows)
    assert "| lora |" in (tmp_path / "zoo.md").read_text()
    assert (tmp_path / "zoo.png").stat().st_size > 1000
