"""PyTorch peers: non-private PyTorch, Opacus with hooks, Opacus with ghost clipping.

Runs in its own process (``benchmarks.run`` launches it; it never imports
JAX), prints one JSON line per result (see :mod:`benchmarks.protocol`)::

    python -m benchmarks.torch_peers '{"size": "tiny", "models": {"cnn": [8]},
        "methods": ["torch-nonprivate", "opacus-hooks", "opacus-ghost"], "steps": 3, "warmup": 1}'

The models are those of :mod:`benchmarks.model_specs`, written in PyTorch
(NCHW images; attention as four ``nn.Linear`` and
``F.scaled_dot_product_attention``, so that Opacus hooks and ghost clipping
handle every parameterised layer). Same step as the JAX side: SGD (lr 0.01);
Opacus with ``max_grad_norm=1``, ``noise_multiplier=1`` and a fixed batch
(``poisson_sampling=False``; the loop feeds the same device tensors every
step, so no data loading is timed). fp32 with TF32 matmuls on a GPU, as in
``shared/ANCHORS.md``. Each timed step ends with ``torch.cuda.synchronize()``.
Peak memory is ``torch.cuda.max_memory_allocated()`` after a reset per cell.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import traceback

from benchmarks import model_specs, protocol

LABELS = {
    "torch-nonprivate": "PyTorch non-private",
    "opacus-hooks": "Opacus hooks",
    "opacus-ghost": "Opacus ghost",
}
METHODS = tuple(LABELS)
LEARNING_RATE = 0.01
CLIP = 1.0
SIGMA = 1.0


def availability(method: str, python: str | None = None) -> tuple[bool, str]:
    """Is the package for ``method`` installed (in this interpreter, or in ``python``)?"""
    if method not in LABELS:
        return False, f"unknown method {method!r}"
    needs = ["torch"] + (["opacus"] if method.startswith("opacus") else [])
    if python is None:
        missing = [n for n in needs if importlib.util.find_spec(n) is None]
    else:
        probe = "import importlib.util as u, sys; print(' '.join(n for n in sys.argv[1:] if u.find_spec(n) is None))"
        try:
            proc = subprocess.run([python, "-c", probe, *needs], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"cannot run {python}: {e}"
        if proc.returncode != 0:
            return False, f"cannot run {python}: {proc.stderr.strip()[-300:]}"
        missing = proc.stdout.split()
    if missing:
        where = f" in {python}" if python else ""
        return False, f"{', '.join(missing)} not installed{where} (pip install 'dpjax[bench]')"
    return True, ""


def _build(name: str, s: dict):
    import torch.nn.functional as F
    from torch import nn

    if name == "cnn":
        class CNN(nn.Module):
            def __init__(self):
                super().__init__()
                layers, cin = [], s["channels"]
                for i, w in enumerate(s["widths"]):
                    layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU()]
                    if i % 2 == 1:
                        layers.append(nn.AvgPool2d(2))
                    cin = w
                self.features = nn.Sequential(*layers)
                self.head = nn.Linear(cin, s["classes"])

            def forward(self, x):
                return self.head(self.features(x).mean(dim=(2, 3)))

        return CNN()

    if name == "transformer":
        class SelfAttention(nn.Module):
            def __init__(self, d, heads):
                super().__init__()
                self.heads = heads
                self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

            def forward(self, x):
                b, t, d = x.shape

                def split(z):
                    return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

                y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
                return self.o(y.transpose(1, 2).reshape(b, t, d))

        class Block(nn.Module):
            def __init__(self, d, heads, ff):
                super().__init__()
                self.ln1, self.attn = nn.LayerNorm(d), SelfAttention(d, heads)
                self.ln2, self.ff1, self.ff2 = nn.LayerNorm(d), nn.Linear(d, ff), nn.Linear(ff, d)

            def forward(self, x):
                x = x + self.attn(self.ln1(x))
                return x + self.ff2(F.gelu(self.ff1(self.ln2(x)), approximate="tanh"))

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(s["vocab"], s["d"])
                self.blocks = nn.ModuleList([Block(s["d"], s["heads"], s["ff"]) for _ in range(s["layers"])])
                self.ln, self.head = nn.LayerNorm(s["d"]), nn.Linear(s["d"], s["classes"])

            def forward(self, tokens):
                x = self.embed(tokens)
                for blk in self.blocks:
                    x = blk(x)
                return self.head(self.ln(x).mean(dim=1))

        return Encoder()

    layers, cin = [], s["inputs"]
    for h in s["hidden"]:
        layers += [nn.Linear(cin, h), nn.ReLU()]
        cin = h
    layers.append(nn.Linear(cin, s["classes"]))
    return nn.Sequential(*layers)


def _batch(name: str, s: dict, batch_size: int, device):
    import torch

    g = torch.Generator().manual_seed(batch_size)
    if name == "cnn":
        x = torch.randn(batch_size, s["channels"], s["hw"], s["hw"], generator=g)
    elif name == "transformer":
        x = torch.randint(0, s["vocab"], (batch_size, s["seq"]), generator=g)
    else:
        x = torch.randn(batch_size, s["inputs"], generator=g)
    y = torch.randint(0, s["classes"], (batch_size,), generator=g)
    return x, y, x.to(device), y.to(device)


def measure(name: str, size: str, method: str, batch_size: int, steps: int, warmup: int, device) -> dict:
    import torch
    from torch import nn

    row = {"kind": "throughput", "framework": "torch", "model": name, "size": size, "batch": batch_size,
           "method": method, "label": LABELS[method], "steps": steps, "warmup": warmup, "compile_s": None,
           "scratch_bytes": None}
    cuda = device.type == "cuda"
    try:
        torch.manual_seed(0)
        s = model_specs.spec(name, size)
        model = _build(name, s).to(device)
        model.train()
        row["num_params"] = int(sum(p.numel() for p in model.parameters()))
        x_cpu, y_cpu, x, y = _batch(name, s, batch_size, device)
        criterion = nn.CrossEntropyLoss()
        opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        if method != "torch-nonprivate":
            from opacus import PrivacyEngine

            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_cpu, y_cpu),
                                                 batch_size=batch_size)
            engine = PrivacyEngine()
            common = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                          max_grad_norm=CLIP, poisson_sampling=False)
            if method == "opacus-hooks":
                model, opt, _ = engine.make_private(**common, grad_sample_mode="hooks")
            else:
                model, opt, criterion, _ = engine.make_private(**common, criterion=criterion,
                                                               grad_sample_mode="ghost")

        def step():
            opt.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        row["first_step_s"] = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            step()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        row.update(status="ok", examples_per_s=batch_size / med, median_step_s=med, min_step_s=min(times),
                   max_step_s=max(times), mean_step_s=statistics.fmean(times),
                   peak_bytes=int(torch.cuda.max_memory_allocated()) if cuda else None)
    except Exception as e:  # noqa: BLE001 - recorded, the other cells go on
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:800]}",
                   traceback=traceback.format_exc(limit=4)[-1500:])
    finally:
        model = opt = x = y = None  # noqa: F841 - drop references before freeing
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0]) if argv else {}
    size = spec.get("size", "tiny")
    models = spec.get("models", {"cnn": model_specs.DEFAULT_BATCHES["cnn"][size]})
    methods = spec.get("methods", list(METHODS))
    steps, warmup = int(spec.get("steps", 20)), int(spec.get("warmup", 2))

    import torch

    want = spec.get("device", "auto")
    device = torch.device("cuda" if (want == "auto" and torch.cuda.is_available()) else
                          ("cpu" if want == "auto" else want))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    opacus_version = None
    try:
        import opacus

        opacus_version = opacus.__version__
    except Exception:  # noqa: BLE001
        pass
    protocol.emit({"kind": "meta", "framework": "torch", "torch": torch.__version__, "opacus": opacus_version,
                   "torch_device": str(device),
                   "torch_device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch_threads": torch.get_num_threads()})
    for name, batches in models.items():
        for method in methods:
            if method.startswith("opacus") and opacus_version is None:
                continue  # the parent records the reason
            for b in sorted(batches):
                protocol.emit(measure(name, size, method, int(b), steps, warmup, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
