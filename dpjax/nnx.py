"""Flax NNX as a first-class loop: :class:`Optimizer`, ``nnx.Optimizer`` for private training.

``flax.nnx.Optimizer.update(model, grads)`` keeps only the gradient arrays of
``grads`` before calling ``tx.update``, so a :class:`~dpjax.ClippedGradient`
would lose what makes it private (its sensitivity and its batch provenance) and
:func:`dpjax.privatize` refuses what is left. :class:`Optimizer` is the same
class with the same constructor and ``update(model, grads)``, except that
``grads`` is the ``ClippedGradient`` that :func:`dpjax.clipped_grad` returns
for an NNX module, handed to ``tx.update`` whole.

Example (the NNX loop; the ``# was`` comments are the non-private version):

>>> import jax.numpy as jnp, numpy as np, optax, dpjax
>>> from flax import nnx
>>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
>>> data = {"x": np.ones((64, 3), np.float32), "y": np.zeros(64, np.int32)}
>>> sampler = dpjax.PoissonSampler(64, expected_batch_size=8, seed=0)
>>> def loss_fn(model, batch):
...     logits = model(batch["x"])
...     return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
>>> grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0)              # was nnx.grad(loss_fn)
>>> tx = dpjax.privatize(optax.adam(1e-2), noise_multiplier=1.0,          # was optax.adam(1e-2)
...                      l2_clip_norm=1.0, sampler=sampler, seed=0)
>>> optimizer = dpjax.nnx.Optimizer(model, tx)                          # was nnx.Optimizer(..., wrt=nnx.Param)
>>> @nnx.jit
... def train_step(model, optimizer, batch):
...     optimizer.update(model, grad_fn(model, batch))
>>> for _ in range(3):
...     train_step(model, optimizer, sampler.sample().take(data))        # was your own batches
>>> dpjax.steps_taken(optimizer)
3
"""

from __future__ import annotations

import optax
from flax import nnx

from dpjax import ledger as ledger_lib
from dpjax.clipping import ClippedGradient

__all__ = ["Optimizer"]


class Optimizer(nnx.Optimizer):
    """``nnx.Optimizer`` for a :func:`dpjax.privatize` transformation.

    Args:
      model: the NNX module being trained.
      tx: a private optimizer (:func:`dpjax.privatize`, ``dp_sgd``, ``dp_adam``).
      wrt: must be ``nnx.Param`` (the default): :func:`dpjax.clipped_grad`
        clips the gradient of every ``nnx.Param``, so the optimizer must update
        exactly those.
      graph: as for ``nnx.Optimizer``.

    ``dpjax.epsilon(optimizer, delta)``, ``dpjax.steps_taken(optimizer)``,
    ``dpjax.check_budget(optimizer)`` and ``dpjax.privacy_statement`` read its
    ledger.
    """

    def __init__(self, model, tx: optax.GradientTransformation, *, wrt=nnx.Param, graph=None):
        if wrt is not nnx.Param:
            raise ValueError(
                "dpjax.nnx.Optimizer updates exactly the nnx.Param variables, the ones dpjax.clipped_grad "
                f"clips; got wrt={wrt!r}"
            )
        super().__init__(model, tx, wrt=wrt, graph=graph)
        ledger_lib.find_ledger(self)  # a clear error now if tx is not private

    def update(self, model, grads, /, **kwargs):
        """Apply ``tx`` to the :class:`~dpjax.ClippedGradient` ``grads`` and update ``model``.

        Returns the updates, like ``nnx.Optimizer.update``. A refused step (budget
        spent, or a batch the ledger cannot account for, inside ``jit``) leaves
        the model unchanged: its updates are zero.
        """
        if not isinstance(grads, ClippedGradient):
            raise TypeError(
                "dpjax.nnx.Optimizer.update needs the dpjax.ClippedGradient that "
                "dpjax.clipped_grad(loss_fn, l2_clip_norm=C)(model, batch) returns, got "
                f"{type(grads).__name__}: plain gradients (e.g. from nnx.grad) carry no clipping guarantee"
            )
        params = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
        summed = nnx.as_pure(grads.sum)
        if not isinstance(summed, nnx.State):
            raise TypeError(
                "the ClippedGradient's sum is not an nnx.State: compute it from the module itself, "
                "grad_fn(model, batch), so that it matches the model's nnx.Param variables"
            )
        updates, new_opt_state = self.tx.update(
            grads.replace(sum=summed), nnx.as_pure(self.opt_state), params, **nnx.as_pure(kwargs)
        )
        nnx.update(model, optax.apply_updates(params, updates))
        nnx.update(self.opt_state, nnx.state(new_opt_state, graph=self.graph))
        self.step[...] += 1
        return updates
