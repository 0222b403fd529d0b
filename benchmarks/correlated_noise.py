"""DP-SGD vs tree aggregation (DP-FTRL) vs BandMF at equal ε: utility and cost.

Utility: every mechanism trains the same model with ``dpjax.fit`` at the same ε
and δ for the same number of epochs and batch size, with SGD with momentum; the
learning rate of each mechanism is chosen on a validation split of the training
data (``dpjax.datasets.validation_split``; the test split is never read for it),
then the test accuracy of that rate is reported as the median over seeds.

* ``dp-sgd``: Poisson sampling at q = B / N, independent noise.
* ``tree``: tree aggregation restarted every pass over N / B parts (q = 1 in a part).
* ``bandmf-b``: BandMF with b bands over b parts (each Poisson-sampled at q = B·b / N,
  amplified), and ``bandmf-P``: as many bands as parts (q = 1, no amplification).

Tasks: ``digits`` (scikit-learn's, the default CNN) and ``synthetic`` (a
20,000-example, 10-class linear-teacher problem with a 2-layer MLP, made here).

Cost: the time of one jitted ``privatize`` update (noise only, a 1M-parameter
pytree) per mechanism and the bytes of noise state it keeps, on this machine; and
(``--step``) the time and optimizer-state bytes of a whole jitted training step
(clipped gradient, noise, SGD) per mechanism beside DP-SGD and non-private SGD.

Writes ``benchmarks/results/correlated_noise/{utility_TASK,cost,step_overhead}.{json,md}`` and
``utility_TASK.png``. Example (2-core CPU: digits about 10 minutes, synthetic 15)::

    python -m benchmarks.correlated_noise --task digits --epochs 20 --epsilon 3
    python -m benchmarks.correlated_noise --task synthetic --epochs 10 --epsilon 3
    python -m benchmarks.correlated_noise --cost
    python -m benchmarks.correlated_noise --step    # whole training steps at batch 144
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax

import dpjax
from dpjax import correlated_noise as cn, datasets, models

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "correlated_noise")


def synthetic(n: int = 20_000, d: int = 32, classes: int = 10, seed: int = 0) -> dict:
    """Labels from a random linear teacher with 10% label noise; 20% held out as test."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(d, classes)), axis=1)
    flip = rng.random(n) < 0.1
    y[flip] = rng.integers(0, classes, flip.sum())
    cut = int(0.8 * n)
    return {"x_train": x[:cut], "y_train": y[:cut].astype(np.int32), "x_test": x[cut:],
            "y_test": y[cut:].astype(np.int32)}


def mechanisms(n: int, batch: int, bands: int) -> dict:
    """name -> fit keyword arguments (noise, partitions) at expected batch ``batch``."""
    parts = n // batch
    return {
        "dp-sgd": {},
        "tree": dict(noise=cn.TreeAggregation(), partitions=parts),
        f"bandmf-{bands}": dict(noise=cn.BandMF(bands=bands), partitions=bands),
        f"bandmf-{parts}": dict(noise=cn.BandMF(bands=parts), partitions=parts),
    }


def _model(task: str):
    return models.CNN(num_classes=10) if task == "digits" else models.MLP(num_classes=10, hidden=64)


def _accuracy(task, data, *, lr, seed, args, **mechanism) -> float:
    result = dpjax.fit(_model(task), data, epochs=args.epochs, batch_size=args.batch_size, l2_clip_norm=1.0,
                       target_epsilon=args.epsilon, delta=1e-5, optimizer=optax.sgd(lr, momentum=0.9), seed=seed,
                       progress=False, **mechanism)
    return float(result.history[-1]["test_accuracy"])


def utility(args) -> list:
    data = datasets.load_digits() if args.task == "digits" else synthetic()
    val = datasets.validation_split(data)
    rows = []
    for name, mech in mechanisms(len(data["y_train"]), args.batch_size, args.bands).items():
        t = time.perf_counter()
        by_lr = {lr: statistics.median(_accuracy(args.task, val, lr=lr, seed=s, args=args, **mech)
                                       for s in args.seeds) for lr in args.lr}
        best = max(by_lr, key=by_lr.get)
        test = [_accuracy(args.task, data, lr=best, seed=s, args=args, **mech) for s in args.seeds]
        rows.append({"mechanism": name, "learning_rate": best, "validation_median_by_lr": by_lr,
                     "test_accuracy": test, "test_median": statistics.median(test),
                     "seconds": time.perf_counter() - t,
                     "noise": repr(mech.get("noise")), "partitions": mech.get("partitions", 1)})
        print(f"{name:12s} lr {best:g}: test median {rows[-1]['test_median']:.4f} "
              f"({min(test):.4f}-{max(test):.4f}), {rows[-1]['seconds']:.0f} s", flush=True)
    return rows


def _update_time(noise, partitions, params, repeats=20) -> tuple:
    sampler = dpjax.CyclicPoissonSampler(1000, partitions=partitions, sampling_rate=1.0, seed=0) \
        if partitions > 1 else dpjax.PoissonSampler(1000, expected_batch_size=100, seed=0)
    tx = dpjax.privatize(optax.sgd(0.1), noise_multiplier=1.0, l2_clip_norm=1.0, sampler=sampler, seed=0,
                         noise=noise, trust_unverified_batches=True)
    g = dpjax.ClippedGradient(sum=params, sensitivity=1.0, num_examples=jnp.int32(100), num_nonfinite=jnp.int32(0))
    state = tx.init(params)
    step = jax.jit(lambda st: tx.update(g, st, params))
    jax.block_until_ready(step(state))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        updates, state = step(state)
        jax.block_until_ready(updates)
        times.append(time.perf_counter() - t)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state.noise_state))
    return 1e3 * statistics.median(times), state_bytes


def cost() -> list:
    params = {"w": jnp.ones((1000, 1000), jnp.float32)}  # 1M parameters
    rows = []
    for name, noise, parts in [("dp-sgd", None, 1), ("tree", cn.TreeAggregation(), 16),
                               ("tree (one tree)", cn.TreeAggregation(restarts=False), 16),
                               ("bandmf-4", cn.BandMF(bands=4), 4), ("bandmf-16", cn.BandMF(bands=16), 16)]:
        ms, state = _update_time(noise, parts, params)
        rows.append({"mechanism": name, "update_ms": ms, "noise_state_bytes": state})
    base = rows[0]["update_ms"]
    for r in rows:
        r["vs_dp_sgd"] = r["update_ms"] / base
        print(f"{r['mechanism']:16s} {r['update_ms']:7.2f} ms ({r['vs_dp_sgd']:.2f}x), "
              f"state {r['noise_state_bytes'] / 2**20:.1f} MiB", flush=True)
    return rows


STEP_MECHANISMS = [("non-private", None, 0), ("dp-sgd", None, 1), ("tree", cn.TreeAggregation(), 9),
                   ("bandmf-4", cn.BandMF(bands=4), 4), ("bandmf-9", cn.BandMF(bands=9), 9)]


def _step_fn(model, noise, parts, params, batch_size):
    """A jitted training step (clipped gradient, noise, SGD; or plain SGD when ``parts`` is 0)
    and its initial optimizer state."""
    def loss(p, b):
        return dpjax.training.cross_entropy(model.apply(p, b["x"]), b["y"]).mean()

    if not parts:
        tx = optax.sgd(0.1, momentum=0.9)
        grad = jax.grad(loss)
        return jax.jit(lambda p, st, b: tx.update(grad(p, b), st, p)), tx.init(params)
    sampler = dpjax.CyclicPoissonSampler(parts * batch_size, partitions=parts, sampling_rate=1.0, seed=0) \
        if parts > 1 else dpjax.PoissonSampler(10 * batch_size, expected_batch_size=batch_size, seed=0)
    tx = dpjax.privatize(optax.sgd(0.1, momentum=0.9), noise_multiplier=1.0, l2_clip_norm=1.0, sampler=sampler,
                         seed=0, noise=noise, trust_unverified_batches=True)
    grad = dpjax.clipped_grad(loss, l2_clip_norm=1.0)
    return jax.jit(lambda p, st, b: tx.update(grad(p, b), st, p)), tx.init(params)


def step_overhead(batch_size: int = 144, rounds: int = 7, steps: int = 10) -> list:
    """Step time and optimizer-state bytes of each mechanism in a whole training step, for
    the digits CNN and a 1M-parameter MLP; mechanisms alternate within each round so a
    drifting machine load affects them alike."""
    rows = []
    for model_name, model in [("digits CNN", models.CNN(num_classes=10)),
                              ("MLP 64-1024-1024-10", _WideMLP())]:
        x = jnp.asarray(np.random.default_rng(0).random((batch_size, 8, 8, 1), np.float32))
        batch = {"x": x, "y": jnp.arange(batch_size, dtype=jnp.int32) % 10}
        params = model.init(jax.random.PRNGKey(0), x[:1])
        steps_by = {name: _step_fn(model, noise, parts, params, batch_size) for name, noise, parts in STEP_MECHANISMS}
        times = {name: [] for name in steps_by}
        for name, (fn, st) in steps_by.items():
            jax.block_until_ready(fn(params, st, batch))
        for _ in range(rounds):
            for name, (fn, st) in steps_by.items():
                t = time.perf_counter()
                for _ in range(steps):
                    out = fn(params, st, batch)
                jax.block_until_ready(out)
                times[name].append((time.perf_counter() - t) / steps)
        for name, (fn, st) in steps_by.items():
            rows.append({"model": model_name, "mechanism": name, "step_ms": 1e3 * statistics.median(times[name]),
                         "opt_state_bytes": sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(st)),
                         "params": sum(a.size for a in jax.tree_util.tree_leaves(params))})
        dp, np_ = (next(r["step_ms"] for r in rows if r["model"] == model_name and r["mechanism"] == m)
                   for m in ("dp-sgd", "non-private"))
        for r in rows:
            if r["model"] == model_name:
                r["vs_dp_sgd"], r["vs_non_private"] = r["step_ms"] / dp, r["step_ms"] / np_
                print(f"{model_name:20s} {r['mechanism']:12s} {r['step_ms']:7.2f} ms ({r['vs_dp_sgd']:.2f}x DP-SGD), "
                      f"state {r['opt_state_bytes'] / 2**20:.2f} MiB", flush=True)
    return rows


class _WideMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.tanh(nn.Dense(1024)(x))
        x = nn.tanh(nn.Dense(1024)(x))
        return nn.Dense(10)(x)


def _write(name: str, payload: dict, table: str) -> None:
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(OUT, name + ".md"), "w") as f:
        f.write(table)


def _utility_table(rows, args) -> str:
    lines = [f"{args.task}, epsilon = {args.epsilon:g}, delta = 1e-5, {args.epochs:g} epochs, expected batch "
             f"{args.batch_size}, SGD momentum 0.9, seeds {args.seeds}; learning rate chosen on a validation split",
             "", "| mechanism | lr | test accuracy, median | range |", "|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['mechanism']} | {r['learning_rate']:g} | {100 * r['test_median']:.2f}% | "
                     f"{100 * min(r['test_accuracy']):.2f}–{100 * max(r['test_accuracy']):.2f}% |")
    return "\n".join(lines) + "\n"


def _plot(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["test_accuracy"]), np.array(r["test_accuracy"]) * 100, color="C0", alpha=0.6)
        ax.hlines(100 * r["test_median"], i - 0.25, i + 0.25, color="C1")
    ax.set_xticks(range(len(rows)), [r["mechanism"] for r in rows])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("digits", "synthetic"), default="digits")
    p.add_argument("--epochs", type=float, default=20.0)
    p.add_argument("--batch-size", type=int, default=144)
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--bands", type=int, default=4)
    p.add_argument("--lr", nargs="+", type=float, default=[0.1, 0.3, 1.0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cost", action="store_true", help="measure the update time and noise state instead")
    p.add_argument("--step", action="store_true",
                   help="measure whole training steps (time, optimizer state) per mechanism instead")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore", dpjax.accounting.RdpConvergenceWarning)
    warnings.simplefilter("ignore", dpjax.UnverifiedBatchesWarning)
    if args.step:
        rows = step_overhead(args.batch_size)
        table = ("| model | mechanism | step ms | ÷ DP-SGD | ÷ non-private | optimizer state |\n"
                 "|---|---|---:|---:|---:|---:|\n" + "".join(
                     f"| {r['model']} | {r['mechanism']} | {r['step_ms']:.2f} | {r['vs_dp_sgd']:.2f} | "
                     f"{r['vs_non_private']:.2f} | {r['opt_state_bytes'] / 2**20:.2f} MiB |\n" for r in rows))
        _write("step_overhead", {"backend": jax.default_backend(), "batch_size": args.batch_size, "rows": rows},
               table)
        return 0
    if args.cost:
        rows = cost()
        table = ("| mechanism | update ms (1M params) | ÷ DP-SGD | noise state |\n|---|---:|---:|---:|\n" + "".join(
            f"| {r['mechanism']} | {r['update_ms']:.2f} | {r['vs_dp_sgd']:.2f} | "
            f"{r['noise_state_bytes'] / 2**20:.1f} MiB |\n" for r in rows))
        _write("cost", {"backend": jax.default_backend(), "rows": rows}, table)
        return 0
    rows = utility(args)
    name = f"utility_{args.task}"
    _write(name, {"args": vars(args), "backend": jax.default_backend(), "rows": rows}, _utility_table(rows, args))
    _plot(rows, os.path.join(OUT, name + ".png"), f"{args.task}: epsilon {args.epsilon:g}, {args.epochs:g} epochs")
    print(f"wrote {OUT}/{name}.*")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
