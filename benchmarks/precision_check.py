"""How closely the fast path matches per-example gradients at the device's matmul precision.

The fast path computes a per-example norm by one computation (ghost norm or
instantiated gradient) and that example's share of the clipped sum by another
(book-keeping contraction). In exact arithmetic both agree; with reduced
precision matmuls (TF32, the default for float32 on recent NVIDIA GPUs) they
agree only to that precision, so a clipped contribution can exceed C by about
the relative error printed here. The vmap path clips the very vector it sums.
This script measures, on the current device, the largest relative difference
between fast and vmap per-example norms and clipped sums, at JAX's default
matmul precision and at ``"highest"``.

    python -m benchmarks.precision_check --out benchmarks/results/<device>
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import dpjax
from benchmarks import environment, workloads

CELLS = (("cnn", "small", 64), ("transformer", "small", 16))


def _rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def compare(model: str, size: str, batch: int, precision: str) -> dict:
    wl = workloads.make_workload(model, size)
    data = wl.batch(batch)
    with jax.default_matmul_precision(precision):
        out = {}
        for method in ("fast", "vmap"):
            fn = dpjax.clipped_grad(wl.loss_fn, l2_clip_norm=1.0, method=method, return_per_example=True)
            out[method] = jax.jit(fn)(wl.params, data)
    fast, vmap = out["fast"], out["vmap"]
    sums = max(_rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(fast.sum), jax.tree_util.tree_leaves(vmap.sum)))
    return {"model": model, "size": size, "batch": batch, "precision": precision,
            "max_rel_norm_diff": _rel(fast.per_example_norm, vmap.per_example_norm), "max_rel_sum_diff": sums}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.precision_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=("full", "small", "tiny"))
    ap.add_argument("--out", default=None, help="folder for precision_check.json (default: print only)")
    args = ap.parse_args(argv)
    rows = []
    for model, _, batch in CELLS:
        for precision in ("default", "highest"):
            row = compare(model, args.size, batch if args.size != "tiny" else 4, precision)
            rows.append(row)
            print(f"{model:12s} precision={precision:8s} max relative difference fast vs vmap: "
                  f"norms {row['max_rel_norm_diff']:.2e}, clipped sums {row['max_rel_sum_diff']:.2e}", flush=True)
    if args.out:
        print(f"wrote {environment.write_rows(args.out, 'benchmarks.precision_check', argv, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
