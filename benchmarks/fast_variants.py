"""The fast path's memory/speed trade-off: ``keep_fraction`` swept.

With ``dpjax.clipped_grad(keep_fraction=f)``, instantiated layers whose
per-example gradients are at most f times their activations keep them (no
second backward pass); the others recompute their clipped sum with a second
backward pass. ``0`` recomputes every such
layer, ``inf`` keeps them all, the default (0.25) sits between. One row per
(batch, setting): examples/s and scratch, each ÷ non-private JAX in the same
run, timed like the main suite (:func:`benchmarks.jax_methods.measure`).

    python -m benchmarks.fast_variants --size small --batches 256 --out benchmarks/results/cpu-2core
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import environment, jax_methods, workloads
from dpjax import fast_clipping

SETTINGS = (0.0, fast_clipping.KEEP_FRACTION, float("inf"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fast_variants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--size", default="full", choices=("full", "small", "tiny"))
    ap.add_argument("--batches", default="1024", help="comma list")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="folder for fast_variants.json (default: print only)")
    args = ap.parse_args(argv)
    wl = workloads.make_workload(args.model, args.size)
    rows = []
    for b in [int(x) for x in args.batches.split(",") if x.strip()]:
        ref = jax_methods.measure(wl, jax_methods.NON_PRIVATE, b, steps=args.steps)
        rows.append(dict(ref, keep_fraction=None))
        for frac in SETTINGS:
            row = jax_methods.measure(wl, "dpjax-fast", b, steps=args.steps, keep_fraction=frac)
            row["keep_fraction"] = frac if frac != float("inf") else "inf"
            if row["status"] == "ok" and ref["status"] == "ok":
                row["vs_nonprivate"] = row["examples_per_s"] / ref["examples_per_s"]
                if ref.get("scratch_bytes"):
                    row["scratch_vs_nonprivate"] = row["scratch_bytes"] / ref["scratch_bytes"]
            rows.append(row)
            print(f"{args.model} b={b} keep_fraction={row['keep_fraction']}: "
                  + (f"{row.get('vs_nonprivate', float('nan')):.3f} of non-private examples/s, "
                     f"scratch {row.get('scratch_vs_nonprivate', float('nan')):.2f}x"
                     if row["status"] == "ok" else row.get("error", "error")), flush=True)
    if args.out:
        print(f"wrote {environment.write_rows(args.out, 'benchmarks.fast_variants', argv, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
