"""Batch provenance: the noise step accepts only batches its ledger accounts for.

The accountant's ε holds for one mechanism: at each noisy step, a fresh draw of
the sampler the ledger describes (Poisson with rate ``q`` over ``N`` examples, or
fixed-size), its padding masked, noised once. A loop that feeds anything else (its
own shuffled batches, one draw reused, a fresh draw per accumulation micro-step, a
sampler built for another ``N``) voids the guarantee silently. So every batch
a dpjax sampler draws carries a :class:`Provenance` stamp, ``clipped_grad``
copies it into the :class:`~dpjax.ClippedGradient`, and :func:`dpjax.privatize`
compares it with its ledger (privacy invariant 7):

==========================  =====================================================
check                       refused when
==========================  =====================================================
same sampler                sampling scheme, ``N`` or ``q`` differ from the ledger's
in order, once each         the stamp's step is not the ledger's step count
one draw per noisy step     with ``accumulation_steps=k``: not micro-batch ``i``
                            of ``k`` of one draw, fed in order ``0 .. k-1``
==========================  =====================================================

Outside ``jit`` a mismatch raises :class:`BatchProvenanceError` before anything
is applied. Inside ``jit`` the step is refused like a step past the budget: zero
updates, the ledger's step count, the optimizer state and the accumulator are
left as they were, the refusal is counted, a warning is printed, and
:func:`dpjax.check_budget` raises the reason. The decision depends on the stamp
only, never on the data, so refusing costs no privacy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["BatchProvenanceError", "Provenance", "describe_refusal", "refusal_code"]

# Reasons, as bits of one int32 code (0: accepted).
WRONG_SAMPLER = 1
OUT_OF_ORDER = 2
NOT_ONE_DRAW = 4
MICRO_OUT_OF_ORDER = 8

_REASONS = {
    WRONG_SAMPLER: (
        "the batch was drawn by a sampler with another sampling scheme, data-set size N, rate q "
        "or partitioning than the one privatize accounts for",
        "build privatize with sampler=<the sampler that draws the batches>",
    ),
    OUT_OF_ORDER: (
        "the batch was not drawn for the step the ledger is at (a batch used twice, skipped, drawn "
        "ahead, or a sampler restarted or not restored with the checkpoint)",
        "draw exactly one batch per noisy step with sampler.sample() and restore the sampler's "
        "state_dict() together with the optimizer state",
    ),
    NOT_ONE_DRAW: (
        "the micro-batches of this noisy step do not come from one logical draw split into "
        "accumulation_steps parts (e.g. one sampler.sample() per micro-step, which puts an "
        "example in several batches of one noisy step)",
        "draw once per noisy step and feed its parts: for b in sampler.sample_micro_batches(k)",
    ),
    MICRO_OUT_OF_ORDER: (
        "the micro-batches of one draw were not fed once each, in order",
        "feed every part of sampler.sample_micro_batches(k) once, in the order given",
    ),
}


class BatchProvenanceError(ValueError):
    """A clipped gradient whose batch the ledger cannot account for was refused."""


@struct.dataclass
class Provenance:
    """Where a batch came from; :func:`dpjax.privatize` checks it against its ledger.

    All fields are scalar arrays, so the stamp travels through ``jit`` without
    recompiling and is compared with the ledger inside the compiled step. Made
    by :meth:`dpjax.Batch.provenance`.

    Attributes:
      step: the sampler step (logical batch) the rows were drawn for.
      micro_index: which micro-batch of that draw (0 when it is not split).
      micro_count: how many micro-batches the draw was split into (1: none).
      sampling: the ledger's code of the sampling scheme.
      num_examples: ``N``.
      sampling_rate: ``q`` as a float32 rounded up, as the ledger stores it.
      partitions, partition_id: a cyclic sampler's parts and the fingerprint of
        its partitioning (1 and 0 for the other samplers).
    """

    step: jax.Array
    micro_index: jax.Array
    micro_count: jax.Array
    sampling: jax.Array
    num_examples: jax.Array
    sampling_rate: jax.Array
    partitions: jax.Array
    partition_id: jax.Array


def refusal_code(stamp: Provenance, ledger, micro_step, accumulation_steps: int) -> jax.Array:
    """The int32 refusal code of ``stamp`` against ``ledger`` (0: accepted).

    ``micro_step`` is the number of micro-batches of the current noisy step
    already added up (always 0 without accumulation). A data-set size of 0 in
    the ledger (``privatize(sampling_rate=...)`` without ``N``) is not compared.
    A stamp with a *lower* rate than the ledger's is accepted: its ε is at most
    the accounted one.
    """
    same_sampler = (
        (stamp.sampling == ledger.sampling)
        & ((ledger.dataset_size == 0) | (stamp.num_examples == ledger.dataset_size))
        & (stamp.sampling_rate <= ledger.sampling_rate)
        & (stamp.partitions == ledger.partitions)
        & (stamp.partition_id == ledger.partition_id)
    )
    code = jnp.where(same_sampler, 0, WRONG_SAMPLER)
    code = code | jnp.where(stamp.step == ledger.steps, 0, OUT_OF_ORDER)
    code = code | jnp.where(stamp.micro_count == accumulation_steps, 0, NOT_ONE_DRAW)
    code = code | jnp.where(stamp.micro_index == micro_step, 0, MICRO_OUT_OF_ORDER)
    return code.astype(jnp.int32)


def describe_refusal(code: int, details: str = "") -> str:
    """The causes and fixes for a refusal code, as one message."""
    code = int(code)
    causes = [f"{why}; fix: {fix}" for bit, (why, fix) in _REASONS.items() if code & bit]
    text = "dpjax.privatize refused a clipped gradient: " + " | ".join(causes or ["unknown reason"])
    if details:
        text += f" ({details})"
    return text + ". Nothing was applied: parameters, optimizer state and privacy ledger are unchanged."


def missing_stamp_message() -> str:
    return (
        "dpjax.privatize refused a clipped gradient that carries no batch provenance: it was computed "
        "from a plain array batch, so nothing shows it is a fresh draw of the sampler the ledger "
        "accounts for (its own shuffled or sequential batches, or padded rows without their mask, "
        "would void the guarantee). Compute it from the batch a dpjax sampler drew: "
        "grad_fn(params, sampler.sample().take(data)), or batch.attach(rows) for rows you read "
        "yourself from batch.indices. If you sample by yourself and have your own privacy analysis, "
        "build privatize(..., trust_unverified_batches=True); the privacy statement then says so. "
        "Nothing was applied."
    )


class BatchProvenanceWarning(UserWarning):
    """Printed when a jitted step refuses a batch for its provenance (see :func:`dpjax.check_budget`)."""
