"""Cost of Poisson sampling: padded, masked batches vs a fixed batch of E[B].

Both loops run the same jitted dpjax step (clipped gradient, noise, SGD) over a
dataset held on the device; the step gathers its examples by index inside
``jit``. Per step and inside the clock: draw the batch on the host
(``PoissonSampler.sample()`` or ``FixedSizeSampler.sample()``), run the step,
``jax.block_until_ready``. The Poisson step takes the padded indices and the
mask and provenance stamp (a ``dpjax.SampledBatch``, checked by ``privatize``);
the fixed step takes exactly E[B] indices, an all-true mask and its stamp.

Before the clock the step is compiled for the fixed size and for every bucket
of the Poisson ladder (one call each). Recompiles after that are counted with
``jax.monitoring`` (backend compile events) and the jit cache size. The two
loops alternate in short blocks so that a drifting machine load affects both.
The overhead is ``mean Poisson step time / mean fixed step time - 1``: a mean,
not a median, because the padded size varies from step to step.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dpjax
from benchmarks import jax_methods
from benchmarks.workloads import Workload

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]
_listening = [False]


def _listen_for_compiles() -> None:
    if _listening[0]:
        return

    def on_event(event, duration, **kwargs):
        if event == _COMPILE_EVENT:
            _compiles[0] += 1

    jax.monitoring.register_event_duration_secs_listener(on_event)
    _listening[0] = True


def _fresh(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def _cache_size(fn):
    try:
        return int(fn._cache_size())
    except Exception:  # noqa: BLE001 - private API; the monitoring count still works
        return None


def measure(workload: Workload, expected_batch: int, *, num_examples: int, method: str = "fast",
            blocks: int = 10, block_steps: int = 5, seed: int = 0) -> dict:
    """One result row comparing Poisson and fixed-size sampling."""
    _listen_for_compiles()
    row = {"kind": "poisson", "model": workload.name, "size": workload.size, "method": f"dpjax-{method}",
           "expected_batch": expected_batch, "num_examples": num_examples,
           "timed_steps_each": blocks * block_steps}
    try:
        data = workload.batch(num_examples, seed=1)
        grad_fn = dpjax.clipped_grad(workload.loss_fn, l2_clip_norm=jax_methods.CLIP, method=method)
        poisson = dpjax.PoissonSampler(num_examples, expected_batch_size=expected_batch, seed=seed)
        fixed = dpjax.FixedSizeSampler(num_examples, batch_size=expected_batch, seed=seed)
        sgd = optax.sgd(jax_methods.LEARNING_RATE)
        tx_p = dpjax.privatize(sgd, noise_multiplier=jax_methods.SIGMA, l2_clip_norm=jax_methods.CLIP,
                               sampler=poisson, seed=0)
        tx_f = dpjax.privatize(sgd, noise_multiplier=jax_methods.SIGMA, l2_clip_norm=jax_methods.CLIP,
                               sampler=fixed, seed=0)

        def gather(d, idx):
            return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), d)

        # The rows are gathered on the device inside the step; the batch's mask and
        # provenance stamp travel with them, as Batch.take would pack them.
        def step_poisson(p, s, d, idx, mask, stamp):
            batch = dpjax.SampledBatch(data=gather(d, idx), mask=mask, provenance=stamp)
            u, s = tx_p.update(grad_fn(p, batch), s, p)
            return optax.apply_updates(p, u), s

        def step_fixed(p, s, d, idx, mask, stamp):
            batch = dpjax.SampledBatch(data=gather(d, idx), mask=mask, provenance=stamp)
            u, s = tx_f.update(grad_fn(p, batch), s, p)
            return optax.apply_updates(p, u), s

        jp = jax.jit(step_poisson, donate_argnums=(0, 1))
        jf = jax.jit(step_fixed, donate_argnums=(0, 1))
        pp = jax.tree_util.tree_map(jnp.copy, workload.params)
        pf = jax.tree_util.tree_map(jnp.copy, workload.params)
        sp, sf = tx_p.init(pp), tx_f.init(pf)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
            # Warm-up (outside the clock): one call per shape the loops can meet.
            # Each warm-up call gets a throwaway state, so the ledgers of the timed
            # states stay in step with the samplers.
            t0 = time.perf_counter()
            first = fixed.batch_at(0)
            jax.block_until_ready(jf(_fresh(pf), tx_f.init(pf), data, first.indices,
                                     first.mask, first.provenance()))
            for b in poisson.bucket_sizes:
                stamp = poisson.batch_at(0).provenance()
                jax.block_until_ready(jp(_fresh(pp), tx_p.init(pp), data, np.zeros(b, np.int32),
                                         np.zeros(b, bool), stamp))
            row["warmup_compile_s"] = time.perf_counter() - t0
            row["bucket_sizes"] = list(poisson.bucket_sizes)
            compiles0, cache0 = _compiles[0], _cache_size(jp)

            tp, tf, sizes, buckets, sample_s = [], [], [], [], []
            for _ in range(blocks):
                for _ in range(block_steps):
                    t = time.perf_counter()
                    batch = fixed.sample()
                    pf, sf = jf(pf, sf, data, batch.indices, batch.mask, batch.provenance())
                    jax.block_until_ready((pf, sf))
                    tf.append(time.perf_counter() - t)
                for _ in range(block_steps):
                    t = time.perf_counter()
                    batch = poisson.sample()
                    t_s = time.perf_counter()
                    pp, sp = jp(pp, sp, data, batch.indices, batch.mask, batch.provenance())
                    jax.block_until_ready((pp, sp))
                    tp.append(time.perf_counter() - t)
                    sample_s.append(t_s - t)
                    sizes.append(batch.size)
                    buckets.append(batch.bucket_size)
        cache1 = _cache_size(jp)
        mean_p, mean_f = statistics.fmean(tp), statistics.fmean(tf)
        row.update(
            status="ok",
            fixed_mean_step_s=mean_f, poisson_mean_step_s=mean_p,
            fixed_median_step_s=statistics.median(tf), poisson_median_step_s=statistics.median(tp),
            fixed_examples_per_s=expected_batch / mean_f,
            poisson_examples_per_s=expected_batch / mean_p,  # expected (real) examples per second
            overhead=mean_p / mean_f - 1.0,
            overhead_median=statistics.median(tp) / statistics.median(tf) - 1.0,
            mean_batch_over_expected=statistics.fmean(sizes) / expected_batch,
            mean_padded_over_expected=statistics.fmean(buckets) / expected_batch,
            sampler_ms_per_step=1e3 * statistics.fmean(sample_s),
            recompiles_after_warmup=_compiles[0] - compiles0,
            jit_cache_growth_after_warmup=(cache1 - cache0) if cache0 is not None and cache1 is not None else None,
            final_bucket_sizes=list(poisson.bucket_sizes),
        )
        del pp, sp, pf, sf, data
    except Exception as e:  # noqa: BLE001
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:800]}",
                   traceback=traceback.format_exc(limit=4)[-1500:])
    gc.collect()
    return row
