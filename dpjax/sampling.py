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

Example::

    sampler = PoissonSampler(60_000, expected_batch_size=256, seed=1234)
    for _ in range(num_steps):
        batch = sampler.sample()
        x, y = batch.take((train_x, train_y))   # shapes (bucket, ...), static
        state = train_step(state, x, y, batch.mask)
    accountant_kwargs = sampler.accounting_kwargs()
"""

from __future__ import annotations

import abc
import math
import numbers
import secrets
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from dpjax import validation

__all__ = [
    "Batch",
    "BucketOverflowWarning",
    "FixedSizeSampler",
    "PoissonSampler",
    "default_bucket_sizes",
]

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


def default_bucket_sizes(num_examples: int, sampling_rate: float) -> tuple[int, ...]:
    """The default ladder of padded batch sizes for Poisson sampling.

    ``E[B] + k * sd(B)`` for ``k`` in ``(-1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 5)``, where ``E[B] = N q``
    and ``sd(B) = sqrt(N q (1 - q))``; each rounded up to a multiple of 8 (at least
    8), capped at ``N``, de-duplicated and sorted.

    >>> default_bucket_sizes(1797, 256 / 1797)
    (248, 256, 264, 272, 280, 288, 304, 336)
    >>> default_bucket_sizes(10, 0.5)
    (8, 10)
    """
    n = validation.check_positive_int("num_examples", num_examples)
    q = validation.check_rate("sampling_rate", sampling_rate)
    mean = n * q
    sd = math.sqrt(n * q * (1.0 - q))
    sizes = {min(n, max(_BUCKET_MULTIPLE, _round_up(mean + k * sd))) for k in _LADDER_SDS}
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


@dataclass(frozen=True, eq=False)
class Batch:
    """One step's sample, padded to a static size.

    Attributes:
      indices: int32 array of shape ``(bucket_size,)``: the real examples' indices
        (sorted, unique) first, then padding slots holding index 0.
      mask: bool array of shape ``(bucket_size,)``; ``True`` marks a real example.
        Padding slots must contribute exactly zero downstream.
      size: the number of real examples (``mask.sum()``).
      step: the sampler step this batch was drawn for.

    The arrays are read-only.
    """

    indices: np.ndarray
    mask: np.ndarray
    size: int
    step: int

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
        indices.setflags(write=False)
        mask.setflags(write=False)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "step", int(self.step))

    @classmethod
    def padded(cls, real: np.ndarray, bucket_size: int, step: int) -> "Batch":
        """The batch of sorted real indices ``real``, padded with masked index 0 to ``bucket_size``."""
        size = int(real.shape[0])
        indices = np.zeros(bucket_size, dtype=np.int32)
        indices[:size] = real
        mask = np.zeros(bucket_size, dtype=bool)
        mask[:size] = True
        return cls(indices=indices, mask=mask, size=size, step=step)

    @property
    def bucket_size(self) -> int:
        """The padded (static) length of this batch."""
        return int(self.indices.shape[0])

    def take(self, data: Any) -> Any:
        """Gathers ``data`` (a pytree of arrays indexed by example along axis 0).

        Numpy leaves give numpy arrays, JAX leaves give JAX arrays; every result has
        leading dimension ``bucket_size``. Padding rows are copies of example 0 and
        must be masked out with :attr:`mask`.
        """
        max_index = int(self.indices.max()) if self.indices.size else 0

        def gather(leaf):
            if isinstance(leaf, jax.Array):
                arr = leaf
            else:
                arr = np.asarray(leaf)
            if arr.ndim < 1 or arr.shape[0] <= max_index:
                # JAX would silently clamp an out-of-range index; refuse instead.
                raise ValueError(
                    "Batch.take: every leaf of data must have a leading (example) axis "
                    f"longer than the largest index {max_index}, got a leaf of shape "
                    f"{tuple(arr.shape)}"
                )
            if isinstance(arr, jax.Array):
                return jax.numpy.take(arr, self.indices, axis=0, mode="clip")
            return arr[self.indices]

        return jax.tree_util.tree_map(gather, data)

    def __eq__(self, other):
        if not isinstance(other, Batch):
            return NotImplemented
        return (
            self.size == other.size
            and self.step == other.step
            and np.array_equal(self.indices, other.indices)
            and np.array_equal(self.mask, other.mask)
        )

    __hash__ = None

    def __repr__(self):
        return (
            f"Batch(step={self.step}, size={self.size}, bucket_size={self.bucket_size})"
        )


class _Sampler(abc.ABC):
    """Shared state, iteration and checkpointing for the samplers."""

    sampling: str = ""

    def __init__(self, num_examples: int, seed):
        self._num_examples = validation.check_positive_int("num_examples", num_examples)
        self._seed = _check_seed(seed)
        self._step = 0
        self._bucket_sizes: tuple[int, ...] = ()
        self._sampling_rate = 1.0

    # -- subclass hooks -----------------------------------------------------
    @abc.abstractmethod
    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        """The sorted real indices of one step's batch."""

    @abc.abstractmethod
    def _bucket_for(self, size: int, step: int) -> int:
        """The padded length for a draw of ``size`` real examples."""

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

    def batch_at(self, step: int) -> Batch:
        """The batch of ``step``: a pure function of ``(seed, step)``.

        Does not advance :attr:`step`. (For Poisson sampling, a draw above the
        largest bucket adds a bucket to the ladder; the real examples never depend
        on the ladder, only the amount of padding does.)
        """
        step = _check_exact_int("step", step)
        rng = np.random.default_rng([self._seed, step])
        real = np.sort(self._draw(rng)).astype(np.int32)
        return Batch.padded(real, self._bucket_for(int(real.shape[0]), step), step)

    def sample(self) -> Batch:
        """Draws the batch of the current step and advances to the next step."""
        batch = self.batch_at(self._step)
        self._step += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        """Yields batches forever (``sample()`` repeatedly)."""
        while True:
            yield self.sample()

    def accounting_kwargs(self) -> dict:
        return dict(
            sampling=self.sampling,
            sampling_rate=self._sampling_rate,
            dataset_size=self._num_examples,
        )

    def state_dict(self) -> dict:
        """Plain-Python state. Contains the secret seed: keep checkpoints private."""
        return dict(
            sampling=self.sampling,
            seed=int(self._seed),
            step=int(self._step),
            bucket_sizes=[int(b) for b in self._bucket_sizes],
            num_examples=int(self._num_examples),
            sampling_rate=float(self._sampling_rate),
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
        kind = state.get("sampling", self.sampling)
        if kind != self.sampling:
            raise ValueError(
                f"state was saved by a {kind!r} sampler, this sampler is {self.sampling!r}"
            )
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
        buckets = _check_bucket_sizes(state["bucket_sizes"])
        self._check_loaded_buckets(buckets)
        self._seed, self._step, self._bucket_sizes = seed, step, buckets

    def _check_loaded_buckets(self, buckets: tuple[int, ...]) -> None:
        pass

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
        batch = sampler.sample()      # batch.size random, batch.bucket_size static
        x = batch.take(features)      # (batch.bucket_size, ...)
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
        if (expected_batch_size is None) == (sampling_rate is None):
            raise ValueError(
                "pass exactly one of expected_batch_size or sampling_rate, got "
                f"expected_batch_size={expected_batch_size!r}, sampling_rate={sampling_rate!r}"
            )
        if expected_batch_size is not None:
            e = validation.check_positive("expected_batch_size", expected_batch_size)
            if e > n:
                raise ValueError(
                    f"expected_batch_size must be in (0, num_examples={n}], got "
                    f"{expected_batch_size!r}"
                )
            self._sampling_rate = e / n
            self._expected_batch_size = e
        else:
            self._sampling_rate = validation.check_rate("sampling_rate", sampling_rate)
            self._expected_batch_size = n * self._sampling_rate
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

    def _bucket_for(self, size: int, step: int) -> int:
        buckets = self._bucket_sizes
        i = int(np.searchsorted(buckets, size, side="left"))
        if i < len(buckets):
            return buckets[i]
        new = max(size, min(self._num_examples, _round_up(_OVERFLOW_GROWTH * size)))
        self._bucket_sizes = tuple(sorted(set(buckets) | {new}))
        warnings.warn(
            f"PoissonSampler: the batch of step {step} has {size} examples, more than the "
            f"largest bucket size {buckets[-1]}; added bucket size {new} (no example "
            "dropped). A jitted step will recompile once for the new shape.",
            BucketOverflowWarning,
            stacklevel=4,
        )
        return new


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

    def state_dict(self) -> dict:
        return dict(super().state_dict(), batch_size=self._batch_size)

    def _check_loaded_buckets(self, buckets: tuple[int, ...]) -> None:
        if buckets != (self._batch_size,):
            raise ValueError(
                f"state bucket_sizes={list(buckets)} does not match batch_size={self._batch_size}"
            )
