"""Data-parallel and multi-host DP training on JAX's own sharding.

One logical batch is spread over the devices of a one-axis
:class:`jax.sharding.Mesh` (all local devices, or every device of every process
after :func:`jax.distributed.initialize`). Nothing about the privacy mechanism
changes: the same :func:`dpjax.clipped_grad` clips, the same
:func:`dpjax.privatize` adds noise, and its ledger counts one step per logical
batch.

How a step is laid out (:func:`make_step`)::

    batch   P("data")  --shard_map-->  each device: grad_fn on its own examples
                                        (clip + sum, microbatched if asked)
                                        psum over "data"  ->  global clipped sum
    params, opt_state   P()  (replicated, noise key included)
    tx.update(global sum)   outside shard_map, on replicated values: every
                            device draws the *same* noise from the same key
                            and adds it to the *same* global sum

Why noise is added exactly once (privacy invariants 3 and 4)
    The clipped sums are reduced *before* noise exists: the only cross-device
    operation in the clipping part is the ``psum`` at the end of the
    ``shard_map``, and :func:`dpjax.privatize` runs after it, outside the
    ``shard_map``, on replicated operands. Its noise comes from
    ``fold_in(key, ledger.steps)`` where ``key`` and ``steps`` live in the
    replicated optimizer state, so every device computes bit-identical noise
    and adds it to a bit-identical global sum: the released update is
    ``(sum_i clip(g_i) + N(0, σ²C²)) / E[B]`` once, not once per device (which
    would be D times the noise variance), and never a per-device noise
    divided down (1/D). ``jit`` partitioning preserves the semantics of the
    program, so the result equals the single-device step up to float
    summation order. ``tests/test_parallel.py`` checks this three ways: the
    step's jaxpr draws random bits only outside the ``shard_map`` (one draw
    per parameter leaf), the variance of the update with zero clipped sums is
    ``σ²C²/E[B]²``, and the 4-device step equals the 1-device step.

    Do not call ``tx.update`` inside your own ``shard_map`` or ``pmap``: that
    would add one noise draw per device.

Padding
    Every device must hold the same number of rows, so a batch is padded to a
    multiple of the local device count with masked rows (``mask == False``),
    which contribute exactly zero (privacy invariant 2). :func:`pad_batch` does
    it; :class:`ShardedPoissonSampler` emits buckets that are already multiples.

Multi-host
    Each process calls the same code (SPMD). Per step, each process feeds its
    *own* examples: :func:`shard_batch` turns the process-local rows into one
    global array (``jax.make_array_from_process_local_data``), laid out process
    by process. :class:`ShardedPoissonSampler` draws those rows so that the
    global batch is exactly a Poisson sample of the whole data set (see its
    docstring), and every process picks the same padded size without talking
    to the others. Parameters and optimizer state are replicated; checkpoints
    go through orbax, which writes replicated arrays and the JSON metadata
    once (from the primary process) and restores them on every process.

Example (one host, every local device)::

    mesh = dpjax.parallel.data_mesh()
    grad_fn = dpjax.clipped_grad(loss_fn, l2_clip_norm=1.0)
    sampler = dpjax.parallel.ShardedPoissonSampler.for_mesh(60_000, mesh, expected_batch_size=256, seed=s)
    tx = dpjax.privatize(optax.adam(1e-3), noise_multiplier=1.1, l2_clip_norm=1.0, sampler=sampler)
    params = dpjax.parallel.replicate(params, mesh)
    opt_state = dpjax.parallel.replicate(tx.init(params), mesh)
    step = dpjax.parallel.make_step(grad_fn, tx, mesh)
    local = sampler.local_slice(data)            # this process's rows of the data
    for _ in range(num_steps):
        batch = dpjax.parallel.shard_batch(sampler.sample().take(local), mesh)
        params, opt_state, metrics = step(params, opt_state, batch)
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpjax import validation
from dpjax.clipping import ClippedGradient
from dpjax.sampling import (
    _BUCKET_MULTIPLE,
    SampledBatch,
    _check_bucket_sizes,
    _check_exact_int,
    _rate_from,
    _round_up,
    _Sampler,
    default_bucket_sizes,
)

__all__ = [
    "DATA_AXIS",
    "ShardedPoissonSampler",
    "data_mesh",
    "initialize_distributed",
    "local_device_count",
    "make_step",
    "pad_batch",
    "replicate",
    "shard_batch",
    "sharded_clipped_grad",
]

PyTree = Any
DATA_AXIS = "data"


# --------------------------------------------------------------------------- mesh


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, **kwargs) -> None:
    """``jax.distributed.initialize`` with CPU collectives (gloo) switched on.

    Call it first thing, before any other JAX call, in every process. On GPU/TPU
    hosts the CPU-collectives setting is harmless. Extra keyword arguments go to
    ``jax.distributed.initialize`` (e.g. ``initialization_timeout``).
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs
    )


def data_mesh(devices: Optional[Sequence[jax.Device]] = None, axis: str = DATA_AXIS) -> Mesh:
    """A one-axis mesh over ``devices`` (default: every device of every process).

    The devices are ordered by process, so each process's devices form one
    contiguous block of the batch axis (what :func:`shard_batch` assumes).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices, dtype=object), (axis,))


def _axis(mesh: Mesh, axis: Optional[str]) -> str:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(
                f"mesh has axes {mesh.axis_names}; pass axis=... to say which one the batch is split over "
                "(dpjax data parallelism uses a one-axis mesh, see data_mesh())"
            )
        return mesh.axis_names[0]
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {mesh.axis_names}")
    return axis


def local_device_count(mesh: Mesh) -> int:
    """Devices of ``mesh`` that belong to this process: a local batch must be a multiple of it."""
    me = jax.process_index()
    return sum(1 for d in mesh.devices.flat if d.process_index == me)


def broadcast_seeds(seeds: Dict[str, int]) -> Dict[str, int]:
    """Process 0's values of a dict of non-negative ints (< 2**64), on every process.

    A run with ``seed=None`` draws its seeds from each process's OS entropy;
    replicas must agree on initialisation, sampling and noise, so process 0's
    draw is used everywhere. A no-op with one process. (The seeds travel over
    the cluster's own coordination channel, like the data.)
    """
    if jax.process_count() == 1:
        return dict(seeds)
    from jax.experimental import multihost_utils

    keys = sorted(seeds)
    words = np.array([[(int(seeds[k]) >> 32) & 0xFFFFFFFF, int(seeds[k]) & 0xFFFFFFFF] for k in keys], np.uint32)
    words = np.asarray(multihost_utils.broadcast_one_to_all(words))
    return {k: (int(hi) << 32) | int(lo) for k, (hi, lo) in zip(keys, words)}


# ------------------------------------------------------------------ placing data


def pad_batch(batch: PyTree, mask, multiple: int):
    """Pad ``batch`` (and its mask) with masked rows to a multiple of ``multiple`` rows.

    Padding rows are copies of row 0 (always a valid model input) with
    ``mask == False``, so they contribute exactly zero. ``mask=None`` means every
    given row is real. Returns ``(batch, mask)`` as numpy arrays.

    >>> b, m = pad_batch({"x": np.ones((5, 2))}, None, 4)
    >>> b["x"].shape, m.tolist()
    ((8, 2), [True, True, True, True, True, False, False, False])
    """
    multiple = validation.check_positive_int("multiple", multiple)
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("batch has no array leaves")
    n = int(np.shape(leaves[0])[0])
    mask = np.ones((n,), bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape ({n},), got {mask.shape}")
    pad = -n % multiple
    if pad == 0:
        return jax.tree_util.tree_map(np.asarray, batch), mask
    if n == 0:
        raise ValueError("cannot pad an empty batch (no row to copy); draw at least one slot")

    def grow(x):
        x = np.asarray(x)
        return np.concatenate([x, np.repeat(x[:1], pad, axis=0)])

    return jax.tree_util.tree_map(grow, batch), np.concatenate([mask, np.zeros((pad,), bool)])


def shard_batch(batch: PyTree, mesh: Mesh, *, axis: Optional[str] = None) -> PyTree:
    """Place this process's rows of a batch on the mesh, split along ``axis``.

    ``batch`` is a :class:`~dpjax.SampledBatch` (``sampler.sample().take(local)``:
    its rows and mask are split over the devices, its provenance stamp, the same
    on every process, is replicated), or any pytree of arrays with a common
    leading (example) axis, e.g. ``(examples, mask)``. In a single process it is
    the whole batch; with several processes it is this process's part, and the
    global array is the processes' parts in process order. The leading
    dimension must be a multiple of :func:`local_device_count` (see
    :func:`pad_batch`) and the same in every process.
    """
    axis = _axis(mesh, axis)
    sharding = NamedSharding(mesh, P(axis))
    d = local_device_count(mesh)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim < 1:
            raise ValueError("every batch leaf needs a leading (example) axis")
        if x.shape[0] % d:
            raise ValueError(
                f"this process's batch has {x.shape[0]} rows, not a multiple of its {d} devices on the "
                "mesh; pad it with masked rows (dpjax.parallel.pad_batch) or use ShardedPoissonSampler"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    if isinstance(batch, SampledBatch):
        stamp = None if batch.provenance is None else replicate(batch.provenance, mesh)
        return SampledBatch(data=jax.tree_util.tree_map(put, batch.data), mask=put(batch.mask), provenance=stamp)
    return jax.tree_util.tree_map(put, batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """A copy of ``tree`` on every device of ``mesh`` (sharding ``P()``).

    With several processes every process must pass the same values (same seed,
    same checkpoint): the arrays are assembled from each process's copy.
    """
    sharding = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree)


# ------------------------------------------------------------------- the step


def sharded_clipped_grad(grad_fn: Callable[..., ClippedGradient], mesh: Mesh, *, axis: Optional[str] = None):
    """Run ``grad_fn`` on each device's rows and add the clipped sums across devices.

    ``grad_fn`` is a :func:`dpjax.clipped_grad` function. The returned function
    has the same signature, ``(params, batch, *args, mask=...) ->
    ClippedGradient``, takes a batch (a :class:`~dpjax.SampledBatch` from
    :func:`shard_batch`, whose stamp is passed on) sharded along ``axis`` and replicated
    ``params``/``args``, and returns the *global* clipped sum, replicated (one
    ``psum``), with the same sensitivity: each example lives on exactly one
    device. Use it inside ``jax.jit``; pass the result to ``tx.update``
    *outside* any ``shard_map`` so that noise is added once.
    ``per_example_loss``/``per_example_norm`` (if requested) stay sharded.
    """
    axis = _axis(mesh, axis)

    def wrapped(params, batch, *args, mask=None):
        stamp = None
        if isinstance(batch, SampledBatch):
            if mask is not None:
                raise ValueError("the batch is a dpjax.SampledBatch, which carries its own padding mask; drop mask=")
            batch, mask, stamp = batch.data, batch.mask, batch.provenance
        if mask is None:
            mask = jnp.ones((jax.tree_util.tree_leaves(batch)[0].shape[0],), bool)
        meta = {}

        def local(params, batch, mask, args):
            g = grad_fn(params, batch, *args, mask=mask)
            if not isinstance(g, ClippedGradient):
                raise TypeError(
                    "sharded_clipped_grad needs grad_fn = dpjax.clipped_grad(...); it returned "
                    f"{type(g).__name__}, which carries no clipping guarantee"
                )
            meta["sensitivity"] = g.sensitivity
            total = jax.lax.psum((g.sum, g.num_examples, g.num_nonfinite), axis)
            return total, (g.per_example_loss, g.per_example_norm)

        # check_vma=False: per-example gradients are taken *inside* the body with
        # respect to the replicated params; with varying-manual-axes checking on,
        # JAX would insert an implicit psum into those gradients' transpose.
        fn = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(axis), P(axis), P()),
            out_specs=(P(), P(axis)),
            check_vma=False,
        )
        (total, n, bad), (losses, norms) = fn(params, batch, mask, args)
        return ClippedGradient(
            sensitivity=meta["sensitivity"], sum=total, num_examples=n, num_nonfinite=bad,
            per_example_loss=losses, per_example_norm=norms, provenance=stamp,
        )

    return wrapped


def make_step(
    grad_fn: Callable[..., ClippedGradient],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis: Optional[str] = None,
    donate: bool = False,
):
    """A jitted data-parallel DP step: clip on every device, add up, noise once, update.

    Args:
      grad_fn: from :func:`dpjax.clipped_grad` (any ``method``, with or without
        ``microbatch_size``: each device microbatches its own rows).
      tx: from :func:`dpjax.privatize` (or ``dp_sgd``/``dp_adam``).
      mesh: a mesh with one axis (:func:`data_mesh`), or pass ``axis``.
      donate: donate ``params`` and ``opt_state`` buffers to the step.

    Returns:
      ``step(params, opt_state, batch, *args) -> (params, opt_state, metrics)``.
      ``batch`` is a :class:`~dpjax.SampledBatch` placed by :func:`shard_batch`
      (rows and mask sharded, provenance replicated); ``params``/``opt_state``/
      ``args`` replicated (:func:`replicate`); outputs replicated. ``metrics``
      has ``num_examples``, ``num_nonfinite`` and, when ``grad_fn`` returns
      per-example losses, ``loss`` (their masked mean): diagnostics of the
      training data, **not private**.
    """
    axis = _axis(mesh, axis)
    sharded_grad = sharded_clipped_grad(grad_fn, mesh, axis=axis)
    rep = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(axis))

    def step(params, opt_state, batch, *args):
        if not isinstance(batch, SampledBatch):
            raise TypeError(
                "the data-parallel step takes a dpjax.SampledBatch: "
                "parallel.shard_batch(sampler.sample().take(sampler.local_slice(data)), mesh)"
            )
        g = sharded_grad(params, batch, *args)
        # Outside the shard_map: replicated sum, replicated key -> one noise draw.
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"num_examples": g.num_examples, "num_nonfinite": g.num_nonfinite}
        if g.per_example_loss is not None:
            metrics["loss"] = jnp.sum(jnp.where(batch.mask, g.per_example_loss, 0.0)) / jnp.maximum(g.num_examples, 1)
        return params, opt_state, metrics

    cache: Dict[tuple, Callable] = {}

    def _compiled(batch, nargs):
        stamped = isinstance(batch, SampledBatch) and batch.provenance is not None
        if (stamped, nargs) not in cache:
            batch_sharding = (SampledBatch(data=data, mask=data, provenance=rep if stamped else None)
                              if isinstance(batch, SampledBatch) else data)
            cache[stamped, nargs] = jax.jit(
                step,
                in_shardings=(rep, rep, batch_sharding) + (rep,) * nargs,
                out_shardings=rep,
                donate_argnums=(0, 1) if donate else (),
            )
        return cache[stamped, nargs]

    def jitted(params, opt_state, batch, *args):
        return _compiled(batch, len(args))(params, opt_state, batch, *args)

    jitted.lower = lambda *a: _compiled(a[2], len(a) - 3).lower(*a)
    jitted.step_fn = step  # the un-jitted step, for inspection (e.g. jax.make_jaxpr)
    return jitted


# ------------------------------------------------------------------- sampling


class ShardedPoissonSampler(_Sampler):
    """Poisson sampling of the whole data set, drawn shard by shard, one shard per process.

    The ``N`` examples are split into ``process_count`` contiguous, disjoint
    index ranges (process ``p`` owns ``[p·N//P, (p+1)·N//P)``). At each step,
    process ``p`` draws its part of the batch from its own range only:
    ``k_p ~ Binomial(n_p, q)`` examples, then a uniformly random subset of that
    size. Every process uses the same rate ``q``.

    Why this is exactly Poisson sampling of the whole data set
        Within a range, (Binomial size, then uniform subset of that size) gives
        every subset ``S`` probability ``q^|S| (1-q)^(n_p-|S|)``: each example
        of the range is in independently with probability ``q`` (the argument
        of :class:`dpjax.PoissonSampler`). The sizes ``k_p`` are independent
        draws and each range's subset comes from its own random stream, so the
        ranges are independent of each other. The ranges partition the data
        set, hence all ``N`` examples are included independently with
        probability ``q``: the union is a Poisson sample of the whole data set
        with rate ``q``, which is what the accountant analyses for one global
        step (``privatize(..., sampler=this)`` records ``q`` and ``N``).

    Same padded size everywhere, without communication
        All processes share the seed. The sizes of *all* ranges come from a
        stream that depends only on ``(seed, step)``, so every process knows
        every ``k_p`` and pads its part to the same bucket: the smallest size
        in a ladder (a pure function of ``N``, ``q``, ``P`` and the device
        count) that holds ``max_p k_p``. A draw above the largest bucket adds
        the same new bucket on every process (with a
        :class:`~dpjax.sampling.BucketOverflowWarning`; no example is ever
        dropped). Buckets are multiples of ``devices_per_process`` so that each
        local device gets the same number of rows. The subset of range ``p``
        comes from a stream of ``(seed, step, p)``, known only to whoever
        holds the seed.

    Everything else (padding, provenance stamps, micro-batches, iteration,
    ``state_dict``) is :class:`dpjax.PoissonSampler`'s. The stamps carry the
    global ``N`` and the step, identical on every process.

    Args:
      num_examples: ``N``, the size of the *whole* data set.
      process_index, process_count: this process and the number of processes
        (``jax.process_index()``, ``jax.process_count()``).
      expected_batch_size: global ``E[B] = N q`` (or ``sampling_rate=q``).
      seed: the same non-negative integer in every process (secret: it
        determines the batches). ``None`` is refused when ``process_count > 1``
        (the processes would disagree); broadcast one first.
      devices_per_process: local devices on the mesh; buckets are multiples
        of it (and of 8).
      bucket_sizes: optional explicit ladder (each a multiple of
        ``devices_per_process``).

    The batches are :class:`~dpjax.sampling.Batch` objects whose ``indices``
    are **local**: positions in this process's range, ``0 .. n_p - 1``
    (padding slots hold 0). Gather with ``batch.take(sampler.local_slice(data))``.
    """

    sampling = "poisson"
    state_kind = "sharded_poisson"

    def __init__(
        self,
        num_examples: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        expected_batch_size: Optional[float] = None,
        sampling_rate: Optional[float] = None,
        seed: Optional[int] = None,
        devices_per_process: int = 1,
        bucket_sizes: Optional[Sequence[int]] = None,
    ):
        n = validation.check_positive_int("num_examples", num_examples)
        pc = validation.check_positive_int("process_count", process_count)
        pi = _check_exact_int("process_index", process_index)
        if pi >= pc:
            raise ValueError(f"process_index must be in [0, process_count={pc}), got {process_index!r}")
        if pc > n:
            raise ValueError(f"process_count ({pc}) must be <= num_examples ({n}): every process needs examples")
        if seed is None and pc > 1:
            raise ValueError(
                "ShardedPoissonSampler with several processes needs the same explicit seed in every "
                "process (seed=None would draw a different one in each); draw one on process 0 and "
                "broadcast it (jax.experimental.multihost_utils.broadcast_one_to_all)"
            )
        super().__init__(n, seed)
        self._sampling_rate, self._expected_batch_size = _rate_from(n, expected_batch_size, sampling_rate)
        self._process_index, self._process_count = pi, pc
        self._devices = validation.check_positive_int("devices_per_process", devices_per_process)
        self._multiple = math.lcm(_BUCKET_MULTIPLE, self._devices)
        self._bounds = np.array([p * n // pc for p in range(pc + 1)], dtype=np.int64)
        self._shard_sizes = np.diff(self._bounds)
        self._bucket_sizes = self._default_buckets() if bucket_sizes is None else self._checked(bucket_sizes)

    @classmethod
    def for_mesh(cls, num_examples: int, mesh: Mesh, **kwargs) -> "ShardedPoissonSampler":
        """The sampler of this process for ``mesh`` (process index/count and device count filled in)."""
        per_process: Dict[int, int] = {}
        for d in mesh.devices.flat:
            per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
        if len(set(per_process.values())) != 1:
            raise ValueError(
                f"every process needs the same number of devices on the mesh, got {per_process} "
                "(process: devices); the common padded batch is split evenly over each process's devices"
            )
        processes = sorted(per_process)
        if jax.process_index() not in per_process:
            raise ValueError(f"this process ({jax.process_index()}) has no device on the mesh")
        return cls(
            num_examples,
            process_index=processes.index(jax.process_index()),
            process_count=len(processes),
            devices_per_process=per_process[jax.process_index()],
            **kwargs,
        )

    # -- the hooks of the shared sampler ---------------------------------------------
    @property
    def _num_rows(self) -> int:
        return int(self._shard_sizes[self._process_index])

    @property
    def _cap(self) -> int:
        return _round_up(int(self._shard_sizes.max()), self._multiple)

    def _default_buckets(self) -> tuple:
        # E[k] + k·sd over the largest range; P(max_p k_p > top) stays tiny for few processes.
        return default_bucket_sizes(int(self._shard_sizes.max()), self._sampling_rate,
                                    multiple=self._multiple, cap=self._cap)

    def _checked(self, bucket_sizes) -> tuple:
        sizes = _check_bucket_sizes(bucket_sizes)
        bad = [b for b in sizes if b % self._devices]
        if bad:
            raise ValueError(f"bucket_sizes {bad} are not multiples of devices_per_process={self._devices}")
        return sizes

    def _rng(self, step: int, stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self._seed, spawn_key=(step, stream)))

    def _draw_at(self, step: int) -> tuple:
        sizes = self.shard_sizes_at(step)
        p = self._process_index
        k = int(sizes[p])
        real = np.sort(self._rng(step, 1 + p).choice(int(self._shard_sizes[p]), size=k, replace=False, shuffle=False))
        return real.astype(np.int32), int(sizes.max())

    def _extra_state(self) -> dict:
        return {"process_count": int(self._process_count), "devices_per_process": int(self._devices)}

    def _loaded_buckets(self, state: dict) -> tuple:
        # With another process or device count the saved ladder is replaced by this
        # layout's default (the sampling stays Poisson with the same q).
        if "process_count" not in state:
            raise ValueError("state is missing keys ['process_count']")
        same_layout = (int(state["process_count"]) == self._process_count
                       and int(state.get("devices_per_process", self._devices)) == self._devices)
        return self._checked(state["bucket_sizes"]) if same_layout else self._default_buckets()

    # -- properties ----------------------------------------------------------------
    @property
    def expected_batch_size(self) -> float:
        """Global ``E[B] = N q``: the public constant the noisy sum is divided by."""
        return float(self._expected_batch_size)

    @property
    def process_index(self) -> int:
        return self._process_index

    @property
    def process_count(self) -> int:
        return self._process_count

    @property
    def shard_range(self) -> tuple:
        """``(start, stop)``: the global indices this process samples from."""
        p = self._process_index
        return int(self._bounds[p]), int(self._bounds[p + 1])

    def local_slice(self, data: PyTree) -> PyTree:
        """This process's rows of ``data`` (a pytree of arrays over all ``N`` examples)."""
        start, stop = self.shard_range
        return jax.tree_util.tree_map(lambda x: x[start:stop], data)

    def shard_sizes_at(self, step: int) -> np.ndarray:
        """The real-example count of every process's part at ``step`` (the same on every process)."""
        step = _check_exact_int("step", step)
        return self._rng(step, 0).binomial(self._shard_sizes, self._sampling_rate).astype(np.int64)

    def __repr__(self):
        return (
            f"ShardedPoissonSampler(num_examples={self._num_examples}, sampling_rate={self._sampling_rate!r}, "
            f"process {self._process_index} of {self._process_count}, bucket_sizes={self._bucket_sizes}, "
            f"step={self._step})"
        )
