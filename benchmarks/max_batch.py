"""The largest batch whose training step fits in device memory (GPU only).

For one (model, method): double the batch from a start until a probe fails,
then bisect between the last success and the first failure until they are
within ``precision`` of each other (or the time budget is spent). A probe
compiles the step for that batch (from shapes alone) and reads XLA's static
memory analysis; if arguments + outputs + scratch − aliased bytes already
exceed the device's ``bytes_limit`` it fails without running. Otherwise one
step is run on a batch generated on the device; an out-of-memory error is a
failure. Run each (model, method) in a fresh process (``benchmarks.run`` does)
so that one search's allocations do not shrink the next one's room.
"""

from __future__ import annotations

import gc
import time
import traceback
import warnings

import jax
import jax.numpy as jnp

from benchmarks import environment, jax_methods
from benchmarks.workloads import Workload

_OOM_WORDS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM", "Failed to allocate")


def _probe(workload: Workload, method: str, batch: int, limit: int) -> dict:
    probe = {"batch": batch}
    init, step = jax_methods.make_step(method, workload.loss_fn, batch)
    params = jax.tree_util.tree_map(jnp.copy, workload.params)
    state = init(params)
    jitted = jax.jit(step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    try:
        compiled = jitted.lower(params, state, workload.batch_shapes(batch)).compile()
    except Exception as e:  # noqa: BLE001 - e.g. XLA refusing a buffer over its size limit
        probe.update(fits=False, reason=f"compile: {type(e).__name__}: {str(e)[:200]}")
        return probe
    probe["compile_s"] = time.perf_counter() - t0
    ma = jax_methods.memory_analysis(compiled)
    need = sum((ma.get(k) or 0) for k in ("argument_bytes", "output_bytes", "scratch_bytes")) - (
        ma.get("alias_bytes") or 0)
    probe["predicted_bytes"] = need
    if limit and need > limit:
        probe.update(fits=False, reason="predicted from memory_analysis")
        return probe
    try:
        data = workload.device_batch(batch)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
            out = compiled(params, state, data)
            jax.block_until_ready(out)
        probe.update(fits=True, reason="ran one step")
        del out, data
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        if not any(w in msg for w in _OOM_WORDS):
            raise
        probe.update(fits=False, reason="out of memory when run")
    finally:
        del params, state, compiled
        gc.collect()
    return probe


def search(workload: Workload, method: str, *, start: int, budget_s: float, precision: float = 0.05,
           cap: int = 1 << 21, multiple: int = 8) -> dict:
    """Result row: ``max_batch`` (largest success), ``first_failure``, ``complete``."""
    stats = environment.memory_stats() or {}
    limit = stats.get("bytes_limit")
    row = {"kind": "max_batch", "model": workload.name, "size": workload.size, "method": method,
           "label": jax_methods.LABELS.get(method, method), "bytes_limit": limit, "start": start,
           "precision": precision, "probes": []}
    deadline = time.perf_counter() + budget_s
    lo, hi = 0, None
    try:
        b = max(multiple, start)
        while b <= cap and time.perf_counter() < deadline:
            p = _probe(workload, method, b, limit)
            row["probes"].append(p)
            if not p["fits"]:
                hi = b
                break
            lo, b = b, b * 2
        while hi is not None and lo > 0 and hi - lo > max(multiple, precision * lo) \
                and time.perf_counter() < deadline:
            mid = (lo + hi) // 2 // multiple * multiple
            if mid <= lo:
                break
            p = _probe(workload, method, mid, limit)
            row["probes"].append(p)
            if p["fits"]:
                lo = mid
            else:
                hi = mid
        capped = hi is None and lo > 0 and lo * 2 > cap
        complete = capped or (hi is not None and lo > 0 and hi - lo <= max(multiple, precision * lo))
        row.update(status="ok", max_batch=lo or None, first_failure=hi, complete=complete, capped=capped)
    except Exception as e:  # noqa: BLE001
        row.update(status="error", max_batch=lo or None, first_failure=hi, complete=False,
                   error=f"{type(e).__name__}: {str(e)[:800]}", traceback=traceback.format_exc(limit=4)[-1500:])
    return row
