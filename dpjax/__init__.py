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

from dpjax import accounting
from dpjax.accounting import PrivacyBudgetExceeded, calibrate_noise_multiplier
from dpjax.clipping import ClippedGradient, clipped_grad, even_layer_clip_norms
from dpjax.ledger import PrivacyLedger, check_budget, epsilon, privacy_statement, steps_taken
from dpjax.noise import PrivatizeState, UnverifiedBatchesWarning, dp_adam, dp_sgd, privatize
from dpjax.provenance import BatchProvenanceError, BatchProvenanceWarning
from dpjax.sampling import Batch, FixedSizeSampler, PoissonSampler, SampledBatch

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "BatchProvenanceError",
    "BatchProvenanceWarning",
    "SampledBatch",
    "UnverifiedBatchesWarning",
    "ClippedGradient",
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
    "fit",
    "TrainResult",
]


def __getattr__(name):
    # The training loop pulls in orbax and tqdm; import it only when asked for.
    import importlib

    if name in ("datasets", "models", "training", "checkpointing", "parallel", "audit", "pate", "fast_clipping",
                "nnx"):
        return importlib.import_module(f"dpjax.{name}")
    if name in ("fit", "TrainResult"):
        return getattr(importlib.import_module("dpjax.training"), name)
    raise AttributeError(f"module 'dpjax' has no attribute {name!r}")
