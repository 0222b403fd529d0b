"""Batch sampling whose privacy the accountant can analyse, with static shapes.

DP-SGD's privacy amplification by sampling holds only for the sampling scheme the
accountant analyses. This module provides exactly two schemes, and each sampler
says which one it is (``sampler.sampling``) and hands the accountant the matching
parameters (``sampler.accounting_kwargs()``), so the sampling used for training is
the one that is accounted for (privacy invariant 6):

* :class:`PoissonSampler` (the default and recommended one): at every step, every
  example is included independently with probability ``q``. The batch size is
  therefore random, ``Binomial(N, q)``. The RDP/PLD accountants analyse this
  under the add/remove-one neighbouring relation (sensitivity ``C``).
* :class:`FixedSizeSampler`: at every step, a uniformly random subset of exactly
  ``B`` examples, drawn afresh and independently of other steps (sampling without
  replacement; *not* an epoch shuffle). Analysed under the replace-one relation
  (sensitivity ``2C``), which costs more ε than Poisson at the same ``q``.

Shuffled epoch batching (shuffle once, cut into consecutive batches) is refused on
purpose: there is no ``shuffled_batches`` here. No accountant in dpjax analyses it
honestly (treating it as Poisson understates ε), and fail-safe defaults say that
anything unaccountable is refused rather than silently accepted.

Static shapes
    A Poisson batch has a random size, but a jitted step compiles once per input
    shape. Each batch is therefore padded up to the smallest *bucket size* that
    holds it, from a short ladder of sizes around ``E[B] = N q``. Padding slots
    carry index 0 and ``mask == False``; the clipped-gradient engine must make them
    contribute exactly zero (privacy invariant 2). Real examples come first, then
    padding. The step compiles at most ``len(bucket_sizes)`` times. A draw larger
    than the largest bucket is never truncated (truncation would change the
    sampling distribution and break the accounting): a new, larger bucket is added
    and a :class:`BucketOverflowWarning` says that one recompile follows.

Randomness
    The batch of step ``t`` is a pure function of ``(seed, t)``: it is drawn from
    ``np.random.default_rng([seed, t])``. The sampler's state is just
    ``(seed, step, bucket_sizes)`` and :meth:`state_dict` / :meth:`load_state_dict`
    resume the exact same stream. **The seed must stay secret**: anyone who knows
    it knows which examples were in which batch, and the amplification by sampling
    that the accountant credits is gone. ``seed=None`` (the default) draws a fresh
    seed from the operating system's entropy. The state dict contains the seed, so
    store checkpoints with the same care as the training data.

Provenance
    :meth:`Batch.take` (rows gathered from in-memory arrays) and
    :meth:`Batch.attach` (rows you read yourself from ``batch.indices``) return
    a :class:`SampledBatch`: the rows, their padding mask and a
    :class:`Provenance` stamp (sampling scheme, ``N``, ``q``, step, micro-batch
    index). :func:`dpjax.clipped_grad` reads the mask from it (padding can
    never be forgotten) and copies the stamp into the
    :class:`~dpjax.ClippedGradient`; :func:`dpjax.privatize` accepts the
    gradient only if the stamp matches its ledger: the same sampling scheme,
    ``N`` and ``q``, drawn for the very step the ledger is at, micro-batches of
    one draw in order (privacy invariant 7).

Example::

    sampler = PoissonSampler(60_000, expected_batch_size=256, seed=1234)
    for _ in range(num_steps):
        batch = sampler.sample().take({"x": train_x, "y": train_y})
        params, opt_state = train_step(params, opt_state, batch)   # static shapes
"""

from __future__ import annotations

import abc
import hashlib
import math
import numbers
import secrets
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np
from flax import struct

from dpjax import ledger as ledger_lib, validation
from dpjax.provenance import Provenance

__all__ = [
    "Batch",
    "BatchOrigin",
    "BucketOverflowWarning",
    "FixedSizeSampler",
    "PoissonSampler",
    "Provenance",
    "SampledBatch",
    "default_bucket_sizes",
]

PyTree = Any

# Default ladder: E[B] + k * sd(B) for these k, each rounded up to a multiple of
# _BUCKET_MULTIPLE and capped at N. With k up to 5 a draw above the top bucket has
# probability ~3e-7 per step (normal approximation), so after warm-up a run almost
# surely never recompiles. Half-sd steps where ~80% of the draws fall (-1 to +2 sd)
# halve the mean padding for large batches (E[B] = 1024: 1.6% -> 1.0%) at the cost
# of up to three more compiles; for small E[B] the rounding to 8 merges them.
_LADDER_SDS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
_BUCKET_MULTIPLE = 8
# New bucket for an overflowing draw: this much headroom over the draw.
_OVERFLOW_GROWTH = 1.25


class BucketOverflowWarning(UserWarning):
    """A Poisson draw exceeded the largest bucket; a new bucket (and one recompile
    of any jitted step that consumes the batch) follows. No example was dropped."""


def _round_up(x: float, multiple: int = _BUCKET_MULTIPLE) -> int:
    return int(multiple * math.ceil(x / multiple))


def default_bucket_sizes(num_examples: int, sampling_rate: float, *, multiple: int = _BUCKET_MULTIPLE,
                         cap: Optional[int] = None) -> tuple[int, ...]:
    """The default ladder of padded batch sizes for Poisson sampling.

    ``E[B] + k * sd(B)`` for ``k`` in ``(-1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 5)``, where ``E[B] = N q``
    and ``sd(B) = sqrt(N q (1 - q))``; each rounded up to a multiple of ``multiple``
    (8; at least ``multiple``), capped at ``cap`` (default ``N``), de-duplicated and sorted.

    >>> default_bucket_sizes(1797, 256 / 1797)
    (248, 256, 264, 272, 280, 288, 304, 336)
    >>> default_bucket_sizes(10, 0.5)
    (8, 10)
    """
    n = validation.check_positive_int("num_examples", num_examples)
    q = validation.check_rate("sampling_rate", sampling_rate)
    multiple = validation.check_positive_int("multiple", multiple)
    cap = n if cap is None else validation.check_positive_int("cap", cap)
    mean = n * q
    sd = math.sqrt(n * q * (1.0 - q))
    sizes = {min(cap, max(multiple, _round_up(mean + k * sd, multiple))) for k in _LADDER_SDS}
    return tuple(sorted(sizes))


def _check_bucket_sizes(bucket_sizes) -> tuple[int, ...]:
    if isinstance(bucket_sizes, (str, bytes)):
        raise ValueError(
            f"bucket_sizes must be a sequence of positive integers, got {bucket_sizes!r}"
        )
    try:
        items = list(bucket_sizes)
    except TypeError:
        raise ValueError(
            f"bucket_sizes must be a sequence of positive integers, got {bucket_sizes!r}"
        ) from None
    if not items:
        raise ValueError("bucket_sizes must hold at least one positive integer, got []")
    sizes = set()
    for i, b in enumerate(items):
        try:
            sizes.add(validation.check_positive_int(f"bucket_sizes[{i}]", b))
        except TypeError as e:  # bool, str, None, ...: still a bad value
            raise ValueError(str(e)) from None
    return tuple(sorted(sizes))


def _check_exact_int(name: str, value) -> int:
    """A non-negative integer, checked exactly (no round trip through float, which
    would corrupt 63-bit seeds)."""
    error = ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if isinstance(value, (bool, np.bool_)):
        raise error
    if isinstance(value, (numbers.Integral, np.integer)):
        as_int = int(value)
    elif isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        if abs(value) >= 2**53:  # no longer exact
            raise error
        as_int = int(value)
    else:
        raise error
    if as_int < 0:
        raise error
    return as_int


def _check_seed(seed) -> int:
    if seed is None:
        return secrets.randbits(63)
    return _check_exact_int("seed", seed)


@dataclass(frozen=True)
class BatchOrigin:
    """The sampler a :class:`Batch` came from, as the accountant sees it.

    Attributes:
      sampling: ``"poisson"`` or ``"fixed_size"``.
      num_examples: ``N``, the size of the data set the accountant analyses.
      sampling_rate: ``q``.
      num_rows: rows of the data that ``Batch.indices`` point into: ``N``, or
        one process's range for :class:`dpjax.parallel.ShardedPoissonSampler`.
      partitions, partition_id: a cyclic sampler's number of parts and the
        fingerprint of its partitioning (1 and 0 for the others).
    """

    sampling: str
    num_examples: int
    sampling_rate: float
    num_rows: int
    partitions: int = 1
    partition_id: int = 0


@struct.dataclass
class SampledBatch:
    """The rows of one sampled batch, with their padding mask and provenance.

    Made by :meth:`Batch.take` or :meth:`Batch.attach`; hand it to a
    :func:`dpjax.clipped_grad` function as the batch. ``data`` is what your loss
    function receives. To change the rows inside a step (augmentation, a
    reshape) keep the stamp: ``batch.replace(data=augment(batch.data))``.

    Attributes:
      data: the rows, a pytree of arrays with leading dimension ``bucket_size``.
      mask: ``(bucket_size,)`` bool, ``True`` for real examples, ``False`` for
        padding (which must contribute nothing; ``clipped_grad`` sees to it).
      provenance: the :class:`~dpjax.provenance.Provenance` stamp; ``None``
        for a batch you build yourself, which only
        ``privatize(trust_unverified_batches=True)`` accepts.
    """

    data: PyTree
    mask: jax.Array
    provenance: Optional[Provenance] = None


@dataclass(frozen=True, eq=False)
class Batch:
    """One step's sample (indices, not rows), padded to a static size.

    Attributes:
      indices: int32 array of shape ``(bucket_size,)``: the real examples' indices
        (sorted, unique) first, then padding slots holding index 0.
      mask: bool array of shape ``(bucket_size,)``; ``True`` marks a real example.
        Padding slots must contribute exactly zero downstream.
      size: the number of real examples (``mask.sum()``).
      step: the sampler step this batch was drawn for.
      origin: the sampler that drew it (:class:`BatchOrigin`); ``None`` for a
        batch built by hand, which :meth:`take` and :meth:`attach` refuse.
      micro_index, micro_count: this batch is micro-batch ``micro_index`` of
        ``micro_count`` of one draw (see :meth:`micro_batches`); 0 and 1 for a
        whole draw.

    Turn it into rows with :meth:`take` (arrays in memory) or :meth:`attach`
    (rows you read from ``indices`` yourself). The arrays are read-only.
    """

    indices: np.ndarray
    mask: np.ndarray
    size: int
    step: int
    origin: Optional[BatchOrigin] = None
    micro_index: int = 0
    micro_count: int = 1

    def __post_init__(self):
        indices = np.array(self.indices, dtype=np.int32, copy=True)
        mask = np.array(self.mask, dtype=bool, copy=True)
        if indices.ndim != 1 or mask.shape != indices.shape:
            raise ValueError(
                "Batch indices and mask must be 1-D arrays of the same length, got "
                f"shapes {indices.shape} and {mask.shape}"
            )
        size = int(self.size)
        if not 0 <= size <= indices.shape[0]:
            raise ValueError(f"Batch size must be in [0, {indices.shape[0]}], got {self.size!r}")
        if not (mask[:size].all() and not mask[size:].any()):
            raise ValueError(
                "Batch mask must be True for the first `size` slots and False after"
            )
        count, index = int(self.micro_count), int(self.micro_index)
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"Batch micro_index must be in [0, micro_count), got {index} of {count}")
        indices.setflags(write=False)
        mask.setflags(write=False)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "step", int(self.step))
        object.__setattr__(self, "micro_index", index)
        object.__setattr__(self, "micro_count", count)

    @classmethod
    def padded(cls, real: np.ndarray, bucket_size: int, step: int,
               origin: Optional[BatchOrigin] = None) -> "Batch":
        """The batch of sorted real indices ``real``, padded with masked index 0 to ``bucket_size``."""
        size = int(real.shape[0])
        indices = np.zeros(bucket_size, dtype=np.int32)
        indices[:size] = real
        mask = np.zeros(bucket_size, dtype=bool)
        mask[:size] = True
        return cls(indices=indices, mask=mask, size=size, step=step, origin=origin)

    @property
    def bucket_size(self) -> int:
        """The padded (static) length of this batch."""
        return int(self.indices.shape[0])

    def micro_batches(self, count: int) -> tuple:
        """This draw as ``count`` micro-batches of one shape, for gradient accumulation.

        Each micro-batch holds ``ceil(bucket_size / count)`` slots (the last ones
        padded with masked index 0 as needed) and is stamped as micro-batch
        ``i`` of ``count`` of this step, so ``privatize(accumulation_steps=count)``
        can check that the micro-batches it adds up form exactly one draw, in
        order. Feed all ``count`` of them, one ``tx.update`` each.

        >>> s = PoissonSampler(100, expected_batch_size=10, seed=0)
        >>> parts = s.sample().micro_batches(4)
        >>> [p.bucket_size for p in parts], [p.micro_index for p in parts]
        ([4, 4, 4, 4], [0, 1, 2, 3])
        """
        count = validation.check_positive_int("count", count)
        if self.micro_count != 1:
            raise ValueError("this batch is already a micro-batch; split the whole draw (sampler.sample())")
        per = -(-self.bucket_size // count)
        indices = np.zeros(per * count, np.int32)
        indices[: self.bucket_size] = self.indices
        mask = np.zeros(per * count, bool)
        mask[: self.bucket_size] = self.mask
        parts = []
        for i in range(count):
            m = mask[i * per:(i + 1) * per]
            parts.append(Batch(indices=indices[i * per:(i + 1) * per], mask=m, size=int(m.sum()),
                               step=self.step, origin=self.origin, micro_index=i, micro_count=count))
        return tuple(parts)

    def provenance(self) -> Provenance:
        """The stamp of this batch (see :class:`Provenance`)."""
        origin = self._origin("provenance")
        return Provenance(
            step=np.int32(self.step),
            micro_index=np.int32(self.micro_index),
            micro_count=np.int32(self.micro_count),
            sampling=np.int32(ledger_lib.SAMPLING_CODES[origin.sampling]),
            num_examples=np.int32(origin.num_examples),
            sampling_rate=ledger_lib.round_to_float32(origin.sampling_rate, +1.0),
            partitions=np.int32(origin.partitions),
            partition_id=np.int32(origin.partition_id),
        )

    def _origin(self, what: str) -> BatchOrigin:
        if self.origin is None:
            raise ValueError(
                f"Batch.{what}: this Batch was not drawn by a dpjax sampler, so nothing vouches for "
                "its sampling; draw batches with sampler.sample()"
            )
        return self.origin

    def take(self, data: Any) -> SampledBatch:
        """The rows of this batch from ``data``, with mask and provenance.

        ``data`` is a pytree of arrays indexed by example along axis 0, with
        exactly the sampler's number of rows (``N``; for a sharded sampler, this
        process's range). Numpy leaves give numpy arrays, JAX leaves give JAX
        arrays; every leaf of the result has leading dimension ``bucket_size``.
        Padding rows are copies of example 0, masked out by ``mask``.

        Raises ``ValueError`` when a leaf has another number of rows: a sampler
        built for another ``N`` would train on part of the data and account a
        wrong ``q``.
        """
        origin = self._origin("take")
        n = origin.num_rows

        def gather(path, leaf):
            arr = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
            if arr.ndim < 1 or arr.shape[0] != n:
                raise ValueError(
                    f"Batch.take: data leaf {jax.tree_util.keystr(path) or '(root)'} has shape "
                    f"{tuple(arr.shape)}, but the sampler draws from {n} rows; every leaf needs "
                    f"exactly {n} rows along axis 0. Build the sampler for this data "
                    "(e.g. PoissonSampler(len(x_train), ...)), or pass the data it was built for."
                )
            if isinstance(arr, jax.Array):
                return jax.numpy.take(arr, self.indices, axis=0, mode="clip")
            return arr[self.indices]

        rows = jax.tree_util.tree_map_with_path(gather, data)
        if not jax.tree_util.tree_leaves(rows):
            raise ValueError("Batch.take: data has no array leaves")
        return SampledBatch(data=rows, mask=self.mask, provenance=self.provenance())

    def attach(self, rows: Any, *, dataset_size: Optional[int] = None) -> SampledBatch:
        """Stamp rows you read yourself from ``self.indices`` (data on disk, a loader).

        ``rows`` must hold one row per slot of ``self.indices``, in that order,
        padding slots included (they ask for row 0, which is masked out):
        leading dimension ``bucket_size`` on every leaf. ``dataset_size``, if
        given (e.g. ``len(my_dataset)``), must equal the sampler's number of
        rows.

        >>> s = PoissonSampler(50, expected_batch_size=5, seed=0)
        >>> table = np.arange(50.0)[:, None]          # stands for rows on disk
        >>> b = s.sample()
        >>> batch = b.attach(table[b.indices], dataset_size=len(table))
        >>> batch.data.shape == (b.bucket_size, 1)
        True
        """
        origin = self._origin("attach")
        if dataset_size is not None and int(dataset_size) != origin.num_rows:
            raise ValueError(
                f"Batch.attach: dataset_size={dataset_size}, but the sampler draws from "
                f"{origin.num_rows} rows; build the sampler with num_examples=len(dataset)"
            )
        leaves = jax.tree_util.tree_leaves_with_path(rows)
        if not leaves:
            raise ValueError("Batch.attach: rows has no array leaves")
        for path, leaf in leaves:
            shape = np.shape(leaf)
            if len(shape) < 1 or shape[0] != self.bucket_size:
                raise ValueError(
                    f"Batch.attach: rows leaf {jax.tree_util.keystr(path) or '(root)'} has shape "
                    f"{tuple(shape)}; it needs one row per slot of batch.indices "
                    f"({self.bucket_size}, padding slots included)"
                )
        return SampledBatch(data=rows, mask=self.mask, provenance=self.provenance())

    def __eq__(self, other):
        if not isinstance(other, Batch):
            return NotImplemented
        return (
            self.size == other.size
            and self.step == other.step
            and (self.micro_index, self.micro_count) == (other.micro_index, other.micro_count)
            and self.origin == other.origin
            and np.array_equal(self.indices, other.indices)
            and np.array_equal(self.mask, other.mask)
        )

    __hash__ = None

    def __repr__(self):
        micro = f", micro_batch={self.micro_index}/{self.micro_count}" if self.micro_count > 1 else ""
        return (
            f"Batch(step={self.step}, size={self.size}, bucket_size={self.bucket_size}{micro})"
        )


def _rate_from(num_examples: int, expected_batch_size, sampling_rate) -> tuple[float, float]:
    """``(q, E[B])`` from exactly one of ``expected_batch_size`` or ``sampling_rate``."""
    n = num_examples
    if (expected_batch_size is None) == (sampling_rate is None):
        raise ValueError(
            "pass exactly one of expected_batch_size or sampling_rate, got "
            f"expected_batch_size={expected_batch_size!r}, sampling_rate={sampling_rate!r}"
        )
    if expected_batch_size is not None:
        e = validation.check_positive("expected_batch_size", expected_batch_size)
        if e > n:
            raise ValueError(
                f"expected_batch_size must be in (0, num_examples={n}], got {expected_batch_size!r}"
            )
        return e / n, e
    q = validation.check_rate("sampling_rate", sampling_rate)
    return q, n * q


class _Sampler(abc.ABC):
    """Shared drawing, padding, stamping, iteration and checkpointing of the samplers.

    A subclass sets ``sampling``, ``_sampling_rate`` and ``_bucket_sizes`` and
    implements :meth:`_draw` (or :meth:`_draw_at`). The hooks ``_num_rows``,
    ``_multiple``, ``_cap``, ``_extra_state`` and ``_loaded_buckets`` let
    :class:`dpjax.parallel.ShardedPoissonSampler` reuse all the rest.
    """

    sampling: str = ""
    state_kind: str = ""  # the "sampling" entry of state_dict(); defaults to `sampling`

    def __init__(self, num_examples: int, seed):
        self._num_examples = validation.check_positive_int("num_examples", num_examples)
        self._seed = _check_seed(seed)
        self._step = 0
        self._bucket_sizes: tuple[int, ...] = ()
        self._sampling_rate = 1.0
        self._multiple = _BUCKET_MULTIPLE

    # -- subclass hooks -----------------------------------------------------
    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        """The real indices of one step's batch (any order)."""
        raise NotImplementedError

    def _draw_at(self, step: int) -> tuple[np.ndarray, int]:
        """(sorted real indices of ``step``, the size its bucket must hold)."""
        real = np.sort(self._draw(np.random.default_rng([self._seed, step]))).astype(np.int32)
        return real, int(real.shape[0])

    @property
    def _num_rows(self) -> int:
        """Rows of the data that this sampler's indices point into."""
        return self._num_examples

    @property
    def _cap(self) -> int:
        """The largest bucket worth having."""
        return self._num_examples

    def _extra_state(self) -> dict:
        return {}

    def _loaded_buckets(self, state: dict) -> tuple[int, ...]:
        return _check_bucket_sizes(state["bucket_sizes"])

    # -- public API -----------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return self._num_examples

    @property
    def sampling_rate(self) -> float:
        return self._sampling_rate

    @property
    def bucket_sizes(self) -> tuple[int, ...]:
        return self._bucket_sizes

    @property
    def step(self) -> int:
        """The step the next call to :meth:`sample` draws."""
        return self._step

    @property
    def origin(self) -> BatchOrigin:
        """What every :class:`Batch` of this sampler is stamped with."""
        return BatchOrigin(self.sampling, self._num_examples, self._sampling_rate, self._num_rows,
                           self.partitions, self.partition_id)

    @property
    def partitions(self) -> int:
        """Parts the data set is cycled through (1: every step may use any example)."""
        return 1

    @property
    def partition_id(self) -> int:
        """A fingerprint of a cyclic sampler's partitioning (0 for the others)."""
        return 0

    def batch_at(self, step: int) -> Batch:
        """The batch of ``step``: a pure function of ``(seed, step)``.

        Does not advance :attr:`step`. (A Poisson draw above the largest bucket
        adds a bucket to the ladder; the real examples never depend on the
        ladder, only the amount of padding does.) :func:`dpjax.privatize` only
        accepts the batch of the step its ledger is at, so replaying a batch
        cannot be accounted twice.
        """
        step = _check_exact_int("step", step)
        real, need = self._draw_at(step)
        return Batch.padded(real, self._bucket_for(need, step), step, self.origin)

    def sample(self) -> Batch:
        """Draws the batch of the current step and advances to the next step."""
        batch = self.batch_at(self._step)
        self._step += 1
        return batch

    def sample_micro_batches(self, count: int) -> tuple:
        """One logical batch (the next step's draw) as ``count`` micro-batches of one shape.

        For gradient accumulation with ``privatize(accumulation_steps=count)``:
        the micro-batches of a single draw, noised once. (Drawing a fresh batch
        per micro-step would put an example in up to ``count`` batches of one
        noisy step, which the accountant does not analyse.) See
        :meth:`Batch.micro_batches`.
        """
        return self.sample().micro_batches(count)

    def __iter__(self) -> Iterator[Batch]:
        """Yields batches forever (``sample()`` repeatedly)."""
        while True:
            yield self.sample()

    def _bucket_for(self, size: int, step: int) -> int:
        buckets = self._bucket_sizes
        i = int(np.searchsorted(buckets, size, side="left"))
        if i < len(buckets):
            return buckets[i]
        new = max(size, min(self._cap, _round_up(_OVERFLOW_GROWTH * size, self._multiple)))
        self._bucket_sizes = tuple(sorted(set(buckets) | {new}))
        warnings.warn(
            f"{type(self).__name__}: the batch of step {step} needs {size} slots, more than the "
            f"largest bucket size {buckets[-1]}; added bucket size {new} (no example "
            "dropped). A jitted step will recompile once for the new shape.",
            BucketOverflowWarning,
            stacklevel=5,
        )
        return new

    def accounting_kwargs(self) -> dict:
        return dict(
            sampling=self.sampling,
            sampling_rate=self._sampling_rate,
            dataset_size=self._num_examples,
        )

    def state_dict(self) -> dict:
        """Plain-Python state. Contains the secret seed: keep checkpoints private."""
        return dict(
            sampling=self.state_kind or self.sampling,
            seed=int(self._seed),
            step=int(self._step),
            bucket_sizes=[int(b) for b in self._bucket_sizes],
            num_examples=int(self._num_examples),
            sampling_rate=float(self._sampling_rate),
            **self._extra_state(),
        )

    def load_state_dict(self, state: dict) -> None:
        """Restores seed, step and buckets so the stream continues exactly.

        Raises ``ValueError`` if the state was saved by a sampler of another kind or
        with another ``num_examples`` or ``sampling_rate`` (the accountant would
        then analyse the wrong mechanism).
        """
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"seed", "step", "bucket_sizes", "num_examples", "sampling_rate"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        mine = self.state_kind or self.sampling
        kind = state.get("sampling", mine)
        if kind != mine:
            raise ValueError(f"state was saved by a {kind!r} sampler, this sampler is {mine!r}")
        if int(state["num_examples"]) != self._num_examples:
            raise ValueError(
                f"state num_examples={state['num_examples']!r} does not match this "
                f"sampler's num_examples={self._num_examples}"
            )
        q = float(state["sampling_rate"])
        if not math.isclose(q, self._sampling_rate, rel_tol=1e-12, abs_tol=0.0):
            raise ValueError(
                f"state sampling_rate={state['sampling_rate']!r} does not match this "
                f"sampler's sampling_rate={self._sampling_rate!r}"
            )
        if state["seed"] is None:
            raise ValueError("state seed must be a non-negative integer, got None")
        seed = _check_seed(state["seed"])
        step = _check_exact_int("step", state["step"])
        buckets = self._loaded_buckets(state)
        self._seed, self._step, self._bucket_sizes = seed, step, buckets

    def __repr__(self):
        return (
            f"{type(self).__name__}(num_examples={self._num_examples}, "
            f"sampling_rate={self._sampling_rate!r}, bucket_sizes={self._bucket_sizes}, "
            f"step={self._step})"
        )


class PoissonSampler(_Sampler):
    """Poisson sampling: every example is in each step's batch independently with
    probability ``q``. This is the sampling the dpjax accountants assume.

    Args:
      num_examples: ``N``, the number of examples in the training set.
      expected_batch_size: ``E[B]``; then ``q = expected_batch_size / N``.
      sampling_rate: ``q`` in ``(0, 1]``. Pass exactly one of the two.
      seed: a non-negative integer; ``None`` draws one from OS entropy. Keep it
        secret (see the module docstring).
      bucket_sizes: padded batch sizes; default :func:`default_bucket_sizes`.

    Mechanism (exact): the batch size is drawn from ``Binomial(N, q)``, then a
    uniformly random subset of that size without replacement. This has the same
    distribution as including each example by an independent ``Bernoulli(q)``
    coin: for any subset ``S`` of size ``k``, ``P(S) = C(N, k) q^k (1-q)^(N-k) /
    C(N, k) = q^k (1-q)^(N-k)``. Batches at different steps are independent.

    Example::

        sampler = PoissonSampler(1797, expected_batch_size=256, seed=0)
        b = sampler.sample()          # b.size random, b.bucket_size static
        batch = b.take({"x": features, "y": labels})   # rows, mask and stamp
    """

    sampling = "poisson"

    def __init__(
        self,
        num_examples: int,
        *,
        expected_batch_size: float | None = None,
        sampling_rate: float | None = None,
        seed: int | None = None,
        bucket_sizes: Sequence[int] | None = None,
    ):
        super().__init__(num_examples, seed)
        n = self._num_examples
        self._sampling_rate, self._expected_batch_size = _rate_from(n, expected_batch_size, sampling_rate)
        if bucket_sizes is None:
            self._bucket_sizes = default_bucket_sizes(n, self._sampling_rate)
        else:
            self._bucket_sizes = _check_bucket_sizes(bucket_sizes)

    @property
    def expected_batch_size(self) -> float:
        """``E[B] = N q``: the public constant the noisy sum is divided by."""
        return float(self._expected_batch_size)

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        n = self._num_examples
        k = int(rng.binomial(n, self._sampling_rate))
        return rng.choice(n, size=k, replace=False, shuffle=False)


class FixedSizeSampler(_Sampler):
    """Fixed-size sampling without replacement: each step independently draws a
    uniformly random subset of exactly ``batch_size`` of the ``N`` examples.

    This is *not* an epoch shuffle: an example may appear in consecutive batches or
    in none for a while. The RDP accountant analyses it under the replace-one
    neighbouring relation, with sensitivity ``2C``, which costs more ε than
    :class:`PoissonSampler` at the same ``q = batch_size / N``. Poisson is the
    default and recommended sampler; use this one only when a fixed batch size is
    needed.

    ``bucket_sizes == (batch_size,)`` and every mask entry is ``True``.

    Example::

        sampler = FixedSizeSampler(60_000, batch_size=256, seed=0)
        batch = sampler.sample()      # batch.size == 256
    """

    sampling = "fixed_size"

    def __init__(self, num_examples: int, *, batch_size: int, seed: int | None = None):
        super().__init__(num_examples, seed)
        n = self._num_examples
        b = validation.check_positive_int("batch_size", batch_size)
        if b > n:
            raise ValueError(f"batch_size must be in [1, num_examples={n}], got {batch_size!r}")
        self._batch_size = b
        self._sampling_rate = b / n
        self._bucket_sizes = (b,)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def expected_batch_size(self) -> float:
        return float(self._batch_size)

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(self._num_examples, size=self._batch_size, replace=False, shuffle=False)

    def _bucket_for(self, size: int, step: int) -> int:
        return self._batch_size

    def accounting_kwargs(self) -> dict:
        return dict(super().accounting_kwargs(), batch_size=self._batch_size)

    def _extra_state(self) -> dict:
        return {"batch_size": self._batch_size}

    def _loaded_buckets(self, state: dict) -> tuple[int, ...]:
        buckets = _check_bucket_sizes(state["bucket_sizes"])
        if buckets != (self._batch_size,):
            raise ValueError(
                f"state bucket_sizes={list(buckets)} does not match batch_size={self._batch_size}"
            )
        return buckets


def _refuse_batch_as_pytree(batch: Batch):
    # A Batch holds indices, not rows: handing it to a jitted function (or any JAX
    # transformation) is a mistake; say which call was meant instead of JAX's
    # "not a valid JAX type".
    raise TypeError(
        f"{batch!r} holds indices, not rows: pass batch.take(data) (or batch.attach(rows) for rows "
        "you read yourself), a SampledBatch with the rows, their padding mask and provenance"
    )


jax.tree_util.register_pytree_node(Batch, _refuse_batch_as_pytree, lambda aux, children: None)


def _fingerprint(order: np.ndarray) -> int:
    """31 bits of a hash of a partitioning: tells two partitionings apart without
    revealing one (it is kept with the ledger, which also holds the noise key)."""
    digest = hashlib.blake2b(np.ascontiguousarray(order, np.int64).tobytes(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class CyclicPoissonSampler(_Sampler):
    """Cyclic Poisson sampling, the participation banded matrix factorisation assumes.

    The ``N`` examples are split by a secret random permutation into
    ``partitions`` parts of (nearly) equal size; step ``t`` Poisson-samples the
    part ``t mod partitions``, each of its examples independently with
    probability ``q``. An example can therefore only be in steps that are
    ``partitions`` apart (b-min-separated participation with b = ``partitions``),
    at most ``ceil(T / partitions)`` times in ``T`` steps.

    >>> s = CyclicPoissonSampler(100, partitions=4, expected_batch_size=5, seed=0)
    >>> s.sampling_rate, s.partitions
    (0.2, 4)
    >>> set(s.batch_at(0).indices[s.batch_at(0).mask].tolist()) <= set(s.partition(0).tolist())
    True
    """

    sampling = "cyclic_poisson"

    def __init__(self, num_examples: int, *, partitions: int, expected_batch_size: float | None = None,
                 sampling_rate: float | None = None, seed: int | None = None):
        super().__init__(num_examples, seed)
        n = self._num_examples
        self._partitions = validation.check_positive_int("partitions", partitions)
        if self._partitions > n:
            raise ValueError(f"partitions must be in [1, num_examples={n}], got {partitions!r}")
        if (expected_batch_size is None) == (sampling_rate is None):
            raise ValueError("pass exactly one of expected_batch_size or sampling_rate")
        if sampling_rate is None:  # q is relative to one part: E[B] = q * N / partitions
            e = validation.check_positive("expected_batch_size", expected_batch_size)
            if e > n / self._partitions:
                raise ValueError(f"expected_batch_size must be in (0, N / partitions = {n / self._partitions:g}], "
                                 f"got {expected_batch_size!r}")
            sampling_rate = e * self._partitions / n
        self._sampling_rate = validation.check_rate("sampling_rate", sampling_rate)
        self._expected_batch_size = self._sampling_rate * n / self._partitions
        self._order = self._partitioning()
        self._partition_id = _fingerprint(self._order)
        self._bucket_sizes = default_bucket_sizes(-(-n // self._partitions), self._sampling_rate)

    def _partitioning(self) -> np.ndarray:
        # A function of the secret seed only (a stream no step uses), so a restored sampler has the same parts.
        return np.random.default_rng([self._seed, 2**31 - 1]).permutation(self._num_examples)

    @property
    def partitions(self) -> int:
        return self._partitions

    @property
    def expected_batch_size(self) -> float:
        """``E[B] = q · N / partitions``, the public constant the noisy sum is divided by."""
        return float(self._expected_batch_size)

    def partition(self, index: int) -> np.ndarray:
        """The (secret) examples of part ``index``."""
        return np.sort(self._order[index % self._partitions::self._partitions])

    def _draw_at(self, step: int) -> tuple[np.ndarray, int]:
        part = self.partition(step)
        rng = np.random.default_rng([self._seed, step])
        real = np.sort(part[rng.random(len(part)) < self._sampling_rate]).astype(np.int32)
        return real, int(real.shape[0])

    def _extra_state(self) -> dict:
        return {"partitions": self._partitions}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(state, dict) and int(state.get("partitions", -1)) != self._partitions:
            raise ValueError(f"state partitions={state.get('partitions')!r} does not match this sampler's "
                             f"partitions={self._partitions}")
        super().load_state_dict(state)
        self._order = self._partitioning()
        self._partition_id = _fingerprint(self._order)

    @property
    def partition_id(self) -> int:
        return self._partition_id

    def max_participations(self, steps: int) -> int:
        """The most steps of ``steps`` that any one example can be in."""
        return -(-int(steps) // self._partitions)
