"""Per-example gradient norms and the clipped sum without the model's per-example gradients.

The engine works on the jaxpr of the single-example loss, so it needs no layer
registry and sees Flax Linen and NNX models alike (both lower to the same
primitives):

1. **Plan.** Trace ``loss(params, one_example)`` to a jaxpr and follow every
   parameter leaf through view ops (reshape, dtype casts, transposes). A leaf
   whose only use is the weight operand of one ``dot_general`` (Dense,
   DenseGeneral, Einsum, attention projections) or one ungrouped
   ``conv_general_dilated`` (Conv) is *matched*. Every other leaf (biases, norm
   scales, embeddings, tied weights, leaves used inside custom ops or control
   flow) is a *fallback* leaf.
2. **One forward and one backward pass.** The jaxpr is re-evaluated per
   example (under ``vmap``) with a zero "tap" added to each matched op's
   output and a zero per-example offset added to each fallback leaf. One
   ``vjp`` of the per-example losses gives, for every matched op, the output
   gradient G_i (its input A_i is kept from the forward pass), and for every
   fallback leaf its exact per-example gradient.
3. **Norms, per op.** For a matched op the per-example weight gradient is
   A_iᵀG_i (convolutions: P_iᵀG_i with P_i the image patches). Its squared norm
   is taken with the Gram ("ghost") identity ⟨A_iA_iᵀ, G_iG_iᵀ⟩ when
   2T² ≤ p·d (T positions, d inputs, p outputs), else by forming A_iᵀG_i.
   Convolutions build exact patches from strided slices for a chunk of about
   B / (2K) examples at a time inside a ``scan`` (K kernel offsets), so the
   patches of the whole batch never exist.
4. **Clipped sum, per op.** With clip factors c_i:
   * ghost ops: book-keeping, Σ_i c_i A_iᵀG_i as one contraction of A with c·G;
   * instantiated ops whose per-example gradients are small next to their
     activations (≤ ``KEEP_FRACTION``): the gradients are kept and summed with
     weights c_i;
   * other instantiated ops (the wide top layers of a CNN): G is recomputed by a
     second backward pass (its cotangent depends on the norms, so it runs after
     them, and XLA prunes it below the lowest such op) and contracted with c·A.
   This keeps XLA's scratch memory near the non-private step's.

Per-example semantics are those of the vmap path by construction (the same
single-example loss is evaluated), and the tests compare both on MLPs, CNNs,
transformers, tied embeddings and custom ops.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from dpjax import weight_sharing

# Ops that only re-view a parameter: the gradient maps back through their inverse.
_VIEW_OPS = ("reshape", "convert_element_type", "transpose", "squeeze", "expand_dims", "copy", "copy_p")
_CALL_OPS = ("pjit", "jit", "closed_call", "core_call", "remat2", "checkpoint")

Path = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Origin:
    leaf: int
    chain: Tuple[Tuple[str, Any, Tuple[int, ...]], ...]  # (op, params, input shape), param -> operand
    scan_length: int = 0  # > 0: a slice of the leaf, one per iteration of a scan over its first axis


@dataclasses.dataclass(frozen=True)
class MatchedOp:
    """A dot_general / conv whose weight operand is (a view of) one parameter leaf."""

    path: Path
    kind: str  # "dot", "conv" or "embed"
    leaf: int
    weight_operand: int  # 0 (lhs) or 1 (rhs)
    chain: Tuple[Tuple[str, Any, Tuple[int, ...]], ...]
    params: Dict[str, Any]
    act_shape: Tuple[int, ...]
    weight_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    out_dtype: Any
    scan_length: int = 0  # > 0: inside a scan whose iterations use slices of the (stacked) leaf


@dataclasses.dataclass
class Plan:
    matched: Dict[Path, MatchedOp]
    fallback: Tuple[int, ...]  # leaf indices handled by per-example gradients
    # Leaves used by several matched ops (tied embeddings, shared layers): their uses.
    shared: Dict[int, Tuple[Path, ...]] = dataclasses.field(default_factory=dict)
    reasons: Dict[int, str] = dataclasses.field(default_factory=dict)  # why each fallback leaf is one

    def describe(self, leaf_names: Sequence[str]) -> str:
        fast = sorted({leaf_names[m.leaf] for m in self.matched.values()})
        slow = sorted(leaf_names[i] for i in self.fallback)
        return f"fast: {fast}; per-example (fallback): {slow}"

    def explain(self, leaf_names: Sequence[str], keep_fraction: Optional[float] = None) -> str:
        """One line per leaf: what the fast path does with it, and why."""
        strategy = strategies(self, KEEP_FRACTION if keep_fraction is None else keep_fraction)
        lines = []
        for leaf, name in enumerate(leaf_names):
            uses = [m for m in self.matched.values() if m.leaf == leaf]
            if not uses:
                lines.append(f"{name}: per-example gradient (fallback): {self.reasons.get(leaf, '?')}")
                continue
            how = ", ".join(f"{m.kind}" + (f" in a scan of {m.scan_length}" if m.scan_length else "")
                            + (f" ({strategy[m.path]})" if m.path in strategy else "") for m in uses)
            lines.append(f"{name}: fast: {how}" + ("; shared weight, cross terms" if leaf in self.shared else ""))
        return "\n".join(lines)


def _is_var(v) -> bool:
    return not isinstance(v, jex_core.Literal)


def _call_jaxpr(eqn):
    # remat (checkpoint) is inlined: the same values, without the recomputation.
    closed = eqn.params.get("jaxpr") if eqn.primitive.name in ("pjit", "jit", "remat2", "checkpoint") \
        else eqn.params.get("call_jaxpr")
    if closed is None:
        return None, ()
    if isinstance(closed, jex_core.ClosedJaxpr):
        return closed.jaxpr, closed.consts
    return closed, ()


def make_plan(jaxpr, num_leaves: int) -> Plan:
    """Find the matched ops and the fallback leaves of a single-example loss jaxpr."""
    candidates: Dict[int, List[MatchedOp]] = {i: [] for i in range(num_leaves)}
    other_use: Dict[int, str] = {}  # leaf -> why it cannot be matched (the first reason seen)

    def walk_scan(eqn, ins, key):
        # A leaf scanned over (an xs operand, as Flax nn.scan stacks layer parameters)
        # is sliced per iteration: the body's uses of the slice can be matched.
        # Any other parameter entering a scan is used in every iteration: fallback.
        body = eqn.params["jaxpr"].jaxpr
        first_xs = eqn.params["num_consts"] + eqn.params["num_carry"]
        inner = {}
        for j, (iv, o) in enumerate(zip(body.invars, ins)):
            if o is None:
                continue
            if j >= first_xs and not o.chain and not o.scan_length:
                inner[iv] = _Origin(o.leaf, (), int(eqn.params["length"]))
            else:
                other_use.setdefault(o.leaf, "enters a scan unsliced (used by every iteration)")
        walk(body, inner, key)
        for ov in body.outvars:
            if _is_var(ov) and ov in inner:
                other_use.setdefault(inner[ov].leaf, "returned by a scan")

    def walk(jx, origins: Dict[Any, _Origin], path: Path):
        for idx, eqn in enumerate(jx.eqns):
            key = path + (idx,)
            ins = [origins.get(v) if _is_var(v) else None for v in eqn.invars]
            name = eqn.primitive.name
            if name == "scan":
                walk_scan(eqn, ins, key)
                continue
            if name in _CALL_OPS:
                inner, _ = _call_jaxpr(eqn)
                if inner is not None:
                    inner_orig = {iv: o for iv, o in zip(inner.invars, ins) if o is not None}
                    walk(inner, inner_orig, key)
                    for ov, iov in zip(eqn.outvars, inner.outvars):
                        if _is_var(iov) and iov in inner_orig:
                            other_use.setdefault(inner_orig[iov].leaf, "returned as is by a call")
                    continue
            if name == "mul" and _scaled_leaf(eqn, ins) is not None:
                o, factor = _scaled_leaf(eqn, ins)
                # A constant multiple of a parameter (LoRA's scale * A): a view whose
                # gradient maps back by the same factor.
                origins[eqn.outvars[0]] = _Origin(
                    o.leaf, o.chain + (("scale", {"value": factor}, tuple(eqn.outvars[0].aval.shape)),), o.scan_length
                )
                continue
            if name in _VIEW_OPS and ins and ins[0] is not None:
                o = ins[0]
                origins[eqn.outvars[0]] = _Origin(
                    o.leaf, o.chain + ((name, dict(eqn.params), tuple(eqn.invars[0].aval.shape)),), o.scan_length
                )
                continue
            if name == "dot_general" and sum(o is not None for o in ins) == 1:
                w = 0 if ins[0] is not None else 1
                (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
                if not lb and not rb:
                    candidates[ins[w].leaf].append(_matched(key, "dot", ins[w], w, eqn))
                    continue
            if name == "gather" and ins[0] is not None and all(o is None for o in ins[1:]) and _is_row_lookup(eqn):
                candidates[ins[0].leaf].append(_matched(key, "embed", ins[0], 0, eqn))
                continue
            if (
                name == "conv_general_dilated"
                and ins[1] is not None
                and ins[0] is None
                and eqn.params["feature_group_count"] == 1
                and eqn.params["batch_group_count"] == 1
            ):
                candidates[ins[1].leaf].append(_matched(key, "conv", ins[1], 1, eqn))
                continue
            for o in ins:
                if o is not None:
                    other_use.setdefault(o.leaf, f"used by {name}")

    walk(jaxpr, {v: _Origin(i, ()) for i, v in enumerate(jaxpr.invars[:num_leaves])}, ())
    return _assign(candidates, other_use, num_leaves)


def _assign(candidates, other_use: Dict[int, str], num_leaves: int) -> Plan:
    """Matched, shared or fallback, leaf by leaf (with the reason for each fallback)."""
    matched, fallback, shared, reasons = {}, [], {}, {}
    for leaf in range(num_leaves):
        uses = candidates[leaf]
        if leaf in other_use or not uses:
            fallback.append(leaf)
            reasons[leaf] = other_use.get(leaf, "not used by the loss")
        elif len(uses) == 1:
            matched[uses[0].path] = uses[0]
        elif weight_sharing.shareable(uses):
            matched.update((u.path, u) for u in uses)
            shared[leaf] = tuple(u.path for u in uses)
        else:
            fallback.append(leaf)
            reasons[leaf] = f"used by {len(uses)} products in layouts without a cross-term rule"
    return Plan(matched=matched, fallback=tuple(fallback), shared=shared, reasons=reasons)


def _scaled_leaf(eqn, ins):
    """``(origin, factor)`` when ``eqn`` multiplies a parameter by a literal scalar."""
    for j in (0, 1):
        other = eqn.invars[1 - j]
        if (ins[j] is not None and ins[1 - j] is None and isinstance(other, jex_core.Literal)
                and np.shape(other.val) == () and tuple(eqn.invars[j].aval.shape) == tuple(eqn.outvars[0].aval.shape)):
            return ins[j], float(other.val)
    return None


def chain_scale(chain) -> float:
    """The product of the constant factors in a view chain (1 for pure re-views)."""
    return float(np.prod([params["value"] for name, params, _ in chain if name == "scale"] or [1.0]))


def _is_row_lookup(eqn) -> bool:
    """``table[indices]`` on a 2-D table, as ``jnp.take(table, idx, axis=0)`` (Flax Embed) emits."""
    table, idx = eqn.invars[0].aval, eqn.invars[1].aval
    dn = eqn.params["dimension_numbers"]
    return (
        len(table.shape) == 2
        and idx.shape[-1:] == (1,)
        and tuple(dn.offset_dims) == (len(idx.shape) - 1,)
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(getattr(dn, "operand_batching_dims", ()))
        and tuple(eqn.params["slice_sizes"]) == (1, table.shape[1])
    )


def _matched(key, kind, origin, w, eqn) -> MatchedOp:
    a = 1 - w
    return MatchedOp(
        path=key,
        kind=kind,
        leaf=origin.leaf,
        weight_operand=w,
        chain=origin.chain,
        params=dict(eqn.params),
        act_shape=tuple(eqn.invars[a].aval.shape),
        weight_shape=tuple(eqn.invars[w].aval.shape),
        out_shape=tuple(eqn.outvars[0].aval.shape),
        out_dtype=eqn.outvars[0].aval.dtype,
        scan_length=origin.scan_length,
    )


def interpret(jaxpr, consts, args, plan: Plan, taps: Dict[Path, jax.Array], acts: Dict[Path, jax.Array],
              path: Path = ()):
    """Evaluate ``jaxpr``, adding ``taps[path]`` to each matched op's output and
    storing its activation operand in ``acts``."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for idx, eqn in enumerate(jaxpr.eqns):
        key = path + (idx,)
        invals = [read(v) for v in eqn.invars]
        inner, inner_consts = (None, ()) if eqn.primitive.name not in _CALL_OPS else _call_jaxpr(eqn)
        inside = [k for k in plan.matched if len(k) > len(key) and k[:len(key)] == key]
        if inner is not None:
            outvals = interpret(inner, inner_consts, invals, plan, taps, acts, key)
        elif eqn.primitive.name == "scan" and inside:
            outvals = _interpret_scan(eqn, invals, plan, taps, acts, key, inside)
        else:
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            with eqn.ctx.manager:
                out = eqn.primitive.bind(*invals, **bind_params)
            outvals = out if eqn.primitive.multiple_results else [out]
        m = plan.matched.get(key)
        if m is not None:
            acts[key] = invals[1 - m.weight_operand]
            outvals = [outvals[0] + taps[key]]
        for v, x in zip(eqn.outvars, outvals):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _interpret_scan(eqn, invals, plan: Plan, taps, acts, key: Path, inside: List[Path]):
    """A scan whose body holds matched ops: each iteration's taps are scanned
    inputs and its activations scanned outputs, stacked over iterations."""
    p = eqn.params
    body = p["jaxpr"]
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]

    def step(carry, x):
        x_vals, tap_vals = x
        sub_acts: Dict[Path, jax.Array] = {}
        outs = interpret(body.jaxpr, body.consts, list(consts) + list(carry) + list(x_vals), plan,
                         dict(zip(inside, tap_vals)), sub_acts, key)
        return outs[:nk], (outs[nk:], [sub_acts[k] for k in inside])

    carry, (ys, stacked_acts) = jax.lax.scan(step, list(init), (list(xs), [taps[k] for k in inside]),
                                             length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    acts.update(zip(inside, stacked_acts))
    return list(carry) + list(ys)


# ---------------------------------------------------------------------------
# Per-layer algebra on (batch, positions T, inputs d) and (batch, T, outputs p)
# ---------------------------------------------------------------------------


def _dot_factors(m: MatchedOp, act, g):
    """Activation (B, T, d) and output gradient (B, T, p) of a matched dot_general,
    and how to turn a (d, p) matrix back into the weight operand's layout."""
    (lc, rc), _ = m.params["dimension_numbers"]
    a_con, w_con = (rc, lc) if m.weight_operand == 0 else (lc, rc)
    a_nd, w_nd = len(m.act_shape), len(m.weight_shape)
    a_free = [i for i in range(a_nd) if i not in a_con]
    w_free = [i for i in range(w_nd) if i not in w_con]
    bsz = act.shape[0]
    t = int(np.prod([m.act_shape[i] for i in a_free], dtype=np.int64))
    d = int(np.prod([m.act_shape[i] for i in a_con], dtype=np.int64))
    p = int(np.prod([m.weight_shape[i] for i in w_free], dtype=np.int64))
    a2 = jnp.transpose(act, [0] + [i + 1 for i in a_free] + [i + 1 for i in a_con]).reshape(bsz, t, d)
    # Output dims: lhs free then rhs free.
    n_a, n_w = len(a_free), len(w_free)
    if m.weight_operand == 1:
        g2 = g.reshape(bsz, t, p)
    else:
        perm = [0] + [1 + n_w + i for i in range(n_a)] + [1 + i for i in range(n_w)]
        g2 = jnp.transpose(g, perm).reshape(bsz, t, p)
    w_shape_dp = [m.weight_shape[i] for i in w_con] + [m.weight_shape[i] for i in w_free]
    inverse = np.argsort(list(w_con) + w_free)

    def to_weight(dp):
        return jnp.transpose(dp.reshape(w_shape_dp), inverse)

    return a2, g2, to_weight


def _conv_factors(m: MatchedOp, act, g):
    """Image patches (B, T, C·K) and output gradient (B, T, O) of a matched conv."""
    dn = m.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    spatial = [m.weight_shape[i] for i in rhs_spec[2:]]
    bsz = act.shape[0]

    def patches(a):
        return jax.lax.conv_general_dilated_patches(
            a,
            filter_shape=spatial,
            window_strides=m.params["window_strides"],
            padding=m.params["padding"],
            lhs_dilation=m.params["lhs_dilation"],
            rhs_dilation=m.params["rhs_dilation"],
            dimension_numbers=dn,
            precision=m.params.get("precision"),
        )

    pt = jax.vmap(patches)(act)  # per example: lhs layout, features = C * prod(spatial)
    to_last = lambda spec: [0] + [1 + spec[0]] + [1 + i for i in spec[2:]] + [1 + spec[1]]
    pt = jnp.transpose(pt, to_last(lhs_spec))
    g2 = jnp.transpose(g, to_last(out_spec))
    d, p = pt.shape[-1], g2.shape[-1]
    pt = pt.reshape(bsz, -1, d)
    g2 = g2.reshape(bsz, -1, p)
    c_in = m.weight_shape[rhs_spec[1]]
    kernel_order = [rhs_spec[1]] + list(rhs_spec[2:]) + [rhs_spec[0]]
    inverse = np.argsort(kernel_order)

    def to_weight(dp):
        return jnp.transpose(dp.reshape([c_in] + spatial + [p]), inverse)

    return pt, g2, to_weight


def _conv_chunked(m: MatchedOp, act, g, mode: str, factor=None, keep=None, acc_dtype=None):
    """A conv's kernel gradient from exact patches, a slice of the batch at a time.

    The kernel gradient is Σ_positions P[pos] G[pos] with P the patch (all kernel
    offsets × input channels) under each output position. P is built by
    concatenating strided slices of the padded input (exact in any precision,
    unlike a patches convolution, which TF32 would round), and only for a chunk
    of about B / (2K) examples at a time inside a ``scan``: each chunk's patches
    are about half an activation in size, so the patches of the whole batch
    never exist, while each product still contracts over all K·C patch
    features at once (on the CPU about 1.1x faster than one (C, O) product per
    kernel offset, at the same scratch memory).

    ``mode``:
      * ``"keep"``: ``(grads, to_weight)``, the (B, K, C, O) per-example gradients
        and the map of a (K, C, O) sum over the batch to the kernel's layout;
      * ``"norms"``: the (B,) squared norms of the per-example gradients;
      * ``"ghost_norms"``: the same by the Gram identity ⟨PPᵀ, GGᵀ⟩ (cheaper
        when 2T² ≤ p·d);
      * ``"sum"``: Σ_i factor_i ∂_i with rows where ``keep`` is False removed, in
        the kernel's layout.
    """
    dn = m.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    canon = lambda spec: [0, 1 + spec[0]] + [1 + i for i in spec[2:]] + [1 + spec[1]]
    dtype = _per_example_dtype(act, g) if mode != "sum" else acc_dtype
    a = jnp.transpose(act, canon(lhs_spec)).astype(dtype)  # (B, N, spatial..., C)
    gg = jnp.transpose(g, canon(out_spec)).astype(dtype)  # (B, N, out spatial..., O)
    pads = [(0, 0, 0), (0, 0, 0)] + [(lo, hi, 0) for lo, hi in m.params["padding"]] + [(0, 0, 0)]
    a = jax.lax.pad(a, jnp.zeros((), dtype), pads)
    ksize = [m.weight_shape[i] for i in rhs_spec[2:]]
    strides, dil = m.params["window_strides"], m.params["rhs_dilation"]
    bsz, n_e, c_in = a.shape[0], a.shape[1], a.shape[-1]
    out_sp, c_out = gg.shape[2:-1], gg.shape[-1]
    offsets = list(itertools.product(*[range(k) for k in ksize]))
    num = len(offsets)
    kernel_order = list(rhs_spec[2:]) + [rhs_spec[1], rhs_spec[0]]

    def to_weight(kco):  # (K·C, O) -> (spatial..., C, O) -> the kernel's layout
        return jnp.transpose(kco.reshape(ksize + [c_in, c_out]), np.argsort(kernel_order))

    # A chunk size that divides B makes the chunking a free reshape; padding the
    # batch (a copy of the activations) only when no divisor is near the target.
    target = -(-bsz // (2 * num))
    chunk = max(d for d in range(1, target + 1) if bsz % d == 0)
    if 2 * chunk < target:
        chunk = target
    n_chunks = -(-bsz // chunk)
    padded = n_chunks * chunk

    def chunked(x):  # (B, ...) -> (n_chunks, chunk, ...), zero rows appended if needed
        if padded != bsz:
            x = jnp.pad(x, [(0, padded - bsz)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((n_chunks, chunk) + x.shape[1:])

    def patches(x):  # (chunk, N, padded spatial..., C) -> (chunk, T, K·C)
        cols = []
        for off in offsets:
            starts = [0, 0] + [k * r for k, r in zip(off, dil)] + [0]
            limits = [chunk, n_e] + [k * r + (o - 1) * st + 1 for k, r, o, st in zip(off, dil, out_sp, strides)] + [c_in]
            cols.append(jax.lax.slice(x, starts, limits, [1, 1] + list(strides) + [1]).reshape(chunk, -1, c_in))
        return jnp.concatenate(cols, axis=-1)

    xs = (chunked(a), chunked(gg.reshape(bsz, -1, c_out)))

    if mode == "sum":
        c = jnp.where(keep, factor, 0).astype(dtype)
        k_rows, c_rows = chunked(keep), chunked(c)

        def add_sum(total, x):
            # Row selection and scaling where XLA fuses them into the product's operands.
            (ax, gx), kx, cx = x
            k3 = kx[:, None, None]
            pt = jnp.where(k3, patches(ax), 0) * cx[:, None, None]
            return total + jnp.einsum("btk,bto->ko", pt, jnp.where(k3, gx, 0)), None

        total = jnp.zeros((num * c_in, c_out), dtype)
        return to_weight(jax.lax.scan(add_sum, total, (xs, k_rows, c_rows))[0])

    def per_chunk(_, x):
        ax, gx = x
        pt = patches(ax)
        if mode == "ghost_norms":
            p32, g32 = pt.astype(jnp.float32), gx.astype(jnp.float32)
            gram_a = jnp.einsum("btk,bsk->bts", p32, p32)
            return None, jnp.sum(gram_a * jnp.einsum("bto,bso->bts", g32, g32), axis=(1, 2))
        grads = jnp.einsum("btk,bto->bko", pt, gx)
        if mode == "norms":
            return None, jnp.sum(jnp.square(grads.astype(jnp.float32)), axis=(1, 2))
        return None, grads

    out = jax.lax.scan(per_chunk, None, xs)[1]
    out = out.reshape((padded,) + out.shape[2:])[:bsz]
    if mode == "keep":
        return out.reshape(bsz, num, c_in, c_out), to_weight
    return out


def _per_example_dtype(act, g):
    """Per-example gradients and norms are formed in at least float32."""
    return jnp.promote_types(jnp.result_type(act, g), jnp.float32)


def _instantiated_ops(grads, to_weight):
    """``(sq_norms, weighted)`` for a layer whose (B, ...) per-example gradients are kept.

    The clipped sum is then a weighted sum over the batch instead of another
    weight-gradient pass.
    """
    bsz = grads.shape[0]
    flat = grads.reshape(bsz, -1)

    def sq_norms():
        return jnp.sum(jnp.square(flat.astype(jnp.float32)), axis=1)

    def weighted(factor, keep, acc_dtype, g_again=None):
        # As a matrix-vector product XLA fuses the row selection into the dot:
        # no zeroed copy of the gradients is made.
        c = jnp.where(keep, factor, 0).astype(acc_dtype)
        summed = jnp.where(keep[:, None], flat.astype(acc_dtype), 0).T @ c
        return to_weight(summed.reshape(grads.shape[1:]))

    return LayerOps(sq_norms, weighted)


def _embed_ops(m: MatchedOp, act, g):
    """Embedding rows: per-example norms by token equality, clipped sum by scatter-add.

    The per-example gradient of the table is Σ_t onehot(idx_t) G_t, so its squared
    norm is Σ_{t,t'} [idx_t = idx_t'] ⟨G_t, G_t'⟩ and the table is never formed
    per example.
    """
    vocab, dim = m.weight_shape
    bsz = act.shape[0]
    idx = act.reshape(bsz, -1)
    g2 = g.reshape(bsz, -1, dim)
    valid = (idx >= 0) & (idx < vocab)  # out-of-range lookups get no gradient
    g2 = jnp.where(valid[..., None], g2, 0)

    def sq_norms():
        g32 = g2.astype(jnp.float32)
        same = idx[:, :, None] == idx[:, None, :]
        gram = jnp.einsum("btd,bsd->bts", g32, g32)
        return jnp.sum(jnp.where(same, gram, 0.0), axis=(1, 2))

    def weighted(factor, keep, acc_dtype, g_again=None):
        cg = _zero_rows(g2, keep).astype(acc_dtype) * factor.astype(acc_dtype)[:, None, None]
        rows = jnp.where(valid, idx, 0).reshape(-1)
        return jnp.zeros((vocab, dim), acc_dtype).at[rows].add(cg.reshape(-1, dim))

    return LayerOps(sq_norms, weighted)


# Default of clipped_grad(keep_fraction=...): the per-example gradients that
# instantiated layers keep for the clipped sum may take at most this fraction of
# the memory of all matched layers' input and output activations. The budget is
# filled from the bottom of the network up, since a layer that does not keep its
# gradients gets them from a second backward pass that must run down to it: the
# lowest layers are the dearest to recompute (a ViT's patch embedding would cost
# a whole second backward pass) and the wide top layers of a CNN the cheapest.
# 0.25 kept the ANCHORS CNN within 1.25x non-private scratch.
KEEP_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class LayerOps:
    """How one matched op's norms and clipped sum are formed.

    ``weighted(factor, keep, acc_dtype, g_again)``: ``g_again`` is the op's output
    gradient from the second backward pass, used only when ``recompute`` is True.
    """

    sq_norms: Callable[[], jax.Array]
    weighted: Callable[..., jax.Array]
    recompute: bool = False


def _dims(m: MatchedOp) -> Tuple[float, float, float]:
    """(T positions, d inputs, p outputs) of a matched product or convolution, per example."""
    w = float(np.prod(m.weight_shape))
    if m.kind == "conv":
        dn = m.params["dimension_numbers"]
        p = float(m.out_shape[dn.out_spec[1]])
        return float(np.prod(m.out_shape)) / p, w / p, p
    a, out = float(np.prod(m.act_shape)), float(np.prod(m.out_shape))
    t = float(np.sqrt(a * out / max(w, 1.0)))  # T d = |A|, T p = |out|, d p = |W|
    return t, a / t, out / t


def strategies(plan: Plan, keep_fraction: float) -> Dict[Path, str]:
    """Per matched product/convolution: ``"ghost"``, ``"keep"`` or ``"recompute"``.

    * ``"ghost"``: Gram norms ⟨AAᵀ, GGᵀ⟩ (cost ~T²(d+p), memory T²) and book-keeping;
    * ``"keep"``: per-example gradients AᵀG kept (memory d·p) for the norms and the
      clipped sum; besides the contraction book-keeping also pays, it costs ~2dp;
    * ``"recompute"``: per-example norms, the clipped sum from a second backward pass
      that must run down to this op (for layers whose gradients do not fit).

    A layer needs per-example gradients when its Grams would be larger
    (2T² > dp, the book-keeping rule). The kept gradients may take at most
    ``keep_fraction`` times all matched ops' activations: first the layers that
    need them, bottom-up (the lowest are the dearest to recompute); then, by
    FLOPs saved per element, the layers whose Grams cost more than keeping
    (T²(d+p) > 2dp: long sequences, e.g. a ViT's attention projections). Scanned
    ops and the uses of shared weights always keep or use Grams.
    """
    ops = sorted((m for m in plan.matched.values() if m.kind != "embed"), key=lambda m: m.path)
    budget = keep_fraction * sum(float(np.prod(m.act_shape)) + float(np.prod(m.out_shape)) for m in ops)
    out: Dict[Path, str] = {}
    optional = []
    for m in ops:
        t, d, p = _dims(m)
        needs_grads = 2 * t * t > d * p
        if m.scan_length or m.leaf in plan.shared:
            out[m.path] = "keep" if needs_grads else "ghost"
        elif needs_grads:
            out[m.path] = "keep" if d * p <= budget else "recompute"
            budget -= d * p if out[m.path] == "keep" else 0.0
        else:
            out[m.path] = "ghost"
            saving = t * t * (d + p) - 2 * d * p
            if saving > 0:
                optional.append((saving / (d * p), m.path, d * p))
    for _, path, size in sorted(optional, reverse=True):
        if size <= budget:
            out[path] = "keep"
            budget -= size
    return out


def _layer_ops(m: MatchedOp, act, g, strategy: str) -> LayerOps:
    """The norms and clipped sum of one op by its ``strategy`` (see :func:`strategies`)."""
    if m.kind == "embed":
        return _embed_ops(m, act, g)
    if m.kind == "conv" and all(d == 1 for d in m.params["lhs_dilation"]):
        conv_sum = lambda gk, factor, keep, acc_dtype: _conv_chunked(m, act, gk, "sum", factor, keep, acc_dtype)
        if strategy == "ghost":  # patch Gram norms, book-keeping with the kept output gradient
            return LayerOps(lambda: _conv_chunked(m, act, g, "ghost_norms"),
                            lambda factor, keep, acc_dtype, g_again=None: conv_sum(g, factor, keep, acc_dtype))
        if strategy == "keep":
            return _instantiated_ops(*_conv_chunked(m, act, g, "keep"))
        return LayerOps(lambda: _conv_chunked(m, act, g, "norms"),
                        lambda factor, keep, acc_dtype, g_again: conv_sum(g_again, factor, keep, acc_dtype),
                        recompute=True)
    f = _dot_factors if m.kind == "dot" else _conv_factors
    a2, g2, to_weight = f(m, act, g)
    instantiate = strategy != "ghost"
    if strategy == "keep":
        dtype = _per_example_dtype(a2, g2)
        return _instantiated_ops(jnp.einsum("btd,btp->bdp", a2.astype(dtype), g2.astype(dtype)), to_weight)

    def sq_norms():
        a32, g32 = a2.astype(jnp.float32), g2.astype(jnp.float32)
        if instantiate:
            return jnp.sum(jnp.square(jnp.einsum("btd,btp->bdp", a32, g32)), axis=(1, 2))
        # Ghost norm: ‖A_iᵀG_i‖² = ⟨A_iA_iᵀ, G_iG_iᵀ⟩, never forming A_iᵀG_i.
        gram_a = jnp.einsum("btd,bsd->bts", a32, a32)
        gram_g = jnp.einsum("btp,bsp->bts", g32, g32)
        return jnp.sum(gram_a * gram_g, axis=(1, 2))

    def weighted(factor, keep, acc_dtype, g_again=None):
        # Book-keeping: Σ_i c_i A_iᵀG_i as one contraction of A with c·G (G from
        # the second backward pass when this op's G was not kept).
        gk = g2 if g_again is None else f(m, act, g_again)[1]
        a = _zero_rows(a2, keep).astype(acc_dtype)
        cg = _zero_rows(gk, keep).astype(acc_dtype) * jnp.where(keep, factor, 0).astype(acc_dtype)[:, None, None]
        return to_weight(jnp.einsum("btd,btp->dp", a, cg))

    return LayerOps(sq_norms, weighted, recompute=instantiate)


def _scanned_ops(m: MatchedOp, act, g) -> LayerOps:
    """An op inside a scan: (B, L, ...) activations and output gradients, one slice
    of the stacked leaf per iteration. The squared norm of the leaf's gradient is
    the sum over slices; the clipped sum is formed slice by slice (never by a
    second backward pass, which a scan cannot stop in the middle of)."""

    strategy = strategies(Plan({m.path: m}, ()), 0.0).get(m.path, "ghost")

    def per_slice(a, gl):
        return _layer_ops(m, a, gl, strategy)

    def sq_norms():
        return jnp.sum(jax.vmap(lambda a, gl: per_slice(a, gl).sq_norms(), in_axes=(1, 1))(act, g), axis=0)

    def weighted(factor, keep, acc_dtype, g_again=None):
        return jax.vmap(lambda a, gl: _undo_chain(per_slice(a, gl).weighted(factor, keep, acc_dtype), m.chain),
                        in_axes=(1, 1))(act, g)

    return LayerOps(sq_norms, weighted)


def _use_factors(m: MatchedOp, act, g) -> Tuple:
    """What a cross term needs of one use: ``("dot", A, G)`` or ``("embed", idx, e)``."""
    if m.kind == "dot":
        a2, g2, _ = _dot_factors(m, act, g)
        return ("dot", a2, g2)
    vocab, dim = m.weight_shape
    bsz = act.shape[0]
    idx = act.reshape(bsz, -1)
    valid = (idx >= 0) & (idx < vocab)
    return ("embed", idx, jnp.where(valid[..., None], g.reshape(bsz, -1, dim), 0))


def _cross(mk: MatchedOp, ml: MatchedOp, acts, g_taps):
    """``(B,)`` ⟨U_k, U_l⟩ of two uses of one leaf (see :mod:`dpjax.weight_sharing`)."""
    if mk.kind == "dot" and ml.kind == "embed":
        mk, ml = ml, mk
    rule = weight_sharing.pair_rule(mk, ml)
    return weight_sharing.cross_term(rule, _use_factors(mk, acts[mk.path], g_taps[mk.path]),
                                     _use_factors(ml, acts[ml.path], g_taps[ml.path]))


def _undo_chain(x, chain):
    """Map a gradient w.r.t. the weight operand back to the parameter leaf."""
    for name, params, in_shape in reversed(chain):
        if name == "transpose":
            x = jnp.transpose(x, np.argsort(params["permutation"]))
        elif name == "scale":
            x = x * params["value"]
        else:  # reshape, squeeze, expand_dims: a reshape back; casts and copies: nothing
            x = x.reshape(in_shape)
    return x


def _zero_rows(x, keep):
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)


def fast_engine(single_example_loss: Callable, params, chunk, args, keep_fraction: Optional[float] = None):
    """Per-example losses, per-leaf squared norms, and a book-keeping weighted sum.

    ``single_example_loss(params, example, *args)`` returns ``(loss, aux)``.
    Returns ``(losses, sq_norms, weighted_sum, plan, aux)`` (``aux`` stacked
    over examples): ``sq_norms`` is a list (one per
    parameter leaf) of ``(B,)`` float32 squared norms of that leaf's per-example
    gradient; ``weighted_sum(factors, keep)`` returns the list of
    ``sum_i factors[leaf][i] * grad_i[leaf]`` with rows where ``keep`` is False
    removed first (so NaN rows cannot leak into the sum). ``keep_fraction``
    (default :data:`KEEP_FRACTION`): see :func:`dpjax.clipped_grad`.
    """
    keep_fraction = KEEP_FRACTION if keep_fraction is None else keep_fraction
    leaves, treedef = jax.tree_util.tree_flatten(params)
    num_leaves = len(leaves)
    example = jax.tree_util.tree_map(lambda x: x[0], chunk)
    arg_leaves, arg_def = jax.tree_util.tree_flatten(args)

    aux_def = []

    def flat_loss(leaf_list, ex, arg_list):
        loss, aux = single_example_loss(
            jax.tree_util.tree_unflatten(treedef, leaf_list), ex, *jax.tree_util.tree_unflatten(arg_def, arg_list)
        )
        aux_leaves, tree = jax.tree_util.tree_flatten(aux)
        aux_def.append(tree)
        return [loss] + aux_leaves

    closed = jax.make_jaxpr(flat_loss)(leaves, example, arg_leaves)
    plan = make_plan(closed.jaxpr, num_leaves)
    bsz = jax.tree_util.tree_leaves(chunk)[0].shape[0]
    taps0 = {k: jnp.zeros((bsz,) + ((m.scan_length,) if m.scan_length else ()) + m.out_shape, m.out_dtype)
             for k, m in plan.matched.items()}
    deltas0 = {i: jnp.zeros((bsz,) + leaves[i].shape, leaves[i].dtype) for i in plan.fallback}

    def per_example(taps, deltas, ex):
        leaf_vals = [leaves[i] + deltas[i] if i in deltas else leaves[i] for i in range(num_leaves)]
        flat_in = leaf_vals + jax.tree_util.tree_leaves(ex) + arg_leaves
        acts: Dict[Path, jax.Array] = {}
        loss, *aux_leaves = interpret(closed.jaxpr, closed.consts, flat_in, plan, taps, acts)
        return loss, (acts, aux_leaves)

    def batched(taps, deltas):
        losses, (acts, aux_leaves) = jax.vmap(per_example)(taps, deltas, chunk)
        return losses, (losses, acts, aux_leaves)

    _, vjp_fn, (losses, acts, aux_leaves) = jax.vjp(batched, taps0, deltas0, has_aux=True)
    g_taps, g_deltas = vjp_fn(jnp.ones((bsz,), losses.dtype))
    aux = jax.tree_util.tree_unflatten(aux_def[0], aux_leaves)

    ops_of: Dict[Path, Tuple[LayerOps, Any]] = {}
    uses_of: Dict[int, List[Path]] = {}
    strategy = strategies(plan, keep_fraction)
    for k, m in plan.matched.items():
        if m.scan_length:
            ops_of[k] = (_scanned_ops(m, acts[k], g_taps[k]), ())
        else:
            ops_of[k] = (_layer_ops(m, acts[k], g_taps[k], strategy.get(k, "ghost")), m.chain)
        uses_of.setdefault(m.leaf, []).append(k)
    sq_norms: List[Optional[jax.Array]] = [None] * num_leaves
    scale = {k: chain_scale(m.chain) for k, m in plan.matched.items()}
    for leaf, keys in uses_of.items():
        sq_norms[leaf] = sum(scale[k] ** 2 * ops_of[k][0].sq_norms() for k in keys)
        for i, ki in enumerate(keys):
            for kj in keys[i + 1:]:
                cross = _cross(plan.matched[ki], plan.matched[kj], acts, g_taps)
                sq_norms[leaf] = sq_norms[leaf] + 2.0 * scale[ki] * scale[kj] * cross
    for i in plan.fallback:
        g = g_deltas[i].astype(jnp.float32)
        sq_norms[i] = jnp.sum(jnp.square(g).reshape(bsz, -1), axis=1)
    recompute = any(ops.recompute for ops, _ in ops_of.values())

    def weighted_sum(factors: List[jax.Array], keep: jax.Array):
        # The second backward pass (only if some op did not keep its gradients):
        # its cotangent depends on the norms, so XLA runs it after them and cannot
        # merge it with the first; it is pruned below the lowest op that uses it.
        g_again = vjp_fn(keep.astype(losses.dtype))[0] if recompute else {}
        out = []
        for i in range(num_leaves):
            acc_dtype = jnp.promote_types(leaves[i].dtype, jnp.float32)
            if i in uses_of:
                total = 0
                for k in uses_of[i]:
                    ops, chain = ops_of[k]
                    w = ops.weighted(factors[i], keep, acc_dtype, g_again.get(k) if ops.recompute else None)
                    total = total + _undo_chain(w, chain).astype(acc_dtype)
                out.append(total)
            else:
                g = _zero_rows(g_deltas[i], keep).astype(acc_dtype)
                out.append(jnp.tensordot(factors[i].astype(acc_dtype), g, axes=1))
        return out

    return losses, sq_norms, weighted_sum, plan, aux


def plan_for(loss_fn: Callable, params, example_batch, *args) -> Plan:
    """The fast-path plan for ``loss_fn`` (for inspection): which leaves are fast."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    one = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[:1], example_batch)
    closed = jax.make_jaxpr(lambda lv: loss_fn(jax.tree_util.tree_unflatten(treedef, lv), one, *args))(leaves)
    return make_plan(closed.jaxpr, len(leaves))
