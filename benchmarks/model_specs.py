"""The benchmark models as plain data, shared by the JAX and the PyTorch runners.

Pure Python on purpose: :mod:`benchmarks.torch_peers` imports this module in a
process that must not import JAX, and :mod:`benchmarks.workloads` builds the
Flax models from the same numbers, so both frameworks train the same
architecture on the same shapes.

Three size presets:

* ``full``: the models of ``shared/ANCHORS.md`` (GPU): the CIFAR-shaped CNN
  (4 convs 32-64-64-128, ReLU, 2×2 average pooling after the 2nd and 4th conv,
  global mean, linear head; 131k parameters), the transformer encoder (4
  layers, d=512, 8 heads, ff 2048, seq 128, vocab 8192, mean-pool classifier;
  16.9M parameters) and an MNIST-shaped MLP (784-1024-1024-10).
* ``small``: the same architectures shrunk for a 2-core CPU.
* ``tiny``: the smallest shapes that still exercise every layer type, for
  ``--smoke`` and the test suite.
"""

from __future__ import annotations

MODELS = ("cnn", "transformer", "mlp")
SIZES = ("full", "small", "tiny")

SPECS = {
    "cnn": {
        "full": {"widths": [32, 64, 64, 128], "hw": 32, "channels": 3, "classes": 10},
        "small": {"widths": [8, 16, 16, 32], "hw": 16, "channels": 3, "classes": 10},
        "tiny": {"widths": [4, 8], "hw": 8, "channels": 3, "classes": 10},
    },
    "transformer": {
        "full": {"vocab": 8192, "d": 512, "heads": 8, "ff": 2048, "layers": 4, "seq": 128, "classes": 2},
        "small": {"vocab": 512, "d": 64, "heads": 4, "ff": 256, "layers": 2, "seq": 32, "classes": 2},
        "tiny": {"vocab": 64, "d": 16, "heads": 2, "ff": 32, "layers": 1, "seq": 8, "classes": 2},
    },
    "mlp": {
        "full": {"inputs": 784, "hidden": [1024, 1024], "classes": 10},
        "small": {"inputs": 784, "hidden": [256, 256], "classes": 10},
        "tiny": {"inputs": 64, "hidden": [16], "classes": 10},
    },
}

# Default batch sizes per model and size preset (the defaults for "full").
DEFAULT_BATCHES = {
    "cnn": {"full": [256, 1024, 4096], "small": [64, 256], "tiny": [8]},
    "transformer": {"full": [32, 128], "small": [16], "tiny": [4]},
    "mlp": {"full": [1024], "small": [256], "tiny": [8]},
}


def spec(model: str, size: str) -> dict:
    """The architecture numbers of ``model`` at ``size`` (a fresh dict)."""
    if model not in SPECS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    if size not in SPECS[model]:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    return dict(SPECS[model][size])


def describe(model: str, size: str) -> str:
    """One line naming the architecture, for reports."""
    s = spec(model, size)
    if model == "cnn":
        return (f"CNN {s['hw']}x{s['hw']}x{s['channels']}, convs {'-'.join(map(str, s['widths']))}, "
                f"avg-pool, linear head")
    if model == "transformer":
        return (f"encoder {s['layers']} layers, d={s['d']}, {s['heads']} heads, ff {s['ff']}, "
                f"seq {s['seq']}, vocab {s['vocab']}")
    return f"MLP {s['inputs']}-{'-'.join(map(str, s['hidden']))}-{s['classes']}"
