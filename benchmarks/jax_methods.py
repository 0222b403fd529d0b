"""The JAX training steps compared, and how one is timed.

Every method is a full SGD step on the same model, batch and initial
parameters: gradient (per-example clipped and noised for the DP methods, C=1,
σ=1) and the parameter update.

=================  ==========================================================
``jax-nonprivate``  ``jax.grad`` + ``optax.sgd``: the reference of every ratio
``dpjax-vmap``      ``dpjax.clipped_grad(method="vmap")`` + ``dpjax.privatize``
``dpjax-fast``      ``dpjax.clipped_grad(method="fast")`` + ``dpjax.privatize``
``optax-dpsgd``     ``jax.vmap(jax.grad)`` per-example grads + ``optax.contrib.dpsgd``
``jax_privacy``     ``jax_privacy.clipped_grad`` + Gaussian noise + SGD (when installed)
=================  ==========================================================

Timing rules (``shared/DESIGN.md``, "Measuring speed"): the step is compiled
ahead of time (``jax.jit(...).lower(...).compile()``, timed separately); every
PRNG key lives in the optimizer state or is made before the clock; each timed
step ends with ``jax.block_until_ready``; parameters and optimizer state are
donated. Scratch memory is ``compiled.memory_analysis().temp_size_in_bytes``.
"""

from __future__ import annotations

import gc
import importlib
import statistics
import time
import traceback
import warnings
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

import dpjax
from benchmarks import environment
from benchmarks.workloads import Workload

LEARNING_RATE = 0.01
CLIP = 1.0
SIGMA = 1.0

LABELS = {
    "jax-nonprivate": "JAX non-private",
    "dpjax-vmap": "dpjax vmap",
    "dpjax-fast": "dpjax fast",
    "optax-dpsgd": "optax.contrib.dpsgd (+ vmap grads)",
    "jax_privacy": "jax_privacy.clipped_grad",
}
METHODS = tuple(LABELS)
NON_PRIVATE = "jax-nonprivate"


def availability(method: str) -> Tuple[bool, str]:
    """(available, reason or version)."""
    if method not in LABELS:
        return False, f"unknown method {method!r}"
    if method == "jax_privacy":
        ok, why = environment.importable("jax_privacy")
        if not ok:
            return False, why
        if _jax_privacy_clipped_grad() is None:
            return False, "jax_privacy has no clipped_grad (needs jax_privacy >= 1.0)"
        return True, why
    if method == "optax-dpsgd":
        try:
            importlib.import_module("optax.contrib").dpsgd  # noqa: B018
        except Exception as e:  # noqa: BLE001
            return False, f"optax.contrib.dpsgd missing ({e})"
    return True, ""


def _jax_privacy_clipped_grad() -> Optional[Callable]:
    jp = importlib.import_module("jax_privacy")
    fn = getattr(jp, "clipped_grad", None)
    if fn is None:
        try:
            fn = importlib.import_module("jax_privacy.clipping").clipped_grad
        except Exception:  # noqa: BLE001
            fn = None
    return fn


def _single_example(loss_fn):
    def single(params, example):
        return loss_fn(params, jax.tree_util.tree_map(lambda x: x[None], example))

    return single


def make_step(method: str, loss_fn: Callable, batch_size: int,
              keep_fraction: Optional[float] = None) -> Tuple[Callable, Callable]:
    """(init(params) -> state, step(params, state, batch) -> (params, state)).

    ``keep_fraction``: passed to ``dpjax.clipped_grad`` by the dpjax methods."""
    sgd = optax.sgd(LEARNING_RATE)

    if method == "jax-nonprivate":
        def step(p, s, b):
            u, s = sgd.update(jax.grad(loss_fn)(p, b), s, p)
            return optax.apply_updates(p, u), s

        return sgd.init, step

    if method in ("dpjax-vmap", "dpjax-fast", "dpjax-auto"):
        grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=CLIP, method=method.split("-")[1],
                                     keep_fraction=keep_fraction)
        # The timed loop feeds one fixed random batch every step (the same batch as the
        # other methods), not sampler draws, hence the opt-out of provenance checks; the
        # checks themselves are a few scalar compares (poisson_overhead times the real path).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dpjax.UnverifiedBatchesWarning)
            tx = dpjax.privatize(sgd, noise_multiplier=SIGMA, l2_clip_norm=CLIP, expected_batch_size=batch_size,
                                 sampling_rate=0.01, seed=0, trust_unverified_batches=True)

        def step(p, s, b):
            u, s = tx.update(grad_fn(p, b), s, p)
            return optax.apply_updates(p, u), s

        return tx.init, step

    if method == "optax-dpsgd":
        from optax import contrib

        tx = contrib.dpsgd(LEARNING_RATE, l2_norm_clip=CLIP, noise_multiplier=SIGMA, seed=0)
        per_example = jax.vmap(jax.grad(_single_example(loss_fn)), in_axes=(None, 0))

        def step(p, s, b):
            u, s = tx.update(per_example(p, b), s, p)
            return optax.apply_updates(p, u), s

        return tx.init, step

    if method == "jax_privacy":
        clipped = _jax_privacy_clipped_grad()(loss_fn, l2_clip_norm=CLIP, batch_argnums=1, keep_batch_dim=True)

        def init(p):
            return sgd.init(p), jax.random.PRNGKey(0)  # made before any clock

        def step(p, s, b):
            inner, key = s
            total = clipped(p, b)
            key, sub = jax.random.split(key)
            leaves, treedef = jax.tree_util.tree_flatten(total)
            keys = jax.random.split(sub, len(leaves))
            noisy = [(x + SIGMA * CLIP * jax.random.normal(k, x.shape, x.dtype)) / batch_size
                     for k, x in zip(keys, leaves)]
            u, inner = sgd.update(jax.tree_util.tree_unflatten(treedef, noisy), inner, p)
            return optax.apply_updates(p, u), (inner, key)

        return init, step

    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def memory_analysis(compiled) -> dict:
    """XLA's static buffer sizes of a compiled step (``None`` where unreported)."""
    out = {"scratch_bytes": None, "argument_bytes": None, "output_bytes": None, "alias_bytes": None,
           "code_bytes": None}
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not report it
        return out
    if ma is None:
        return out
    for key, attr in (("scratch_bytes", "temp_size_in_bytes"), ("argument_bytes", "argument_size_in_bytes"),
                      ("output_bytes", "output_size_in_bytes"), ("alias_bytes", "alias_size_in_bytes"),
                      ("code_bytes", "generated_code_size_in_bytes")):
        v = getattr(ma, attr, None)
        out[key] = int(v) if v is not None else None
    return out


def _fresh(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def measure(workload: Workload, method: str, batch_size: int, *, steps: int = 20, warmup: int = 2,
            keep_fraction: Optional[float] = None) -> dict:
    """Compile, warm up and time ``steps`` steps of ``method``; one result row.

    ``examples_per_s`` is ``batch_size / median step time``. On an error (out
    of memory, a method that cannot trace the model) the row has
    ``status="error"`` and the message instead of numbers.
    """
    row = {"kind": "throughput", "framework": "jax", "model": workload.name, "size": workload.size,
           "batch": batch_size, "method": method, "label": LABELS.get(method, method),
           "num_params": workload.num_params, "steps": steps, "warmup": warmup}
    try:
        init, step = make_step(method, workload.loss_fn, batch_size, keep_fraction)
        params = _fresh(workload.params)
        state = init(params)
        batch = workload.batch(batch_size)
        jitted = jax.jit(step, donate_argnums=(0, 1))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
            t0 = time.perf_counter()
            compiled = jitted.lower(params, state, batch).compile()
            row["compile_s"] = time.perf_counter() - t0
            row.update(memory_analysis(compiled))
            for _ in range(warmup):
                params, state = compiled(params, state, batch)
            jax.block_until_ready((params, state))
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                params, state = compiled(params, state, batch)
                jax.block_until_ready((params, state))
                times.append(time.perf_counter() - t)
        med = statistics.median(times)
        row.update(status="ok", examples_per_s=batch_size / med, median_step_s=med, min_step_s=min(times),
                   max_step_s=max(times), mean_step_s=statistics.fmean(times),
                   peak_bytes=environment.peak_bytes())
        del params, state, batch, compiled
    except Exception as e:  # noqa: BLE001 - recorded, the suite goes on
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:800]}",
                   traceback=traceback.format_exc(limit=4)[-1500:])
    gc.collect()
    return row
