"""The defaults of ``dpjax train`` and ``dpjax.fit`` (no JAX import: the CLI reads them for ``--help``).

Chosen on a validation split of digits' training data over 5 seeds
(``benchmarks/tune_defaults.py``); their test accuracy over seeds is in
``benchmarks/results/accuracy_vs_epsilon.md``. Full batch (1,437 = all of
digits' training set, so q = 1): each epoch is one noisy step. The optimizer is
schedule-free SGD (``dpjax.training.default_optimizer``), evaluated at its
averaged parameters.
"""

DEFAULTS = {
    "model": "cnn",
    "epochs": 45,
    "batch_size": None,  # None: the whole training set (q = 1)
    "l2_clip_norm": 3.0,
    "optimizer": "schedule_free_sgd",
    "learning_rate": 2.0,
    "momentum": 0.95,
}
