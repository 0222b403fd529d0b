"""Test accuracy against ε for dpjax's default configuration on scikit-learn's digits.

Trains the defaults of ``dpjax train`` (``dpjax.training.DEFAULTS``: the model,
epochs, batch size, clip norm and optimizer) with ``dpjax.fit`` at each ε
(δ = 1e-5), and once without privacy (ε = ∞): the same model, initialisation,
optimizer, epochs and batch size in a plain optax loop with no clipping and no
noise. Runs one after another in this process (no parallelism).

Writes, under ``--out`` (default ``benchmarks/results``):

* ``accuracy_vs_epsilon.json``: every run, plus the settings and the machine;
* ``accuracy_vs_epsilon.md``: a Markdown table (ε, σ, steps, test accuracy);
* ``accuracy_vs_epsilon.png``: test accuracy against ε (log axis), the
  non-private accuracy as a dashed line.

Examples::

    python benchmarks/accuracy_vs_epsilon.py                  # seeds 0-4, ε = 0.5, 1, 3, 8 and ∞
    python benchmarks/accuracy_vs_epsilon.py --seeds 0
    python benchmarks/accuracy_vs_epsilon.py --epsilons 3 --epochs 2 --out /tmp/x   # a quick smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dpjax
from dpjax import datasets, models, training

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "accuracy_vs_epsilon"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs visible)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs visible)"


NONPRIVATE = {"optimizer": "adam", "learning_rate": 3e-3, "batch_size": 64, "epochs": 30}


def train_nonprivate(model, data, *, seed: int):
    """The ε = ∞ reference: the same model and initialisation trained the ordinary
    way (Adam, minibatches of 64 from a fresh shuffle each epoch, no clipping, no
    noise; ``NONPRIVATE``), so the table shows what privacy costs against a
    well-trained non-private model rather than against DP-SGD's recipe."""
    x, y = np.asarray(data["x_train"]), np.asarray(data["y_train"])
    n = len(x)
    batch_size, epochs = NONPRIVATE["batch_size"], NONPRIVATE["epochs"]
    steps = math.ceil(epochs * n / batch_size)
    init_key = jax.random.PRNGKey(training._derive_seeds(seed)["init"])  # the init of dpjax.fit(seed=seed)
    params = model.init(init_key, jnp.asarray(x[:1]))
    tx = optax.adam(NONPRIVATE["learning_rate"])
    opt_state = tx.init(params)

    def loss_fn(p, xb, yb):
        return training.cross_entropy(model.apply(p, xb), yb)

    @jax.jit
    def step(p, s, xb, yb):
        g = jax.grad(loss_fn)(p, xb, yb)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch_size > n:  # next epoch
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        params, opt_state = step(params, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    logits = model.apply(params, jnp.asarray(data["x_test"]))
    acc = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(data["y_test"])))
    return acc, steps


def _fmt_eps(e: float) -> str:
    return "∞ (non-private)" if math.isinf(e) else f"{e:g}"


def write_markdown(path: str, report: dict) -> None:
    seeds = report["seeds"]
    lines = [
        f"# Test accuracy against ε on digits (`dpjax train` defaults, δ = {report['delta']:g})",
        "",
        f"Model `{report['config']['model']}`, {report['config']['epochs']:g} epochs, batch size "
        f"{report['config']['batch_size']}, clip norm {report['config']['l2_clip_norm']:g}, "
        f"{report['config']['optimizer']} (learning rate {report['config']['learning_rate']:g}); "
        f"{report['num_train']} training / {report['num_test']} test examples. "
        + ("Seed " + str(seeds[0]) if len(seeds) == 1 else "Seeds " + ", ".join(map(str, seeds))
           + ": the median test accuracy over seeds, the worst and best seed, then each seed") + ".",
        "",
        "| ε | σ | steps | test accuracy: median | worst – best | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["summary"]:
        sigma = "0" if math.isinf(s["epsilon"]) else f"{s['noise_multiplier']:.4g}"
        accs = s["test_accuracy"]
        lines.append(f"| {_fmt_eps(s['epsilon'])} | {sigma} | {s['steps']} | "
                     f"{100 * s['median_test_accuracy']:.2f}% | {100 * min(accs):.2f} – {100 * max(accs):.2f} | "
                     + ", ".join(f"{100 * a:.2f}" for a in accs) + " |")
    lines += [
        "",
        "The non-private row (ε = ∞) trains the same model the ordinary way: Adam (learning rate "
        f"{NONPRIVATE['learning_rate']:g}), minibatches of {NONPRIVATE['batch_size']}, "
        f"{NONPRIVATE['epochs']} epochs, no clipping and no noise.",
        "",
        f"Command: `{report['command']}`; run {report['date']} with jax {report['jax_version']} "
        f"(dpjax {report['dpjax_version']}, {report['backend']}) on {report['cpu']}; "
        f"{report['seconds']:.0f} s in all.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(path: str, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = [s for s in report["summary"] if not math.isinf(s["epsilon"])]
    nonprivate = [s for s in report["summary"] if math.isinf(s["epsilon"])]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    eps = [s["epsilon"] for s in private]
    if private:
        ax.plot(eps, [100 * s["median_test_accuracy"] for s in private], "o-", color="tab:blue",
                label="DP-SGD" + (" (median over seeds; dots: each seed)" if len(report["seeds"]) > 1 else ""))
        if len(report["seeds"]) > 1:
            for s in private:
                ax.plot([s["epsilon"]] * len(s["test_accuracy"]), [100 * a for a in s["test_accuracy"]],
                        ".", color="tab:blue", alpha=0.4)
    if nonprivate:
        ax.axhline(100 * nonprivate[0]["median_test_accuracy"], color="tab:gray", linestyle="--",
                   label="non-private (no clipping, no noise)")
    ax.set_xscale("log")
    if eps:
        ax.set_xticks(eps)
        ax.set_xticklabels([f"{e:g}" for e in eps])
        ax.minorticks_off()
    ax.set_xlabel(f"ε (δ = {report['delta']:g})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits, dpjax train defaults ({report['config']['model']})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    d = training.DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="seeds to run (default 0-4)")
    p.add_argument("--epsilons", nargs="+", type=float, default=[0.5, 1.0, 3.0, 8.0],
                   help="privacy budgets (default 0.5 1 3 8); a non-private run is always added")
    p.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
    p.add_argument("--epochs", type=float, default=d["epochs"],
                   help=f"override the default epochs ({d['epochs']}), e.g. for a quick run")
    p.add_argument("--model", choices=("mlp", "cnn"), default=d["model"],
                   help=f"model (default {d['model']}, the default of dpjax train)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory")
    args = p.parse_args(argv)

    command = "python benchmarks/accuracy_vs_epsilon.py" + (
        "" if not (sys.argv[1:] if argv is None else argv) else " " + shlex.join(sys.argv[1:] if argv is None else argv))
    data = datasets.load_digits()
    num_classes = datasets.num_classes(data)
    batch_size = len(data["x_train"]) if d["batch_size"] is None else min(d["batch_size"], len(data["x_train"]))
    config = {"model": args.model, "epochs": args.epochs, "batch_size": batch_size,
              "l2_clip_norm": d["l2_clip_norm"], "optimizer": d["optimizer"],
              "learning_rate": d["learning_rate"], "momentum": d.get("momentum")}

    rows = []
    t_all = time.perf_counter()
    warnings.simplefilter("ignore", dpjax.accounting.RdpConvergenceWarning)
    for seed in args.seeds:
        for eps in args.epsilons:
            t = time.perf_counter()
            r = dpjax.fit(models.build(args.model, num_classes), data, epochs=args.epochs, batch_size=batch_size,
                          l2_clip_norm=d["l2_clip_norm"], learning_rate=d["learning_rate"], target_epsilon=eps,
                          delta=args.delta, seed=seed, progress=False)
            row = {"epsilon": eps, "seed": seed, "noise_multiplier": r.noise_multiplier, "steps": r.steps,
                   "test_accuracy": r.history[-1]["test_accuracy"], "epsilon_spent": r.epsilon,
                   "seconds": time.perf_counter() - t}
            rows.append(row)
            print(f"eps={eps:<5g} seed={seed} sigma={r.noise_multiplier:.4g} steps={r.steps} "
                  f"test_accuracy={row['test_accuracy']:.4f} ({row['seconds']:.1f} s)", flush=True)
        t = time.perf_counter()
        acc, steps = train_nonprivate(models.build(args.model, num_classes), data, seed=seed)
        rows.append({"epsilon": math.inf, "seed": seed, "noise_multiplier": 0.0, "steps": steps,
                     "test_accuracy": acc, "epsilon_spent": math.inf, "seconds": time.perf_counter() - t})
        print(f"eps=inf   seed={seed} non-private steps={steps} test_accuracy={acc:.4f} "
              f"({rows[-1]['seconds']:.1f} s)", flush=True)

    summary = []
    for eps in [*args.epsilons, math.inf]:
        rs = [r for r in rows if r["epsilon"] == eps]
        summary.append({"epsilon": eps, "noise_multiplier": rs[0]["noise_multiplier"], "steps": rs[0]["steps"],
                        "test_accuracy": [r["test_accuracy"] for r in rs],
                        "mean_test_accuracy": float(np.mean([r["test_accuracy"] for r in rs])),
                        "median_test_accuracy": float(np.median([r["test_accuracy"] for r in rs]))})
    report = {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "dpjax_version": getattr(dpjax, "__version__", "unknown"),
        "backend": jax.default_backend(),
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "delta": args.delta,
        "seeds": args.seeds,
        "num_train": len(data["x_train"]),
        "num_test": len(data["x_test"]),
        "config": config,
        "seconds": time.perf_counter() - t_all,
        "rows": rows,
        "summary": summary,
    }
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, NAME)

    def finite(o):  # JSON has no infinity: write ε = ∞ as the string "inf"
        if isinstance(o, float) and math.isinf(o):
            return "inf"
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, list):
            return [finite(v) for v in o]
        return o

    with open(base + ".json", "w") as f:
        json.dump(finite(report), f, indent=1)
    write_markdown(base + ".md", report)
    write_plot(base + ".png", report)
    print(f"wrote {base}.json, {base}.md and {base}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
