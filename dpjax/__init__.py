"""dpjax: differentially private training for JAX.

The change to an optax loop::

    sampler = dpjax.PoissonSampler(len(x_train), expected_batch_size=256)
    grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0)          # was jax.grad(loss_fn)
    tx = dpjax.privatize(optax.adam(1e-3), noise_multiplier=1.1,     # was optax.adam(1e-3)
                         l2_clip_norm=1.0, sampler=sampler)
    batch = sampler.sample().take(data)                              # was your own batches

and ``dpjax.epsilon(opt_state, delta=1e-5)`` at any time. What dpjax cannot
account for (a batch it did not draw, padding without its mask, a draw used
twice) is refused, inside ``jit`` too.
"""

# Everything is imported on first use (PEP 562), so that `import dpjax` (and the
# `dpjax --help` command line) does not pull in JAX and dp-accounting.
_LAZY = {
    "PrivacyBudgetExceeded": "dpjax.accounting",
    "calibrate_noise_multiplier": "dpjax.accounting",
    "ClippedGradient": "dpjax.clipping",
    "clipped_grad": "dpjax.clipping",
    "even_layer_clip_norms": "dpjax.clipping",
    "BandMF": "dpjax.correlated_noise",
    "TreeAggregation": "dpjax.correlated_noise",
    "PrivacyLedger": "dpjax.ledger",
    "check_budget": "dpjax.ledger",
    "epsilon": "dpjax.ledger",
    "privacy_statement": "dpjax.ledger",
    "steps_taken": "dpjax.ledger",
    "PrivatizeState": "dpjax.noise",
    "UnverifiedBatchesWarning": "dpjax.noise",
    "dp_adam": "dpjax.noise",
    "dp_sgd": "dpjax.noise",
    "privatize": "dpjax.noise",
    "BatchProvenanceError": "dpjax.provenance",
    "BatchProvenanceWarning": "dpjax.provenance",
    "Batch": "dpjax.sampling",
    "CyclicPoissonSampler": "dpjax.sampling",
    "FixedSizeSampler": "dpjax.sampling",
    "PoissonSampler": "dpjax.sampling",
    "SampledBatch": "dpjax.sampling",
    "fit": "dpjax.training",
    "TrainResult": "dpjax.training",
}
_SUBMODULES = ("accounting", "attacks", "audit", "checkpointing", "clipping", "correlated_noise", "datasets",
               "defaults", "fast_clipping", "ledger", "models", "nnx", "noise", "parallel", "pate", "provenance", "sampling",
               "separability", "training", "validation", "weight_sharing")

__version__ = "0.1.0"

__all__ = [
    "BandMF",
    "Batch",
    "BatchProvenanceError",
    "BatchProvenanceWarning",
    "SampledBatch",
    "UnverifiedBatchesWarning",
    "ClippedGradient",
    "CyclicPoissonSampler",
    "FixedSizeSampler",
    "PoissonSampler",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "PrivatizeState",
    "accounting",
    "calibrate_noise_multiplier",
    "check_budget",
    "clipped_grad",
    "dp_adam",
    "dp_sgd",
    "epsilon",
    "even_layer_clip_norms",
    "privacy_statement",
    "privatize",
    "steps_taken",
    "TreeAggregation",
    "fit",
    "TrainResult",
]


def __getattr__(name):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"dpjax.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'dpjax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
