"""The real-model zoo benchmark: dpjax's fast path, vmap and ``auto`` on the models people train.

For every model of :mod:`benchmarks.zoo_models` (GPT-2-style decoder with a
tied embedding, BERT-style encoder, ViT, ResNet-18 with GroupNorm, ``nn.scan``
and ``nn.remat`` stacks, LoRA with only the adapters training), in one run and
on the same batch: a full SGD step of non-private JAX and of dpjax with
``method="vmap"``, ``"fast"`` and ``"auto"`` (C = 1, σ = 1), timed like the main
suite (:func:`benchmarks.jax_methods.measure`: compiled ahead of time, compile
time reported, median of the timed steps). Per model: examples/s ÷
non-private and ÷ the faster of fast and vmap, the share of parameter scalars
on the fast path, compile times and XLA scratch.

    python -m benchmarks.zoo --out benchmarks/results/cpu-2core
    python -m benchmarks.zoo --models gpt2,vit --steps 5      # a subset

Writes ``zoo.json``, ``zoo.md`` and ``zoo.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks import environment, jax_methods, zoo_models

METHODS = ("jax-nonprivate", "dpjax-vmap", "dpjax-fast", "dpjax-auto")


def measure_model(name: str, size: str, batch: int, steps: int) -> list:
    """One row per method for ``name``, with the ratios of the same run."""
    zm = zoo_models.build(name, size)
    rows = [jax_methods.measure(zm, m, batch, steps=steps) for m in METHODS]
    by = {r["method"]: r for r in rows}
    ok = {m: r["examples_per_s"] for m, r in by.items() if r.get("status") == "ok"}
    frac = zoo_models.fast_fraction(zm)
    for r in rows:
        r.update(zoo_model=name, fast_fraction=frac)
        if r["method"] in ok and "jax-nonprivate" in ok:
            r["vs_nonprivate"] = ok[r["method"]] / ok["jax-nonprivate"]
        if r["method"] in ok and {"dpjax-vmap", "dpjax-fast"} <= set(ok):
            r["vs_best_of_fast_and_vmap"] = ok[r["method"]] / max(ok["dpjax-vmap"], ok["dpjax-fast"])
        if r.get("scratch_bytes") and by["jax-nonprivate"].get("scratch_bytes"):
            r["scratch_vs_nonprivate"] = r["scratch_bytes"] / by["jax-nonprivate"]["scratch_bytes"]
    return rows


def markdown(rows: list) -> str:
    head = ("| model | batch | params | fast-path share | non-private ex/s | vmap ÷ NP | fast ÷ NP | auto ÷ NP "
            "| auto ÷ best(fast, vmap) | compile s (vmap / fast / auto) | scratch ÷ NP (fast) |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n")
    lines = []
    for name in dict.fromkeys(r["zoo_model"] for r in rows):
        by = {r["method"]: r for r in rows if r["zoo_model"] == name}

        def f(method, key, fmt="{:.3f}"):
            v = by.get(method, {}).get(key)
            return fmt.format(v) if isinstance(v, (int, float)) else "error"

        np_row = by["jax-nonprivate"]
        lines.append(
            f"| {name} | {np_row['batch']} | {np_row['num_params']:,} | {np_row['fast_fraction']:.1%} "
            f"| {f('jax-nonprivate', 'examples_per_s', '{:,.0f}')} | {f('dpjax-vmap', 'vs_nonprivate')} "
            f"| {f('dpjax-fast', 'vs_nonprivate')} | {f('dpjax-auto', 'vs_nonprivate')} "
            f"| {f('dpjax-auto', 'vs_best_of_fast_and_vmap')} "
            f"| {f('dpjax-vmap', 'compile_s', '{:.1f}')} / {f('dpjax-fast', 'compile_s', '{:.1f}')} / "
            f"{f('dpjax-auto', 'compile_s', '{:.1f}')} | {f('dpjax-fast', 'scratch_vs_nonprivate', '{:.2f}')} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dict.fromkeys(r["zoo_model"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.27
    for j, method in enumerate(("dpjax-vmap", "dpjax-fast", "dpjax-auto")):
        vals = [next((r.get("vs_nonprivate", 0.0) for r in rows if r["zoo_model"] == n and r["method"] == method), 0.0)
                for n in names]
        ax.bar(np.arange(len(names)) + (j - 1) * width, vals, width, label=method.split("-")[1])
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("examples/s ÷ non-private")
    ax.set_title("dpjax on the model zoo (same run, same batch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(zoo_models.MODELS), help="comma list (default: all)")
    ap.add_argument("--size", default="bench", choices=("bench", "small"))
    ap.add_argument("--batch", type=int, default=None, help="batch for every model (default: per model)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="folder for zoo.json, zoo.md and zoo.png (default: print only)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(zoo_models.MODELS))
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {', '.join(zoo_models.MODELS)}")
    rows = []
    for name in names:
        batch = args.batch or zoo_models.BENCH_BATCH[name]
        rows.extend(measure_model(name, args.size, batch, args.steps))
        print(markdown([r for r in rows if r["zoo_model"] == name]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        path = environment.write_rows(args.out, "benchmarks.zoo", argv, rows)
        with open(os.path.join(args.out, "zoo.md"), "w") as f:
            f.write(table)
        plot(rows, os.path.join(args.out, "zoo.png"))
        print(f"wrote {path}, zoo.md and zoo.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
