"""Data-parallel scaling of one DP step (dpjax.parallel.make_step) on 1, 2, 4 devices.

    python -m benchmarks.parallel_scaling [--devices 1 2 4] [--batch 1024] [--out benchmarks/results]

Each device count runs in its own process (``XLA_FLAGS=--xla_force_host_platform_device_count=D``
on CPU; on an accelerator host the first D real devices). The workload is a small
MLP (784 -> 256 -> 256 -> 10) on random data, a global batch of ``--batch``
real examples (all unmasked), clipping with ``method="fast"`` and ``"vmap"``, noise
and Adam: the full step. Compile and one warm-up call happen before the clock;
keys and batches are made before it too; the timed loop ends with
``jax.block_until_ready``. Reported: median examples/s over ``--repeats`` blocks
of ``--steps`` steps, and speed-up against the 1-device run. On CPU, virtual
devices share the machine's cores (and a single device already uses several
threads), so this measures the overhead of the sharded step more than a real
speed-up; on a multi-GPU host it measures the speed-up.

Writes ``parallel_scaling.json`` and ``parallel_scaling.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings


def _measure(devices: int, batch: int, steps: int, repeats: int) -> dict:
    import flax.linen as nn
    import jax
    import numpy as np
    import optax

    import dpjax
    from dpjax import parallel

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(256)(x))
            x = nn.relu(nn.Dense(256)(x))
            return nn.Dense(10)(x)

    model = MLP()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 784), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    params0 = model.init(jax.random.PRNGKey(0), x[:1])

    def loss(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b["x"]), b["y"]).mean()

    mesh = parallel.data_mesh(jax.devices()[:devices])
    out = {"devices": devices, "platform": jax.devices()[0].platform, "batch": batch, "methods": {}}
    for method in ("fast", "vmap"):
        grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=1.0, method=method)
        # One fixed batch, fed every step (speed only): hence the opt-out of provenance checks.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dpjax.UnverifiedBatchesWarning)
            tx = dpjax.privatize(optax.adam(1e-3), noise_multiplier=1.0, l2_clip_norm=1.0,
                                 expected_batch_size=batch, num_examples=60_000, seed=0,
                                 trust_unverified_batches=True)
        params = parallel.replicate(params0, mesh)
        state = parallel.replicate(tx.init(params0), mesh)
        rows, m = parallel.pad_batch({"x": x, "y": y}, None, devices)
        b = parallel.shard_batch(dpjax.SampledBatch(data=rows, mask=m), mesh)
        step = parallel.make_step(grad_fn, tx, mesh, donate=True)
        t = time.perf_counter()
        params, state, _ = step(params, state, b)  # compile + warm-up
        jax.block_until_ready(params)
        compile_s = time.perf_counter() - t
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(steps):
                params, state, _ = step(params, state, b)
            jax.block_until_ready((params, state))
            rates.append(steps * batch / (time.perf_counter() - t))
        out["methods"][method] = {"examples_per_s": statistics.median(rates), "all": rates,
                                  "first_call_s": compile_s}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child is not None:
        print(json.dumps(_measure(args._child, args.batch, args.steps, args.repeats)))
        return 0

    runs = []
    for d in args.devices:
        env = dict(os.environ)
        env.setdefault("JAX_PLATFORMS", "cpu")
        if env["JAX_PLATFORMS"] == "cpu":
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={d}").strip()
        cmd = [sys.executable, "-m", "benchmarks.parallel_scaling", "--_child", str(d), "--batch", str(args.batch),
               "--steps", str(args.steps), "--repeats", str(args.repeats)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if res.returncode != 0:
            raise SystemExit(f"{d} devices failed:\n{res.stderr[-3000:]}")
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{d} device(s): " + ", ".join(f"{k} {v['examples_per_s']:.0f} ex/s" for k, v in runs[-1]["methods"].items()),
              flush=True)

    base = {k: v["examples_per_s"] for k, v in runs[0]["methods"].items()}
    for r in runs:
        for k, v in r["methods"].items():
            v["speedup_vs_first"] = v["examples_per_s"] / base[k]
    import jax

    result = {
        "benchmark": "parallel_scaling",
        "workload": "MLP 784-256-256-10, DP step (clip + psum + noise + adam), global batch "
                    f"{args.batch}, all examples real",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "jax": jax.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": runs,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "parallel_scaling.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# Data-parallel DP step: scaling over devices",
        "",
        f"{result['workload']}. Platform: {runs[0]['platform']} ({os.cpu_count()} CPU cores visible), "
        f"jax {jax.__version__}, {result['date']}. Median of {args.repeats} blocks of {args.steps} steps; "
        "compile and warm-up excluded. Produced by `python -m benchmarks.parallel_scaling`.",
        "",
        "| devices | clipping | examples/s | vs 1 device |",
        "|---:|---|---:|---:|",
    ]
    for r in runs:
        for k, v in r["methods"].items():
            lines.append(f"| {r['devices']} | {k} | {v['examples_per_s']:,.0f} | {v['speedup_vs_first']:.2f}x |")
    if runs[0]["platform"] == "cpu":
        lines += ["", "On CPU the 'devices' are virtual (`--xla_force_host_platform_device_count`) and share "
                  f"the same {os.cpu_count()} cores, and one device already runs multi-threaded, so no speed-up is "
                  "expected here: the table shows what the sharded step costs (partitioning, the all-reduce of "
                  "the clipped sums). Run it on a multi-GPU host for real scaling."]
    with open(os.path.join(args.out, "parallel_scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
