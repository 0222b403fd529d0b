"""One JAX benchmark task, in-process or as ``python -m benchmarks.worker SPEC``.

On a GPU, :mod:`benchmarks.run` runs every task in a fresh process so that
``peak_bytes_in_use`` (which JAX cannot reset) and the allocator's cached
memory belong to that task alone, and an out-of-memory failure cannot spoil
the next task. On a CPU it calls :func:`run_task` directly, which is faster.

Tasks (``SPEC`` is a JSON object with ``"task"``):

* ``throughput``: ``model``, ``size``, ``method``, ``batches``, ``steps``,
  ``warmup``; batches run in increasing order, so a process's peak so far is
  the peak of the current (largest) batch.
* ``poisson``: ``model``, ``size``, ``expected_batch``, ``num_examples``,
  ``method``, ``blocks``, ``block_steps``.
* ``max_batch``: ``model``, ``size``, ``method``, ``start``, ``budget_s``,
  ``precision``.
"""

from __future__ import annotations

import json
import sys
from typing import Callable

from benchmarks import protocol


def run_task(spec: dict, emit: Callable[[dict], None]) -> None:
    """Run one task, handing each result row to ``emit`` as soon as it exists."""
    from benchmarks import workloads

    wl = workloads.make_workload(spec["model"], spec["size"])
    task = spec["task"]
    if task == "throughput":
        from benchmarks import jax_methods

        for b in sorted(spec["batches"]):
            emit(jax_methods.measure(wl, spec["method"], int(b), steps=int(spec["steps"]),
                                     warmup=int(spec["warmup"])))
    elif task == "poisson":
        from benchmarks import poisson_overhead

        emit(poisson_overhead.measure(wl, int(spec["expected_batch"]), num_examples=int(spec["num_examples"]),
                                      method=spec.get("method", "fast"), blocks=int(spec.get("blocks", 10)),
                                      block_steps=int(spec.get("block_steps", 5))))
    elif task == "max_batch":
        from benchmarks import max_batch

        emit(max_batch.search(wl, spec["method"], start=int(spec["start"]), budget_s=float(spec["budget_s"]),
                              precision=float(spec.get("precision", 0.1))))
    else:
        raise ValueError(f"unknown task {task!r}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    from benchmarks import environment

    protocol.emit({"kind": "meta", "framework": "jax", "device": environment.device_info()})
    run_task(spec, protocol.emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
