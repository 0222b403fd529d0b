"""Subprocess half of tests/test_parallel.py (JAX must see several devices, so it
cannot run inside the pytest process, which has already initialised JAX).

    python tests/parallel_worker.py checks OUT.json
        one process, XLA_FLAGS=--xla_force_host_platform_device_count=4: the
        single-host checks, each result (or its error) written to OUT.json.
    python tests/parallel_worker.py multihost PID NPROC PORT OUT_DIR
        one of NPROC processes joined through jax.distributed on 127.0.0.1:PORT
        (CPU collectives); writes OUT_DIR/process_PID.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np

# Configuration shared by the multi-host run and its single-process emulation.
MANUAL = dict(n=400, expected_batch_size=32.0, sigma=1.0, clip=1.0, steps=4, sampler_seed=7, noise_seed=11)
FIT = dict(n=400, batch_size=32, noise_multiplier=1.0, epochs=1, seed=5)


def _imports():
    global jax, jnp, optax, nn, dpjax, parallel
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    import dpjax
    from dpjax import parallel


class TinyMLP:  # built lazily: flax is imported after jax.distributed.initialize
    model = None


def tiny_model():
    if TinyMLP.model is None:

        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = x.reshape((x.shape[0], -1))
                return nn.Dense(10)(nn.tanh(nn.Dense(16)(x)))

        TinyMLP.model = MLP()
    return TinyMLP.model


def digits(n):
    d = dpjax.datasets.load_digits()
    return {"x": d["x_train"][:n], "y": d["y_train"][:n]}, d


def loss_of(model):
    def loss(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b["x"]), b["y"]).mean()

    return loss


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(leaves(a), leaves(b)))


def replicas_identical(tree):
    for leaf in jax.tree_util.tree_leaves(tree):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        if not all(np.array_equal(shards[0], s) for s in shards[1:]):
            return False
    return True


# ----------------------------------------------------------------- manual loop


def manual_run(mesh, parts, process_count):
    """Train MANUAL["steps"] steps with the parallel API. ``parts``: the process
    indices whose rows this process feeds (its own in a real multi-host run;
    all of them when one process emulates several)."""
    cfg = MANUAL
    model = tiny_model()
    data, _ = digits(cfg["n"])
    devices_per_process = len(mesh.devices.flat) // process_count
    samplers = [
        parallel.ShardedPoissonSampler(
            cfg["n"], process_index=p, process_count=process_count, expected_batch_size=cfg["expected_batch_size"],
            seed=cfg["sampler_seed"], devices_per_process=devices_per_process,
        )
        for p in parts
    ]
    tx = dpjax.privatize(optax.adam(1e-2), noise_multiplier=cfg["sigma"], l2_clip_norm=cfg["clip"],
                         sampler=samplers[0], seed=cfg["noise_seed"])
    params = model.init(jax.random.PRNGKey(0), data["x"][:1])
    params = parallel.replicate(params, mesh)
    state = parallel.replicate(tx.init(params), mesh)
    grad_fn = dpjax.clipped_grad(loss_of(model), l2_clip_norm=cfg["clip"], method="vmap")
    step = parallel.make_step(grad_fn, tx, mesh)
    sizes = []
    for _ in range(cfg["steps"]):
        parts = []
        for s in samplers:
            b = s.sample()
            parts.append(b.take(s.local_slice(data)))
            sizes.append(b.size)
        # One process feeds its own part; an emulation of several concatenates theirs
        # (rows and masks, in process order; the stamps are the same on every process).
        batch = dpjax.SampledBatch(data=jax.tree_util.tree_map(lambda *a: np.concatenate(a), *[p.data for p in parts]),
                                   mask=np.concatenate([p.mask for p in parts]), provenance=parts[0].provenance)
        params, state, metrics = step(params, state, parallel.shard_batch(batch, mesh))
    return params, state, sizes


def unverified(**kw):
    """privatize for checks that feed one fixed batch every step (numerics, not provenance)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dpjax.UnverifiedBatchesWarning)
        return dpjax.privatize(trust_unverified_batches=True, **kw)


# --------------------------------------------------------------------- checks


def count_random_bits(closed_jaxpr):
    """(draws outside any shard_map, draws inside a shard_map)."""
    from jax.extend import core as jex_core

    counts = {"outside": 0, "inside": 0}

    def subjaxprs(value):
        if isinstance(value, jex_core.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, jex_core.Jaxpr):
            yield value
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from subjaxprs(v)

    def walk(jaxpr, inside):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name in ("random_bits", "threefry2x32"):
                counts["inside" if inside else "outside"] += 1
            for v in eqn.params.values():
                for sub in subjaxprs(v):
                    walk(sub, inside or name == "shard_map")

    walk(closed_jaxpr.jaxpr, False)
    return counts["outside"], counts["inside"]


def check_equivalence(mesh4):
    """4-device step == plain single-device jit of the same step, for vmap and for
    fast clipping with microbatching; the batch is padded with masked rows."""
    model = tiny_model()
    data, _ = digits(64)
    loss = loss_of(model)
    params0 = model.init(jax.random.PRNGKey(0), data["x"][:1])
    real = jax.tree_util.tree_map(lambda x: x[:50], data)
    batch, mask = parallel.pad_batch(real, None, 4)  # 50 real rows -> 52 rows, 2 masked
    sb = parallel.shard_batch(dpjax.SampledBatch(data=batch, mask=mask), mesh4)
    bb, mm = sb.data, sb.mask
    out = {}
    for method, mb in (("vmap", None), ("fast", 4)):
        grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=1.0, method=method, microbatch_size=mb,
                                     return_per_example=True)
        tx = unverified(inner=optax.adam(1e-2), noise_multiplier=1.0, l2_clip_norm=1.0,
                        expected_batch_size=30, num_examples=640, seed=3)
        p = parallel.replicate(params0, mesh4)
        s = parallel.replicate(tx.init(params0), mesh4)
        step = parallel.make_step(grad_fn, tx, mesh4)
        for _ in range(3):
            p, s, metrics = step(p, s, sb)

        @jax.jit
        def plain(p, s, b):  # the ordinary single-device step on the 50 real rows
            g = grad_fn(p, b)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, g.per_example_norm

        rp, rs = params0, tx.init(params0)
        for _ in range(3):
            rp, rs, ref_norms = plain(rp, rs, real)
        result = dict(
            diff_vs_single_device=max_diff(p, rp),
            replicas_identical=replicas_identical(p) and replicas_identical(s),
            steps=int(s.ledger.steps),
            num_examples=int(metrics["num_examples"]),
        )
        if method == "vmap":  # per-example norms stay per example under shard_map
            g = jax.jit(parallel.sharded_clipped_grad(grad_fn, mesh4))(p, bb, mask=mm)
            _, _, norms_at_p = plain(p, s, real)
            result["per_example_norm_diff"] = float(np.max(np.abs(np.asarray(g.per_example_norm)[:50]
                                                                  - np.asarray(norms_at_p))))
        out[f"{method}/microbatch={mb}"] = result
    return out


def check_fast_conv_paths(mesh4):
    """A small CNN on 4 devices: every fast convolution strategy (scan over kernel
    offsets, second backward pass) inside shard_map gives the single-device sum,
    with padded and NaN rows."""
    model = dpjax.models.ConvNet(widths=(4, 8, 8, 16))
    data, _ = digits(16)
    batch = {"x": jnp.asarray(data["x"]).reshape(16, 8, 8, 1), "y": jnp.asarray(data["y"])}
    batch["x"] = batch["x"].at[5].set(jnp.nan)
    mask = jnp.arange(16) < 14
    loss = loss_of(model)
    params = model.init(jax.random.PRNGKey(0), batch["x"][:1])
    out = {}
    for keep_fraction in (0.0, float("inf")):
        grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=1.0, method="fast", keep_fraction=keep_fraction)
        one = jax.jit(grad_fn)(params, batch, mask=mask)
        four = jax.jit(parallel.sharded_clipped_grad(grad_fn, mesh4))(
            params, parallel.shard_batch(batch, mesh4), mask=parallel.shard_batch(mask, mesh4))
        out[str(keep_fraction)] = dict(diff=max_diff(one.sum, four.sum), nonfinite=int(four.num_nonfinite),
                                       num_examples=int(four.num_examples))
    return out


def check_noise_once(mesh4):
    """Zero clipped sums: the update is pure noise / E[B]; its variance tells how often it was added."""
    sigma, clip, ebs, steps = 2.0, 0.5, 8.0, 5
    params = {"w": jnp.zeros((100, 100)), "b": jnp.zeros((100,))}

    def loss(p, batch):
        return jnp.sum(batch["x"] @ p["w"]) + jnp.sum(p["b"])

    grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=clip, method="vmap")
    tx = unverified(inner=optax.sgd(1.0), noise_multiplier=sigma, l2_clip_norm=clip,
                    expected_batch_size=ebs, num_examples=64, seed=0)
    batch = {"x": np.ones((16, 100), np.float32)}
    mask = np.zeros(16, bool)  # every row masked: the clipped sum is exactly 0
    p = parallel.replicate(params, mesh4)
    s = parallel.replicate(tx.init(params), mesh4)
    step = parallel.make_step(grad_fn, tx, mesh4)
    sb = parallel.shard_batch(dpjax.SampledBatch(data=batch, mask=mask), mesh4)
    bb, mm = sb.data, sb.mask
    outside, inside = count_random_bits(jax.make_jaxpr(step.step_fn)(p, s, sb))
    deltas = []
    for _ in range(steps):
        new_p, s, _ = step(p, s, sb)
        deltas.append(np.concatenate([(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(leaves(new_p), leaves(p))]))
        p = new_p
    deltas = np.stack(deltas)
    expected = (sigma * clip / ebs) ** 2
    hlo = step.lower(p, s, sb).compile().as_text()

    # Negative control: noise inside the shard_map (per device), then psum -- wrong on purpose.
    from jax.sharding import PartitionSpec as P

    def wrong(p, s, b, m):
        def local(p, s, b, m):
            u, s = tx.update(grad_fn(p, b, mask=m), s, p)
            return jax.lax.psum(u, "data"), s

        u, s = jax.shard_map(local, mesh=mesh4, in_specs=(P(), P(), P("data"), P("data")),
                             out_specs=(P(), P()), check_vma=False)(p, s, b, m)
        return optax.apply_updates(p, u), s

    wp, ws = jax.jit(wrong)(p, s, bb, mm)
    wrong_delta = np.concatenate([(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(leaves(wp), leaves(p))])
    return dict(
        variance_ratio=float(np.var(deltas) / expected),
        num_samples=int(deltas.size),
        mean=float(np.mean(deltas)),
        per_step_variance_ratio=[float(np.var(d) / expected) for d in deltas],
        leaf_correlation=float(np.corrcoef(deltas[0][:100], deltas[0][10000:10100])[0, 1]),
        steps=int(s.ledger.steps),
        random_bits_outside_shard_map=outside,
        random_bits_inside_shard_map=inside,
        num_leaves=len(jax.tree_util.tree_leaves(params)),
        hlo_has_all_reduce="all-reduce" in hlo,
        replicas_identical=replicas_identical(p),
        wrong_variance_ratio=float(np.var(wrong_delta) / expected),
    )


def check_provenance(mesh4):
    """The stamp survives shard_batch and the shard_map; a replayed batch is refused in the parallel step."""
    model = tiny_model()
    data, _ = digits(64)
    sampler = parallel.ShardedPoissonSampler.for_mesh(64, mesh4, expected_batch_size=16, seed=0)
    tx = dpjax.privatize(optax.sgd(0.1), noise_multiplier=1.0, l2_clip_norm=1.0, sampler=sampler, seed=0)
    p = parallel.replicate(model.init(jax.random.PRNGKey(0), data["x"][:1]), mesh4)
    s = parallel.replicate(tx.init(p), mesh4)
    step = parallel.make_step(dpjax.clipped_grad(loss_of(model), l2_clip_norm=1.0), tx, mesh4)
    first = parallel.shard_batch(sampler.sample().take(sampler.local_slice(data)), mesh4)
    p1, s1, _ = step(p, s, first)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p2, s2, _ = step(p1, s1, first)  # the same draw again
        jax.block_until_ready(p2)
    refused = None
    try:
        dpjax.check_budget(s2)
    except dpjax.BatchProvenanceError as e:
        refused = str(e)
    return dict(steps=[int(s1.ledger.steps), int(s2.ledger.steps)], unchanged=max_diff(p1, p2),
                refused=refused, warned=any(issubclass(w.category, dpjax.BatchProvenanceWarning) for w in caught))


def check_fit(mesh4):
    """fit(mesh=4 devices) == fit(mesh=1 device) with the same seed."""
    _, d = digits(FIT["n"])
    data = {k: d[k][: FIT["n"]] for k in ("x_train", "y_train")}  # no test split: one compile less
    res = {}
    for nd in (1, 4):
        mesh = parallel.data_mesh(jax.devices()[:nd])
        res[nd] = dpjax.fit(tiny_model(), data, epochs=FIT["epochs"], batch_size=FIT["batch_size"],
                            noise_multiplier=FIT["noise_multiplier"], target_epsilon=None, seed=FIT["seed"],
                            progress=False, max_steps=3, mesh=mesh)
    return dict(diff=max_diff(res[1].params, res[4].params), eps=[res[1].epsilon, res[4].epsilon],
                steps=[res[1].steps, res[4].steps], replicas_identical=replicas_identical(res[4].params))


def check_multihost_reference(mesh4):
    """What the 2-process x 2-device manual run must produce, emulated in one process."""
    params, state, sizes = manual_run(mesh4, parts=[0, 1], process_count=2)
    return dict(params=[x.tolist() for x in leaves(params)], steps=int(state.ledger.steps), sizes=sizes)


def run_checks(out_path):
    _imports()
    mesh4 = parallel.data_mesh()
    results = {"device_count": jax.device_count()}
    for name, fn in (("equivalence", check_equivalence), ("fast_conv", check_fast_conv_paths),
                     ("noise_once", check_noise_once), ("provenance", check_provenance),
                     ("fit", check_fit),
                     ("multihost_reference", check_multihost_reference)):
        t = time.perf_counter()
        try:
            results[name] = fn(mesh4)
        except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - t, 2)
    with open(out_path, "w") as f:
        json.dump(results, f)


# ------------------------------------------------------------------ multi-host


def run_multihost(pid, nproc, port, out_dir):
    import jax as _jax

    _jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # fit() builds fresh jitted closures on every call; a persistent cache (per
    # process, as every process compiles its own executable) spares the three
    # fits below two identical compiles each.
    _jax.config.update("jax_compilation_cache_dir", os.path.join(out_dir, f"jax_cache_{pid}"))
    _jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    _jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                                initialization_timeout=60)
    t0 = time.perf_counter()
    _imports()
    mesh = parallel.data_mesh()
    out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "devices": jax.device_count(), "local_devices": jax.local_device_count()}

    # 1. The parallel API by hand; compared with the single-process emulation.
    params, state, sizes = manual_run(mesh, parts=[pid], process_count=nproc)
    out["manual"] = dict(params=[x.tolist() for x in leaves(params)], steps=int(state.ledger.steps), sizes=sizes,
                         replicas_identical=replicas_identical(params))

    # 2. fit(mesh=...): 3 steps with a checkpoint, then resume for 2 more; and 5 steps straight.
    _, d = digits(FIT["n"])
    data = {k: v[: FIT["n"]] if k.endswith("train") else v[:100] for k, v in d.items()}
    kw = dict(epochs=FIT["epochs"], batch_size=FIT["batch_size"], noise_multiplier=FIT["noise_multiplier"],
              target_epsilon=None, seed=FIT["seed"], progress=False, mesh=mesh)
    ckpt = os.path.join(out_dir, "ckpt")  # the same directory for every process (shared file system)
    times = {"manual": round(time.perf_counter() - t0, 2)}
    first = dpjax.fit(tiny_model(), data, checkpoint_dir=ckpt, checkpoint_every=2, max_steps=3, **kw)
    times["first"] = round(time.perf_counter() - t0, 2)
    resumed = dpjax.fit(tiny_model(), data, checkpoint_dir=ckpt, resume=True, max_steps=2, **kw)
    times["resumed"] = round(time.perf_counter() - t0, 2)
    straight = dpjax.fit(tiny_model(), data, max_steps=5, **kw)
    times["straight"] = round(time.perf_counter() - t0, 2)
    # seed=None: each process would draw its own seeds; fit must use process 0's everywhere.
    anonymous = dpjax.fit(tiny_model(), data, max_steps=1, **dict(kw, seed=None))
    times["seed_none"] = round(time.perf_counter() - t0, 2)
    out["fit"] = dict(
        params=[x.tolist() for x in leaves(resumed.params)],
        epsilon=resumed.epsilon,
        steps=[first.steps, resumed.steps, straight.steps],
        resume_vs_straight=max_diff(resumed.params, straight.params),
        epsilon_straight=straight.epsilon,
        replicas_identical=replicas_identical(resumed.params),
        checkpoints=sorted(n for n in os.listdir(ckpt) if n.isdigit()),  # the step folders
        privacy_log=[(r["event"], r.get("step", r.get("from_step"))) for r in
                     dpjax.checkpointing.CheckpointManager(ckpt).read_log()],
        checkpoint_files=sorted(os.path.relpath(os.path.join(r, f), ckpt) for r, _, fs in os.walk(ckpt) for f in fs),
        seed_none_params=[x.tolist() for x in leaves(anonymous.params)],
    )
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["times"] = times
    with open(os.path.join(out_dir, f"process_{pid}.json"), "w") as f:
        json.dump(out, f)
    t1 = time.perf_counter()
    jax.distributed.shutdown()
    print("shutdown", time.perf_counter() - t1, flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "checks":
        run_checks(sys.argv[2])
    elif mode == "multihost":
        run_multihost(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
