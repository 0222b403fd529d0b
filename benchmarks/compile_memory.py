"""XLA scratch memory of each method's step at any model size, by compiling only.

No step runs, so the ANCHORS sizes (CNN at batch 1024, transformer at 128) can
be checked on a laptop CPU: ``memory_analysis()`` of the compiled step, the
same number the main suite reports as "scratch". The CPU and GPU compilers
fuse and schedule differently, so this is the CPU compiler's view; the GPU
numbers come from ``benchmarks/gpu.sh``.

    python -m benchmarks.compile_memory                       # ANCHORS sizes, default batches
    python -m benchmarks.compile_memory --cells cnn:1024,transformer:128 --out benchmarks/results/cpu-2core
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

from benchmarks import environment, jax_methods, workloads

DEFAULT_CELLS = "cnn:1024,transformer:128"
DEFAULT_METHODS = "jax-nonprivate,dpjax-fast,dpjax-vmap"


def measure(model: str, size: str, batch: int, method: str) -> dict:
    wl = workloads.make_workload(model, size)
    init, step = jax_methods.make_step(method, wl.loss_fn, batch)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        wl.params, jax.eval_shape(init, wl.params), wl.batch_shapes(batch)).compile()
    row = {"model": model, "size": size, "batch": batch, "method": method, "compile_s": time.perf_counter() - t0}
    row.update(jax_methods.memory_analysis(compiled))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compile_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=DEFAULT_CELLS, help="comma list of model:batch (default %(default)s)")
    ap.add_argument("--size", default="full", choices=("full", "small", "tiny"))
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma list; the first is the reference of ÷ NP")
    ap.add_argument("--out", default=None, help="folder for compile_memory.json (default: print only)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    for cell in args.cells.split(","):
        model, _, batch = cell.partition(":")
        if not batch.isdigit():
            ap.error(f"cells are model:batch, got {cell!r}")
        reference = None
        for method in methods:
            row = measure(model.strip(), args.size, int(batch), method)
            reference = reference or row["scratch_bytes"]
            row["scratch_vs_first"] = row["scratch_bytes"] / reference if reference else None
            rows.append(row)
            print(f"{model:12s} b={batch:>5s} {method:16s} scratch {row['scratch_bytes'] / 2**20:9.1f} MiB  "
                  f"÷ {methods[0]} {row['scratch_vs_first']:.2f}  (compile {row['compile_s']:.1f} s)", flush=True)
    if args.out:
        print(f"wrote {environment.write_rows(args.out, 'benchmarks.compile_memory', argv, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
