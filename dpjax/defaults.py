"""The defaults of ``dpjax train`` and ``dpjax.fit`` (no JAX import: the CLI reads them for ``--help``).

Tuned on digits (``benchmarks/tune_digits.py``, see
``benchmarks/results/accuracy_vs_epsilon.md``). Full batch (1,437 = all of
digits' training set, so q = 1): each epoch is one noisy step. The optimizer is
schedule-free SGD (``dpjax.training.default_optimizer``), evaluated at its
averaged parameters.
"""

DEFAULTS = {
    "model": "cnn",
    "epochs": 30,
    "batch_size": None,  # None: the whole training set (q = 1)
    "l2_clip_norm": 1.0,
    "optimizer": "schedule_free_sgd",
    "learning_rate": 8.0,
    "momentum": 0.95,
}
