"""Per-example gradient clipping: the one place dpjax clips.

``clipped_grad(loss_fn, l2_clip_norm=C)`` turns an ordinary batch loss into a
function that returns the *sum over examples* of each example's gradient,
each scaled so that its L2 norm is at most ``C``. The result is a
:class:`ClippedGradient`, which carries the L2 sensitivity of that sum so the
noise step (:func:`dpjax.privatize`) can check that its noise is calibrated to
it.

Guarantees (privacy invariants 1 and 2 of the design notes):

* every example's contribution to the sum has L2 norm ``<= C`` (flat clipping)
  or ``<= C_g`` in every parameter group ``g`` (per-layer clipping);
* an example whose gradient contains NaN or Inf contributes exactly zero and is
  counted in ``ClippedGradient.num_nonfinite``;
* an example with ``mask == False`` (padding) contributes exactly zero.

The loss function is the one you already train with: ``loss_fn(params, batch,
*args)`` returns the *mean* (or sum) loss over the leading axis of ``batch``.
dpjax calls it on batches of one example, under ``jax.vmap``, so models that
expect a batch axis (every Flax layer does) work unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import struct

from flax import nnx

from dpjax import fast_clipping, separability, validation
from dpjax.provenance import Provenance
from dpjax.sampling import Batch, SampledBatch

PyTree = Any


@struct.dataclass
class ClippedGradient:
    """The clipped per-example gradient sum and what the noise step must know.

    Attributes:
      sensitivity: L2 sensitivity of ``sum`` under adding or removing one
        example: ``C`` for flat clipping, ``sqrt(sum_g C_g**2)`` for per-layer
        clipping. Static (not traced), so a mismatch is caught when tracing.
      sum: pytree like ``params`` (float32 or wider): ``sum_i clip(grad_i)``.
        Not divided by anything; :func:`dpjax.privatize` divides by the public
        expected batch size after adding noise.
      num_examples: realised number of unmasked examples. **Not private**: use
        it for diagnostics only, never to normalise the update.
      num_nonfinite: unmasked examples whose gradient had NaN/Inf and were
        therefore dropped from the sum. **Not private**.
      per_example_loss: ``(batch,)`` losses, only with ``return_per_example``.
        **Not private**.
      per_example_norm: ``(batch,)`` global L2 norms before clipping, only with
        ``return_per_example``. **Not private**.
      aux: with ``has_aux=True``, each example's aux (from its batch of one),
        stacked over the batch. **Not private.**
      provenance: the :class:`~dpjax.sampling.Provenance` stamp of the batch
        when it was a :class:`~dpjax.SampledBatch` (``None`` for a plain
        batch); :func:`dpjax.privatize` checks it against its ledger.
    """

    sensitivity: float = struct.field(pytree_node=False)
    sum: PyTree
    num_examples: jax.Array
    num_nonfinite: jax.Array
    per_example_loss: Optional[jax.Array] = None
    per_example_norm: Optional[jax.Array] = None
    provenance: Optional[Provenance] = None
    aux: Optional[PyTree] = None


def _unpack_batch(batch, mask):
    """(rows, mask or None, provenance or None) of a SampledBatch or a plain batch."""
    if isinstance(batch, Batch):
        raise TypeError(
            "clipped_grad got a dpjax.Batch (indices, not rows); pass its rows with their mask and "
            "provenance: grad_fn(params, batch.take(data)) (or batch.attach(rows) for rows you read yourself)"
        )
    if not isinstance(batch, SampledBatch):
        return batch, mask, None
    if mask is not None:
        raise ValueError(
            "the batch is a dpjax.SampledBatch, which carries its own padding mask; drop mask= "
            "(two masks could disagree)"
        )
    return batch.data, batch.mask, batch.provenance


def _as_params(params):
    """(differentiable params, rebuild) for a pytree of parameters or an NNX module.

    An ``nnx.Module`` is split into its ``nnx.Param`` state (what is clipped and
    returned) and the rest (held fixed); ``rebuild(p)`` merges them back into a
    module for ``loss_fn``. Any other pytree is used as it is.
    """
    if isinstance(params, nnx.Module):
        graphdef, state, rest = nnx.split(params, nnx.Param, ...)
        # The rest as plain arrays: merging then makes fresh variables inside the trace,
        # so a layer that writes its state (BatchNorm statistics) writes to a copy.
        rest = nnx.as_pure(rest)
        return state, lambda p: nnx.merge(graphdef, p, rest)
    return params, None


def _checked_mask(mask, b: int) -> jax.Array:
    if mask is None:
        return jnp.ones((b,), dtype=bool)
    mask = jnp.asarray(mask)
    if mask.shape != (b,):
        raise ValueError(f"mask must have shape (batch,) = ({b},), got {mask.shape}")
    return mask.astype(bool)


def _microbatched(clip_chunk, params, rows, mask, microbatch_size: int):
    """``clip_chunk`` over chunks of ``microbatch_size`` examples inside a ``lax.scan``.

    The rows are padded by repeating the first example (always a valid model
    input), masked out; the per-example outputs are cut back to the batch.
    """
    b = mask.shape[0]
    n_chunks = -(-b // microbatch_size)
    pad = n_chunks * microbatch_size - b

    def chunked(x):
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
        return x.reshape((n_chunks, microbatch_size) + x.shape[1:])

    chunks = jax.tree_util.tree_map(chunked, rows)
    chunk_masks = chunked(mask)
    if pad:
        chunk_masks = chunk_masks.at[-1, microbatch_size - pad:].set(False)
    zero_sum = jax.tree_util.tree_map(
        lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(p.dtype, jnp.float32)), params)
    zero_counts = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def body(carry, xs):
        acc, counts = carry
        s, c, per_example = clip_chunk(*xs)
        acc = jax.tree_util.tree_map(jnp.add, acc, s)
        return (acc, (counts[0] + c[0], counts[1] + c[1])), per_example

    (summed, counts), per_example = jax.lax.scan(body, (zero_sum, zero_counts), (chunks, chunk_masks))
    per_example = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:])[:b], per_example)
    return summed, counts, per_example


def _batch_size(batch: PyTree) -> int:
    """The common leading dimension of every leaf, or a clear error."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError("batch has no array leaves; pass the examples as a pytree of arrays")
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} is a scalar; every batch leaf needs "
                "a leading batch axis (pass per-call constants through *args instead)"
            )
        sizes[jax.tree_util.keystr(path)] = shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(
            "batch leaves have mismatched batch axes (leading dimensions): "
            + ", ".join(f"{k or 'batch'}={v}" for k, v in sizes.items())
        )
    return next(iter(sizes.values()))


def _check_clip_norms(l2_clip_norm, per_layer_clip_norms):
    if (l2_clip_norm is None) == (per_layer_clip_norms is None):
        raise ValueError(
            "pass exactly one of l2_clip_norm (flat clipping) or per_layer_clip_norms "
            "(a clip norm per parameter group)"
        )
    if l2_clip_norm is not None:
        return validation.check_positive("l2_clip_norm", l2_clip_norm)
    leaves = jax.tree_util.tree_leaves_with_path(per_layer_clip_norms)
    if not leaves:
        raise ValueError("per_layer_clip_norms is empty")
    squares = 0.0
    for path, c in leaves:
        c = validation.check_positive(f"per_layer_clip_norms{jax.tree_util.keystr(path)}", c)
        squares += c * c
    return math.sqrt(squares)


def even_layer_clip_norms(params: PyTree, l2_clip_norm: float) -> PyTree:
    """Split a total clip norm evenly over the leaves of ``params``.

    Each of the ``L`` leaves gets ``C / sqrt(L)``, so the total sensitivity stays
    ``C``. Use the result as ``per_layer_clip_norms``.

    >>> import jax.numpy as jnp
    >>> even_layer_clip_norms({"w": jnp.zeros(3), "b": jnp.zeros(1)}, 2.0)
    {'b': 1.414..., 'w': 1.414...}
    """
    c = validation.check_positive("l2_clip_norm", l2_clip_norm)
    n = len(jax.tree_util.tree_leaves(params))
    if n == 0:
        raise ValueError("params has no leaves")
    return jax.tree_util.tree_map(lambda _: c / math.sqrt(n), params)


def _vmap_engine(single_example_loss, params, chunk, args):
    """Per-example gradients with ``jax.vmap`` (works for any differentiable model).

    ``single_example_loss`` returns ``(loss, aux)``. Returns per-example
    losses, per-leaf squared norms (a list of ``(B,)`` float32 arrays),
    ``weighted_sum(factors, keep)``, which returns the list of
    ``sum_i factors[leaf][i] * grad_i[leaf]`` (rows where ``keep`` is False
    are replaced by 0 first: ``jnp.where``, since 0 * NaN would be NaN), and
    the per-example aux.
    """
    in_axes = (None, 0) + (None,) * len(args)
    (losses, aux), grads = jax.vmap(jax.value_and_grad(single_example_loss, has_aux=True),
                                    in_axes=in_axes)(params, chunk, *args)
    leaves = jax.tree_util.tree_leaves(grads)
    sq = [jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1) for g in leaves]

    def weighted_sum(factors, keep):
        out = []
        for f, g in zip(factors, leaves):
            acc_dtype = jnp.promote_types(g.dtype, jnp.float32)
            g = jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0).astype(acc_dtype)
            out.append(jnp.tensordot(f.astype(acc_dtype), g, axes=1))
        return out

    return losses, sq, weighted_sum, aux


def _leaf_groups(per_layer_clip_norms, params):
    """(group index of every params leaf, clip norm of every group)."""
    norms, prefix_def = jax.tree_util.tree_flatten(per_layer_clip_norms)
    indexed = jax.tree_util.tree_unflatten(prefix_def, list(range(len(norms))))
    try:
        per_leaf = jax.tree_util.tree_map(
            lambda idx, sub: jax.tree_util.tree_map(lambda _: idx, sub), indexed, params
        )
    except ValueError as e:
        raise ValueError(
            "per_layer_clip_norms must be a prefix of the params pytree "
            f"(same keys at the top levels): {e}"
        ) from None
    return jax.tree_util.tree_leaves(per_leaf), [float(c) for c in norms]


@dataclasses.dataclass(frozen=True)
class _LossForm:
    """How ``loss_fn`` is called: on a module (``rebuild``), with ``rng=``, returning aux."""

    rebuild: Optional[Callable]
    with_rng: bool
    has_aux: bool


def _call_loss(loss_fn, form: _LossForm, params, one, key, args):
    """``(loss, aux)`` of ``loss_fn`` on the batch ``one``, checked to be a scalar (and aux)."""
    model = params if form.rebuild is None else form.rebuild(params)
    kwargs = {} if not form.with_rng else {"rng": jax.random.wrap_key_data(key)}
    out = loss_fn(model, one, *args, **kwargs)
    if form.has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("with has_aux=True, loss_fn must return a pair (loss, aux); "
                            f"got {type(out).__name__}")
        loss, aux = out
    elif isinstance(out, (tuple, list)):
        raise TypeError(
            f"loss_fn returned a {type(out).__name__} of {len(out)}; it must return the scalar mean loss. "
            "If it returns (loss, aux), pass clipped_grad(..., has_aux=True): aux then comes back per "
            "example in ClippedGradient.aux"
        )
    else:
        loss, aux = out, ()
    if jnp.shape(loss) != ():
        raise TypeError(
            "loss_fn must return a scalar (the mean loss over the batch); "
            f"got shape {jnp.shape(loss)}"
        )
    return loss, aux


def _single_example_loss(loss_fn, form: _LossForm):
    """``(loss, aux)`` of one example (given a batch axis of 1); with ``rng``, the
    example is ``(example, key_data)``."""

    def single_example_loss(params, example, *args):
        example, key = example if form.with_rng else (example, None)
        one = jax.tree_util.tree_map(lambda x: jnp.expand_dims(x, 0), example)
        return _call_loss(loss_fn, form, params, one, key, args)

    return single_example_loss


def _check_separable(loss_fn, form: _LossForm, params, batch, keys, args) -> None:
    """Refuse a loss that mixes examples or shares random keys (see dpjax.separability)."""
    one = jax.tree_util.tree_map(lambda x: x[:1], batch)
    key = None if keys is None else keys[0]
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    ex_leaves, ex_def = jax.tree_util.tree_flatten((one, key))

    def traced(p_list, ex_list, *a):
        o, k = jax.tree_util.tree_unflatten(ex_def, ex_list)
        loss, aux = _call_loss(loss_fn, form, jax.tree_util.tree_unflatten(p_def, p_list), o, k, a)
        return loss

    closed = jax.make_jaxpr(traced)(p_leaves, ex_leaves, *args)
    separability.check(closed.jaxpr, len(p_leaves), len(ex_leaves), rng_given=form.with_rng)


def _example_keys(rng, b: int):
    """``(b, key_data)``: one key per example, split from ``rng``."""
    if not isinstance(rng, jax.Array):
        raise TypeError(f"rng must be a JAX PRNG key (jax.random.key or PRNGKey), got {type(rng).__name__}")
    typed = rng if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)
    if typed.shape != ():
        raise ValueError(f"rng must be a single key, got shape {typed.shape}")
    return jax.random.key_data(jax.random.split(typed, b))


METHODS = ("auto", "vmap", "fast")


def clipped_grad(
    loss_fn: Callable[..., jax.Array],
    *,
    l2_clip_norm: Optional[float] = None,
    per_layer_clip_norms: Optional[PyTree] = None,
    microbatch_size: Optional[int] = None,
    return_per_example: bool = False,
    method: str = "auto",
    keep_fraction: Optional[float] = None,
    has_aux: bool = False,
) -> Callable[..., ClippedGradient]:
    """Like ``jax.grad``, but returns the sum of per-example clipped gradients.

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> scalar``, the batch loss you
        train with (mean over the leading axis of every leaf of ``batch``).
        It is called on one example at a time (a batch of size 1).
      l2_clip_norm: flat clipping: each example's whole gradient is scaled to
        L2 norm ``<= l2_clip_norm``.
      per_layer_clip_norms: per-layer clipping instead: a pytree that is a
        *prefix* of ``params`` whose leaves are clip norms; every parameter
        group (subtree) under a leaf is clipped to that norm separately. The
        sum's sensitivity is ``sqrt(sum_g C_g**2)``. See
        :func:`even_layer_clip_norms`.
      microbatch_size: process the batch in chunks of this many examples with
        ``lax.scan`` to bound memory (the batch is padded with masked examples
        to a multiple of it). Same result as unchunked up to float summation
        order.
      return_per_example: also return per-example losses and pre-clip norms
        (diagnostics; **not private**).
      method: ``"auto"`` (default: ``"fast"``, or ``"vmap"`` with a warning
        if the fast engine cannot trace the model), ``"vmap"`` (per-example
        gradients with ``jax.vmap``; any model) or ``"fast"`` (ghost norms and book-keeping from layer activations and
        output gradients, see :mod:`dpjax.fast_clipping`; exact, with a
        per-parameter vmap fallback for what it cannot match).
      keep_fraction: fast path only, a memory/speed knob. A layer whose
        per-example gradients are formed keeps them for the clipped sum when
        they take at most this fraction of the memory of its activations;
        the others get their clipped sum from a second backward pass.
        ``None``: :data:`dpjax.fast_clipping.KEEP_FRACTION` (0.25); ``0``:
        least memory; ``float("inf")``: one backward pass, fastest. The result
        is the same either way.
      has_aux: ``loss_fn`` returns ``(loss, aux)`` as with
        ``jax.value_and_grad(..., has_aux=True)``; each example's aux (from its
        batch of one) comes back stacked in ``ClippedGradient.aux``. **Not
        private.**

    Returns:
      ``grad_fn(params, batch, *args, mask=None, rng=None) -> ClippedGradient``.
      ``batch`` is either a :class:`~dpjax.SampledBatch` from a dpjax sampler
      (``sampler.sample().take(data)``: its padding mask is applied and its
      provenance stamp is copied into the result, which
      :func:`dpjax.privatize` requires), or a plain pytree of arrays, with an
      optional boolean ``(batch,)`` ``mask`` (``True`` for real examples).
      Masked examples contribute exactly zero. ``params`` may also be an
      ``nnx.Module``: its ``nnx.Param`` state is clipped and returned (as an
      ``nnx.State``) and ``loss_fn`` receives the module. ``rng``: a key for
      per-example randomness (dropout): it is split into one key per example
      and ``loss_fn`` is called as ``loss_fn(params, batch, *args,
      rng=example_key)``; pass a fresh key every step. ``grad_fn`` can be
      ``jax.jit``-ed.

    Raises (when tracing): :class:`dpjax.separability.CrossExampleError` if the
    model or loss mixes examples (BatchNorm in training mode, a batch-level
    loss), and :class:`dpjax.separability.SharedRandomnessError` if the loss
    draws random numbers from a key that every example shares (pass ``rng=``).

    Example:

    >>> import jax, jax.numpy as jnp, dpjax
    >>> def loss(w, batch):
    ...     return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
    >>> grad_fn = dpjax.clipped_grad(loss, l2_clip_norm=1.0)
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros(4)}
    >>> g = jax.jit(grad_fn)(jnp.ones(3), batch)
    >>> g.sensitivity, g.sum.shape
    (1.0, (3,))
    >>> float(jnp.linalg.norm(g.sum)) <= 4 * 1.0 + 1e-5   # 4 examples, each <= C
    True
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
    sensitivity = _check_clip_norms(l2_clip_norm, per_layer_clip_norms)
    validation.check_choice("method", method, set(METHODS))
    if microbatch_size is not None:
        microbatch_size = validation.check_positive_int("microbatch_size", microbatch_size)
    if keep_fraction is not None:
        if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, (int, float)) or not keep_fraction >= 0:
            raise ValueError(f"keep_fraction must be a number >= 0 (or inf), got {keep_fraction!r}")
    flat = per_layer_clip_norms is None

    def fast_engine(example_loss, params, chunk, args):
        losses, sq, weighted_sum, _, aux = fast_clipping.fast_engine(example_loss, params, chunk, args, keep_fraction)
        return losses, sq, weighted_sum, aux

    def clip_chunk(example_loss, params, chunk, chunk_mask, args):
        if method == "vmap":
            losses, sq, weighted_sum, aux = _vmap_engine(example_loss, params, chunk, args)
        elif method == "fast":
            losses, sq, weighted_sum, aux = fast_engine(example_loss, params, chunk, args)
        else:  # auto: the fast engine, or vmap if the model defeats the jaxpr walker
            try:
                losses, sq, weighted_sum, aux = fast_engine(example_loss, params, chunk, args)
            except Exception as e:  # noqa: BLE001 - any tracing failure: use the always-correct path
                warnings.warn(f"dpjax fast clipping could not handle this model ({type(e).__name__}: {e}); "
                              "using per-example gradients (method='vmap')", stacklevel=2)
                losses, sq, weighted_sum, aux = _vmap_engine(example_loss, params, chunk, args)
        finite = jnp.all(jnp.stack([jnp.isfinite(s) for s in sq]), axis=0)
        norms = jnp.sqrt(sum(sq))
        finite = finite & jnp.isfinite(norms)
        live = finite & chunk_mask
        if flat:
            # min(1, C / norm); C / max(norm, C) is 1 for norm == 0 without dividing by 0.
            factor = jnp.where(live, l2_clip_norm / jnp.maximum(norms, l2_clip_norm), 0.0)
            factors = [factor] * len(sq)
        else:
            group_of_leaf, group_clip = _leaf_groups(per_layer_clip_norms, params)
            group_sq = [0.0] * len(group_clip)
            for g, s in zip(group_of_leaf, sq):
                group_sq[g] = group_sq[g] + s
            group_factor = [
                jnp.where(live, c / jnp.maximum(jnp.sqrt(gs), c), 0.0) for c, gs in zip(group_clip, group_sq)
            ]
            factors = [group_factor[g] for g in group_of_leaf]
        summed = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(params), weighted_sum(factors, finite)
        )
        counts = (
            jnp.sum(chunk_mask.astype(jnp.int32)),
            jnp.sum((chunk_mask & ~finite).astype(jnp.int32)),
        )
        return summed, counts, (losses, norms, aux)

    def grad_fn(params, batch, *args, mask=None, rng=None) -> ClippedGradient:
        batch, mask, provenance = _unpack_batch(batch, mask)
        params, rebuild = _as_params(params)
        form = _LossForm(rebuild=rebuild, with_rng=rng is not None, has_aux=has_aux)
        b = _batch_size(batch)
        keys = None if rng is None else _example_keys(rng, b)
        _check_separable(loss_fn, form, params, batch, keys, args)
        example_loss = _single_example_loss(loss_fn, form)
        rows = batch if keys is None else (batch, keys)
        mask = _checked_mask(mask, b)
        if microbatch_size is None or microbatch_size >= b:
            summed, (n, bad), (losses, norms, aux) = clip_chunk(example_loss, params, rows, mask, args)
        else:
            summed, (n, bad), (losses, norms, aux) = _microbatched(
                lambda chunk, chunk_mask: clip_chunk(example_loss, params, chunk, chunk_mask, args),
                params, rows, mask, microbatch_size)
        return ClippedGradient(
            sensitivity=sensitivity,
            sum=summed,
            num_examples=n,
            num_nonfinite=bad,
            per_example_loss=losses if return_per_example else None,
            per_example_norm=norms if return_per_example else None,
            provenance=provenance,
            aux=aux if has_aux else None,
        )

    return grad_fn
