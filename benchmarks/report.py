"""Ratios, and the three outputs: raw JSON, a Markdown table, PNG plots.

``python -m benchmarks.report benchmarks/results/<device>`` re-renders the
Markdown and the plots from that folder's ``results.json`` (e.g. after a run
was stopped part-way).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

from benchmarks import model_specs, protocol

NON_PRIVATE = "jax-nonprivate"
METHOD_ORDER = ("jax-nonprivate", "dpjax-vmap", "dpjax-fast", "optax-dpsgd", "jax_privacy",
                "torch-nonprivate", "opacus-hooks", "opacus-ghost")
JSON_NAME, MD_NAME = "results.json", "results.md"
THROUGHPUT_PNG, MEMORY_PNG = "throughput.png", "memory.png"
MiB = 2.0 ** 20


def _order(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def _ok(row) -> bool:
    return row.get("status") == "ok"


def _div(a, b) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def add_ratios(results: dict) -> None:
    """Add ``ratio_*`` fields: each row ÷ JAX non-private on the same model and batch."""
    rows = results.get("throughput", [])
    base = {(r["model"], r["batch"]): r for r in rows if r["method"] == NON_PRIVATE and _ok(r)}
    torch_base = {(r["model"], r["batch"]): r for r in rows if r["method"] == "torch-nonprivate" and _ok(r)}
    for r in rows:
        b = base.get((r["model"], r["batch"]))
        ok = _ok(r) and b is not None
        r["ratio_examples_per_s"] = _div(r.get("examples_per_s"), b["examples_per_s"]) if ok else None
        r["ratio_scratch"] = _div(r.get("scratch_bytes"), b.get("scratch_bytes")) if ok else None
        r["ratio_peak"] = _div(r.get("peak_bytes"), b.get("peak_bytes")) if ok else None
        t = torch_base.get((r["model"], r["batch"]))
        if r.get("framework") == "torch" and _ok(r) and t is not None:
            r["ratio_vs_torch_nonprivate"] = _div(r.get("examples_per_s"), t["examples_per_s"])
    mb = results.get("max_batch", [])
    mb_base = {r["model"]: r for r in mb if r["method"] == NON_PRIVATE and r.get("max_batch")}
    for r in mb:
        b = mb_base.get(r["model"])
        r["ratio_max_batch"] = _div(r.get("max_batch"), b["max_batch"]) if b else None


# ---------------------------------------------------------------- Markdown

def _f(x, fmt="{:,.0f}", none=""):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return fmt.format(x)


def markdown(results: dict) -> str:
    meta = results.get("meta", {})
    v = meta.get("versions", {})
    dev = meta.get("device", {})
    size = meta.get("size", "?")
    lines = [
        f"# dpjax benchmarks on `{meta.get('device_label', '?')}`",
        "",
        f"{meta.get('date', '')}; device {dev.get('platform', '?')} / {dev.get('device_kind', '?')}"
        + (f" ({_f((dev.get('bytes_limit') or 0) / 2**30, '{:.1f}')} GiB usable)" if dev.get("bytes_limit") else "")
        + f"; {meta.get('cpus', '?')} CPUs.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
        f"Command: `{meta.get('command', '')}`"
        + (" with " + ", ".join(f"`{k}={val}`" for k, val in meta["env"].items()) if meta.get("env") else "")
        + ".",
    ]
    if meta.get("note"):
        lines.append(f"Note: {meta['note']}")
    lines += [
        "",
        f"Model sizes: `{size}`. Each step: gradient (clipped per example, C=1, plus Gaussian noise σ=1 for "
        f"DP) and an SGD update, fp32, random data. examples/s = batch ÷ median of "
        f"{meta.get('steps', '?')} timed steps after {meta.get('warmup', '?')} warm-up steps; compile "
        "(`jax.jit(...).lower(...).compile()`) is timed separately; keys are made before the clock; every "
        "step ends with `jax.block_until_ready`; params and optimizer state are donated. "
        "÷ JAX NP: the same model and batch, non-private JAX, same run. Scratch: XLA "
        "`memory_analysis().temp_size_in_bytes`; peak: `device.memory_stats()['peak_bytes_in_use']` "
        "(GPU only; PyTorch: `torch.cuda.max_memory_allocated()`).",
        "",
        "## Throughput and memory",
    ]
    rows = results.get("throughput", [])
    for model in model_specs.MODELS:
        mrows = [r for r in rows if r["model"] == model]
        if not mrows:
            continue
        lines += ["", f"### {model}: {model_specs.describe(model, mrows[0].get('size', size))}"
                  + (f", {mrows[0]['num_params']:,} parameters" if mrows[0].get("num_params") else ""), "",
                  "| batch | method | examples/s | ÷ JAX NP | scratch MiB | ÷ NP | peak MiB | ÷ NP | compile s |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(mrows, key=lambda r: (r["batch"], _order(r["method"]))):
            if not _ok(r):
                lines.append(f"| {r['batch']} | {r.get('label', r['method'])} | error: "
                             f"{r.get('error', '')[:120].replace('|', '/')} | | | | | | |")
                continue
            lines.append(
                f"| {r['batch']} | {r.get('label', r['method'])} | {_f(r.get('examples_per_s'))} | "
                f"{_f(r.get('ratio_examples_per_s'), '{:.3f}')} | "
                f"{_f(_div(r.get('scratch_bytes'), MiB), '{:,.1f}')} | {_f(r.get('ratio_scratch'), '{:.2f}')} | "
                f"{_f(_div(r.get('peak_bytes'), MiB), '{:,.0f}')} | {_f(r.get('ratio_peak'), '{:.2f}')} | "
                f"{_f(r.get('compile_s'), '{:.1f}')} |")
    skipped = results.get("skipped", [])
    if skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- {s['what']}: {s['reason']}" for s in skipped]

    prow = results.get("poisson", [])
    if prow:
        lines += ["", "## Poisson sampling overhead", "",
                  "Padded, masked steps from `dpjax.PoissonSampler` vs `dpjax.FixedSizeSampler` batches of "
                  "E[B]; host sampling included; mean step time (the padded size varies).", "",
                  "| model | method | E[B] | N | fixed ex/s | Poisson ex/s | overhead | mean padded ÷ E[B] | "
                  "sampler ms/step | recompiles after warm-up |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in prow:
            if not _ok(r):
                lines.append(f"| {r['model']} | {r['method']} | {r['expected_batch']} | {r['num_examples']} | "
                             f"error: {r.get('error', '')[:120]} | | | | | |")
                continue
            lines.append(
                f"| {r['model']} | {r['method']} | {r['expected_batch']} | {r['num_examples']:,} | "
                f"{_f(r['fixed_examples_per_s'])} | {_f(r['poisson_examples_per_s'])} | "
                f"{_f(100 * r['overhead'], '{:+.1f}')}% | {_f(r['mean_padded_over_expected'], '{:.3f}')} | "
                f"{_f(r['sampler_ms_per_step'], '{:.2f}')} | {r['recompiles_after_warmup']} |")

    arow = results.get("accountant", [])
    if arow:
        lines += ["", "## Accountant speed", "",
                  "`dpjax.accounting.epsilon` after the given number of Poisson-sampled steps, δ = 1e-5.", "",
                  "| σ | q | steps | accountant | ε | first call s | repeat s |",
                  "|---:|---:|---:|---|---:|---:|---:|"]
        for r in arow:
            lines.append(
                f"| {r['noise_multiplier']} | {r['sampling_rate']:.4g} | {r['steps']:,} | {r['accountant']} | "
                + (f"{_f(r.get('epsilon'), '{:.3f}')} | {_f(r.get('first_call_s'), '{:.3f}')} | "
                   f"{_f(r.get('repeat_call_s'), '{:.3f}')} |" if _ok(r) else f"error: {r.get('error')} | | |"))

    mrow = results.get("max_batch", [])
    if mrow:
        lines += ["", "## Largest batch that fits in device memory", "",
                  "Doubling then bisection; a probe fails when XLA's memory analysis exceeds `bytes_limit` or "
                  "one step runs out of memory.", "",
                  "| model | method | max batch | ÷ JAX NP | first failure | complete | probes |",
                  "|---|---|---:|---:|---:|---|---:|"]
        for r in mrow:
            lines.append(
                f"| {r['model']} | {r.get('label', r['method'])} | {_f(r.get('max_batch'))} | "
                f"{_f(r.get('ratio_max_batch'), '{:.3f}')} | {_f(r.get('first_failure'))} | "
                f"{'yes' if r.get('complete') else 'no (budget)'}{' (cap)' if r.get('capped') else ''} | "
                f"{len(r.get('probes', []))} |" if r.get("status") == "ok" else
                f"| {r['model']} | {r.get('label', r['method'])} | error: {r.get('error', '')[:120]} | | | | |")

    errors = results.get("errors", [])
    if errors:
        lines += ["", "## Task errors", ""] + [f"- {e['what']}: {e['error'][:300]}" for e in errors]
    phases = meta.get("phase_wall_s")
    if phases:
        lines += ["", "Wall time per phase (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
                  + f"; total {meta.get('total_wall_s', 0):.0f}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots

def plots(results: dict, out_dir: str) -> list:
    """Write the two PNGs; return their paths.

    ``throughput.png``: examples/s (log) and ÷ JAX non-private, by method and
    batch, one column per model. ``memory.png``: XLA scratch MiB (log), scratch
    ÷ non-private and, where reported, peak device MiB.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("throughput", []) if _ok(r)]
    models = [m for m in model_specs.MODELS if any(r["model"] == m for r in rows)]
    label = results.get("meta", {}).get("device_label", "")
    if not models:
        return []
    cmap = plt.get_cmap("tab10")

    def grouped(ax, mrows, value, ylabel, log, ref=None):
        batches = sorted({r["batch"] for r in mrows})
        methods = sorted({r["method"] for r in mrows}, key=_order)
        width = 0.8 / max(1, len(methods))
        values = []
        for j, m in enumerate(methods):
            xs, ys = [], []
            for i, b in enumerate(batches):
                r = next((r for r in mrows if r["batch"] == b and r["method"] == m), None)
                v = value(r) if r else None
                if v is not None and v > 0:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(v)
            if xs:
                ax.bar(xs, ys, width, label=m, color=cmap(_order(m) % 10))
                values += ys
        ax.set_xticks(range(len(batches)))
        ax.set_xticklabels([str(b) for b in batches])
        ax.set_xlabel("batch")
        ax.set_ylabel(ylabel)
        if log and values:
            ax.set_yscale("log")
            ax.set_ylim(min(values) / 3, max(values) * 2)
        if ref is not None:
            ax.axhline(ref, color="k", lw=0.8, ls="--")
        ax.grid(axis="y", alpha=0.3)

    def figure(panels, title, name):
        fig, axes = plt.subplots(len(panels), len(models), figsize=(5.5 * len(models), 3.6 * len(panels)),
                                 squeeze=False)
        for i, (what, value, ylabel, log, ref) in enumerate(panels):
            for j, m in enumerate(models):
                grouped(axes[i][j], [r for r in rows if r["model"] == m], value, ylabel, log, ref)
                axes[i][j].set_title(f"{m}: {what}")
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes.flat:  # the union of methods over all panels
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        order = sorted(range(len(labels)), key=lambda k: _order(labels[k]))
        fig.legend([handles[k] for k in order], [labels[k] for k in order], loc="upper center",
                   ncol=min(8, len(labels)), fontsize=8, bbox_to_anchor=(0.5, 1.0))
        fig.suptitle(f"{title}, {label}", y=1.0 + 0.06 / len(panels))
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.08 / len(panels)))
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path

    paths = [figure([
        ("examples/s", lambda r: r.get("examples_per_s"), "examples/s (log)", True, None),
        ("÷ JAX non-private", lambda r: r.get("ratio_examples_per_s"), "examples/s ÷ JAX non-private", False, 1.0),
    ], "Training-step throughput", THROUGHPUT_PNG)]
    panels = [
        ("XLA scratch", lambda r: _div(r.get("scratch_bytes"), MiB), "XLA scratch MiB (log)", True, None),
        ("scratch ÷ non-private", lambda r: r.get("ratio_scratch"), "scratch ÷ JAX non-private", False, 1.0),
    ]
    if any(r.get("peak_bytes") for r in rows):
        panels.append(("peak device memory", lambda r: _div(r.get("peak_bytes"), MiB), "peak MiB (log)", True, None))
    paths.append(figure(panels, "Memory", MEMORY_PNG))
    return paths


def write(results: dict, out_dir: str, with_plots: bool = True) -> dict:
    """Write results.json, results.md and (optionally) the PNGs; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    add_ratios(results)
    paths = {"json": os.path.join(out_dir, JSON_NAME), "md": os.path.join(out_dir, MD_NAME)}
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(protocol.finite(results), f, indent=1, allow_nan=False, default=str)
    os.replace(tmp, paths["json"])
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    if with_plots:
        for p in plots(results, out_dir):
            paths[os.path.basename(p).split(".")[0]] = p
    return paths


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report RESULTS_DIR", file=sys.stderr)
        return 2
    with open(os.path.join(argv[0], JSON_NAME)) as f:
        results = json.load(f)
    for p in write(results, argv[0]).values():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
