"""dpjax: differentially private training for JAX.

Two-line change to an optax loop::

    grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0)          # was jax.grad(loss_fn)
    tx = dpjax.privatize(optax.adam(1e-3), noise_multiplier=1.1,     # was optax.adam(1e-3)
                         l2_clip_norm=1.0, expected_batch_size=256, num_examples=60_000)

and ``dpjax.epsilon(opt_state, delta=1e-5)`` at any time.
"""

from dpjax import accounting
from dpjax.accounting import PrivacyBudgetExceeded, calibrate_noise_multiplier
from dpjax.clipping import ClippedGradient, clipped_grad, even_layer_clip_norms
from dpjax.ledger import PrivacyLedger, check_budget, epsilon, privacy_statement, steps_taken
from dpjax.noise import PrivatizeState, dp_adam, dp_sgd, privatize
from dpjax.sampling import Batch, FixedSizeSampler, PoissonSampler

__version__ = "0.1.0"

__all__ = [
    "Batch",
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

    if name in ("datasets", "models", "training", "checkpointing", "parallel", "audit", "pate", "fast_clipping"):
        return importlib.import_module(f"dpjax.{name}")
    if name in ("fit", "TrainResult"):
        return getattr(importlib.import_module("dpjax.training"), name)
    raise AttributeError(f"module 'dpjax' has no attribute {name!r}")
