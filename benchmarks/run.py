"""dpjax benchmark suite: one entry point.

    python -m benchmarks.run --smoke                     # every available method, tiny sizes, CPU, < 1 min
    python -m benchmarks.run --small --device-label cpu-2core   # a 2-core CPU, a few minutes
    bash benchmarks/gpu.sh                               # the ANCHORS sizes on one GPU

For every model × batch × method: examples/s (batch ÷ median step time after
warm-up), the ratio to non-private JAX on the same model and batch, XLA scratch
memory (``memory_analysis().temp_size_in_bytes``), peak device memory where
the backend reports it (GPU), and compile time. Methods: non-private JAX,
dpjax vmap, dpjax fast, ``optax.contrib.dpsgd`` with vmapped per-example
gradients, ``jax_privacy.clipped_grad`` (when installed), and in a separate
process non-private PyTorch and Opacus with hooks and with ghost clipping (when
installed). Then: the overhead of Poisson sampling with padding
(``dpjax.PoissonSampler``) over a fixed batch and the recompiles after warm-up;
the time of one ε after 10⁵ steps (RDP, PLD); on a GPU only, the largest batch
that fits, DP vs non-private.

Writes ``<out>/<device-label>/results.json`` (raw rows, versions, device),
``results.md`` and ``throughput.png`` / ``memory.png``. A method that is not
installed is skipped with its reason recorded; a method that fails is recorded
with its error. On a GPU every JAX task runs in its own process (``--isolate``)
so that peak memory is per task; PyTorch always runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks import model_specs, protocol, torch_peers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results")
PHASES = ("throughput", "torch", "poisson", "accountant", "max-batch")

# Per size preset: steps, warm-up, Poisson setting, accountant settings.
PRESETS = {
    "full": {"steps": 20, "warmup": 2, "poisson": ("cnn", 1024, 50, 10, 5), "accountant_settings": 2},
    "small": {"steps": 10, "warmup": 2, "poisson": ("cnn", 64, 40, 8, 5), "accountant_settings": 2},
    "tiny": {"steps": 3, "warmup": 1, "poisson": ("mlp", 16, 32, 2, 3), "accountant_settings": 1},
}


def _ints(text):
    return [int(t) for t in str(text).split(",") if t.strip()]


def _names(text):
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_args(argv=None):
    from benchmarks import jax_methods  # noqa: F401 - fail early if JAX is broken

    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true",
                      help="tiny models and batches, few steps: checks that every method runs (CPU, < 1 min)")
    size.add_argument("--small", action="store_true", help="the models shrunk for a CPU (default: ANCHORS sizes)")
    ap.add_argument("--models", default=",".join(model_specs.MODELS), help="comma list of cnn,transformer,mlp")
    for m in model_specs.MODELS:
        ap.add_argument(f"--{m}-batches", default=None,
                        help=f"comma list (default full {model_specs.DEFAULT_BATCHES[m]['full']}, "
                             f"small {model_specs.DEFAULT_BATCHES[m]['small']}, "
                             f"smoke {model_specs.DEFAULT_BATCHES[m]['tiny']})")
    ap.add_argument("--methods", default="all",
                    help="comma list of " + ",".join(jax_methods.METHODS + torch_peers.METHODS) + " (default all)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per cell (median reported)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after compiling")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: " + ",".join(PHASES))
    ap.add_argument("--device-label", default=None,
                    help="results folder name (default from the device, e.g. gpu-nvidia_h200)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="parent folder of <device-label>/ (default %(default)s)")
    ap.add_argument("--note", default=None, help="a sentence stored in the results (e.g. how peers were installed)")
    ap.add_argument("--isolate", choices=("auto", "on", "off"), default="auto",
                    help="run every JAX task in its own process (auto: on a GPU)")
    ap.add_argument("--torch-python", default=None,
                    help="interpreter with torch/opacus for the PyTorch peers (default: this one)")
    ap.add_argument("--worker-timeout-s", type=float, default=420.0, help="limit per subprocess")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="stop starting new tasks after this many seconds (the rest is recorded as skipped)")
    ap.add_argument("--reserve-s", type=float, default=0.0,
                    help="with --time-budget-s: seconds of the budget the throughput phase leaves to the others")
    ap.add_argument("--poisson-model", default=None, help="model of the Poisson test")
    ap.add_argument("--poisson-batch", type=int, default=None, help="expected batch size E[B]")
    ap.add_argument("--poisson-examples", type=int, default=None, help="dataset size N (default 50·E[B])")
    ap.add_argument("--poisson-method", default="fast", choices=("fast", "vmap", "auto"))
    ap.add_argument("--accountant-steps", type=int, default=100_000)
    ap.add_argument("--max-batch-models", default="cnn,transformer")
    ap.add_argument("--max-batch-methods", default="jax-nonprivate,dpjax-fast")
    ap.add_argument("--max-batch-budget-s", type=float, default=35.0, help="per (model, method) search")
    ap.add_argument("--max-batch-precision", type=float, default=0.1,
                    help="stop bisecting when first failure ÷ last success - 1 is below this")
    args = ap.parse_args(argv)
    args.size = "tiny" if args.smoke else ("small" if args.small else "full")
    preset = PRESETS[args.size]
    args.steps = args.steps or preset["steps"]
    args.warmup = preset["warmup"] if args.warmup is None else args.warmup
    args.models = _names(args.models)
    for m in args.models:
        if m not in model_specs.MODELS:
            ap.error(f"unknown model {m!r}")
    args.batches = {}
    for m in args.models:
        given = getattr(args, f"{m}_batches")
        args.batches[m] = _ints(given) if given else list(model_specs.DEFAULT_BATCHES[m][args.size])
    everything = list(jax_methods.METHODS + torch_peers.METHODS)
    args.methods = everything if args.methods == "all" else _names(args.methods)
    for m in args.methods:
        if m not in everything:
            ap.error(f"unknown method {m!r}; choose from {', '.join(everything)}")
    args.skip = set(_names(args.skip))
    for p in args.skip:
        if p not in PHASES:
            ap.error(f"unknown phase {p!r}; choose from {', '.join(PHASES)}")
    pm, pe, pn, blocks, block_steps = preset["poisson"]
    args.poisson_model = args.poisson_model or pm
    args.poisson_batch = args.poisson_batch or pe
    args.poisson_examples = args.poisson_examples or pn * args.poisson_batch
    args.poisson_blocks, args.poisson_block_steps = blocks, block_steps
    return args


class Suite:
    """Runs the phases, keeps the results, writes them after every phase."""

    def __init__(self, args, argv):
        from benchmarks import environment

        self.args = args
        self.t0 = time.perf_counter()
        info = environment.device_info()
        self.gpu = info["platform"] in ("gpu", "cuda", "rocm")
        self.isolate = args.isolate == "on" or (args.isolate == "auto" and self.gpu)
        self.label = args.device_label or environment.device_label(info)
        self.out_dir = os.path.join(args.out, self.label)
        host = environment.host_info()
        self.results = {
            "meta": {
                "device_label": self.label, "device": info, "versions": environment.versions(),
                "date": host["date"], "machine": host["machine"], "cpus": host["cpus"], "env": host["env"],
                "command": "python -m benchmarks.run " + " ".join(argv),
                "note": args.note, "size": args.size, "steps": args.steps, "warmup": args.warmup, "isolate": self.isolate,
                "batches": args.batches, "methods": args.methods,
                "hyperparameters": {"optimizer": "sgd", "learning_rate": 0.01, "l2_clip_norm": 1.0,
                                    "noise_multiplier": 1.0, "dtype": "float32"},
                "peak_scope": ("per task process (batches in increasing order)" if self.isolate
                               else "whole process so far"),
                "phase_wall_s": {},
            },
            "throughput": [], "poisson": [], "accountant": [], "max_batch": [], "skipped": [], "errors": [],
        }

    # -- helpers -------------------------------------------------------------
    def remaining(self):
        if self.args.time_budget_s is None:
            return float("inf")
        return self.args.time_budget_s - (time.perf_counter() - self.t0)

    def skip(self, what, reason):
        self.results["skipped"].append({"what": what, "reason": reason})
        print(f"[bench] skip {what}: {reason}", flush=True)

    def _record(self, row):
        kind = row.get("kind")
        if kind == "meta":
            if row.get("framework") == "torch":
                self.results["meta"]["torch"] = {k: v for k, v in row.items() if k not in ("kind", "framework")}
                self.results["meta"]["versions"]["torch"] = row.get("torch")
                self.results["meta"]["versions"]["opacus"] = row.get("opacus")
            return
        key = {"throughput": "throughput", "poisson": "poisson", "max_batch": "max_batch"}.get(kind)
        if key is None:
            return
        self.results[key].append(row)
        print("[bench] " + _summary(row), flush=True)

    def task(self, what, spec, min_s=10.0, reserve_s=0.0):
        """Run one JAX task (in-process or in its own process); record rows and errors.

        Not started unless ``min_s`` seconds of the time budget remain beyond
        ``reserve_s`` (time kept for later phases); a subprocess is stopped when
        it would eat into the reserve (the rows it printed until then are kept).
        """
        left = self.remaining() - reserve_s
        if left < min_s:
            self.skip(what, "time budget exhausted")
            return
        if self.isolate:
            rows, error, _ = protocol.run_module(
                "benchmarks.worker", [json.dumps(spec)], timeout_s=min(self.args.worker_timeout_s, left),
                env={"PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}, cwd=REPO_ROOT)
            for r in rows:
                self._record(r)
            if error:
                self.results["errors"].append({"what": what, "error": error})
                print(f"[bench] error in {what}: {error}", flush=True)
        else:
            from benchmarks import worker

            try:
                worker.run_task(spec, self._record)
            except Exception as e:  # noqa: BLE001 - recorded, the suite goes on
                self.results["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}"})
                print(f"[bench] error in {what}: {e}", flush=True)

    def write(self, final=False):
        from benchmarks import report

        self.results["meta"]["total_wall_s"] = time.perf_counter() - self.t0
        return report.write(self.results, self.out_dir, with_plots=final)

    def phase(self, name, fn):
        if name in self.args.skip:
            self.skip(f"phase {name}", "--skip")
            return
        t = time.perf_counter()
        fn()
        self.results["meta"]["phase_wall_s"][name] = time.perf_counter() - t
        self.write()

    # -- phases --------------------------------------------------------------
    def throughput(self):
        from benchmarks import jax_methods

        a = self.args
        methods = [m for m in a.methods if m in jax_methods.METHODS]
        available = []
        for m in methods:
            ok, why = jax_methods.availability(m)
            if ok:
                available.append(m)
            else:
                self.skip(m, why)
        # Non-private first: every ratio needs it, and it is the cheapest to compile.
        for model in a.models:
            for m in available:
                self.task(f"{model}/{m}", {"task": "throughput", "model": model, "size": a.size, "method": m,
                                           "batches": a.batches[model], "steps": a.steps, "warmup": a.warmup},
                          reserve_s=a.reserve_s)

    def torch(self):
        a = self.args
        wanted = [m for m in a.methods if m in torch_peers.METHODS]
        available = []
        for m in wanted:
            ok, why = torch_peers.availability(m, a.torch_python)
            if ok:
                available.append(m)
            else:
                self.skip(m, why)
        if not available:
            return
        if self.remaining() < 20:
            self.skip("torch peers", "time budget exhausted")
            return
        spec = {"size": a.size, "models": {m: a.batches[m] for m in a.models}, "methods": available,
                "steps": a.steps, "warmup": max(a.warmup, 2), "device": "auto"}
        rows, error, _ = protocol.run_module(
            "benchmarks.torch_peers", [json.dumps(spec)], timeout_s=min(a.worker_timeout_s, self.remaining()),
            env={"PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}, cwd=REPO_ROOT,
            python=a.torch_python)
        for r in rows:
            self._record(r)
        if error:
            self.results["errors"].append({"what": "torch peers", "error": error})
            print(f"[bench] error in torch peers: {error}", flush=True)

    def poisson(self):
        a = self.args
        if a.poisson_model not in model_specs.MODELS:
            self.skip("poisson", f"unknown model {a.poisson_model!r}")
            return
        self.task("poisson", {"task": "poisson", "model": a.poisson_model, "size": a.size,
                              "expected_batch": a.poisson_batch, "num_examples": a.poisson_examples,
                              "method": a.poisson_method, "blocks": a.poisson_blocks,
                              "block_steps": a.poisson_block_steps})

    def accountant(self):
        from benchmarks import accountant_speed

        settings = accountant_speed.SETTINGS[:PRESETS[self.args.size]["accountant_settings"]]
        for row in accountant_speed.measure(self.args.accountant_steps, settings):
            self.results["accountant"].append(row)
            print("[bench] " + _summary(row), flush=True)

    def max_batch(self):
        a = self.args
        if not self.gpu:
            self.skip("max batch search", "GPU only (this device is "
                      f"{self.results['meta']['device']['platform']})")
            return
        for model in _names(a.max_batch_models):
            for m in _names(a.max_batch_methods):
                start = max(a.batches.get(model) or model_specs.DEFAULT_BATCHES[model]["full"])
                self.task(f"max batch {model}/{m}", {"task": "max_batch", "model": model, "size": a.size,
                                                     "method": m, "start": start,
                                                     "budget_s": a.max_batch_budget_s,
                                                     "precision": a.max_batch_precision},
                          min_s=a.max_batch_budget_s / 2)

    def run(self):
        self.phase("throughput", self.throughput)
        self.phase("torch", self.torch)
        self.phase("poisson", self.poisson)
        self.phase("accountant", self.accountant)
        self.phase("max-batch", self.max_batch)
        return self.write(final=True)


def _summary(row) -> str:
    kind = row.get("kind")
    if row.get("status") != "ok":
        where = "/".join(str(row.get(k)) for k in ("model", "batch", "method", "accountant") if row.get(k) is not None)
        return f"{kind} {where}: ERROR {row.get('error', '')[:200]}"
    if kind == "throughput":
        scratch = row.get("scratch_bytes")
        return (f"{row['model']:<11} b={row['batch']:<5} {row['method']:<16} {row['examples_per_s']:>12,.0f} ex/s"
                f"  compile {row.get('compile_s') or 0:5.1f}s"
                + (f"  scratch {scratch / 2**20:8.1f} MiB" if scratch is not None else ""))
    if kind == "poisson":
        return (f"poisson {row['model']} E[B]={row['expected_batch']}: overhead {100 * row['overhead']:+.1f}% "
                f"recompiles {row['recompiles_after_warmup']}")
    if kind == "accountant":
        return (f"accountant {row['accountant']} σ={row['noise_multiplier']} q={row['sampling_rate']:.4g} "
                f"{row['steps']} steps: ε={row['epsilon']:.3f} in {row['first_call_s']:.3f}s")
    if kind == "max_batch":
        return f"max batch {row['model']}/{row['method']}: {row.get('max_batch')} (complete={row.get('complete')})"
    return json.dumps(row)[:200]


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.smoke and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # Compile fast: the smoke run checks that every method runs, not its speed. (Takes effect only
        # if the JAX backend has not started yet in this process.)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    suite = Suite(args, argv)
    paths = suite.run()
    print("[bench] wrote " + ", ".join(paths.values()), flush=True)
    print(f"[bench] total {time.perf_counter() - suite.t0:.0f} s", flush=True)
    return paths


if __name__ == "__main__":
    main()
