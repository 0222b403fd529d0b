"""Per-example separability (privacy invariant 8): refuse what per-example clipping cannot bound.

``clipped_grad`` evaluates the loss on batches of one example. That is exactly
DP-SGD when the loss is a mean of per-example terms. It is silently wrong when
the model or the loss mixes examples:

* **batch statistics** (BatchNorm in training mode): each example would be
  normalised by its own statistics, a different model from the one you train
  without privacy;
* **batch-level losses** (a log-sum-exp over the batch, a Gram of the batch,
  contrastive terms);
* **one random key shared by every example** (dropout with a key passed in or
  closed over): every example gets the same mask.

:func:`check` walks the jaxpr of the loss on a batch of one and tracks where the
example axis is. It refuses, naming the cause and the fix:

* an operation that combines a value still indexed by the example axis with a
  parameter-dependent value that was *reduced over* the example axis (how batch
  statistics and batch-level normalisers look), or a product whose two
  parameter-dependent operands both keep their example axis free (a Gram over the
  batch);
* a random draw whose key does not depend on the example (pass
  ``grad_fn(..., rng=key)``: each example then gets its own key).

The walk is conservative in the other direction: where it loses track of the
example axis (``scan``, ``while``, ``cond``, unusual reshapes) it stops judging
that value rather than guess, so a valid model is never refused for an
operation it does not understand.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

from jax.extend import core as jex_core

__all__ = ["CrossExampleError", "SharedRandomnessError", "check"]

_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_REDUCE_OPS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
               "argmax", "argmin", "reduce_precision_sum")
_RANDOM_DRAWS = ("random_bits", "threefry2x32")
_VIEWS = ("broadcast_in_dim", "reshape", "transpose", "squeeze", "convert_element_type", "expand_dims", "copy")


class CrossExampleError(ValueError):
    """The model or loss combines examples, which per-example clipping cannot bound."""


class SharedRandomnessError(ValueError):
    """Every example would draw the same random numbers (e.g. one dropout mask)."""


@dataclasses.dataclass(frozen=True)
class _State:
    """What a value depends on. ``kind``: ``"C"`` not on the example, ``"B"`` on it
    with the example axis at ``axis``, ``"R"`` on it with that axis reduced away,
    ``"U"`` on it in a way the walk does not follow. ``params``: on the parameters."""

    kind: str
    axis: Optional[int] = None
    params: bool = False


_CONST = _State("C")


def _is_var(v) -> bool:
    return not isinstance(v, jex_core.Literal)


def _where(eqn) -> str:
    """``" at file:line (function)"`` of the user code that emitted ``eqn``, or ``""``."""
    try:
        from jax._src import source_info_util

        where = source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - private API: the message just loses the location
        where = ""
    return f" at {where}" if where else ""


def _inner_jaxpr(eqn):
    for name in _CALL_PARAMS:
        sub = eqn.params.get(name)
        if isinstance(sub, jex_core.ClosedJaxpr):
            return sub.jaxpr
        if isinstance(sub, jex_core.Jaxpr):
            return sub
    return None


def _dot_state(eqn, ins: Sequence[_State]) -> _State:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    params = lhs.params or rhs.params
    n_l, n_r = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
    l_free = [i for i in range(n_l) if i not in lc and i not in lb]
    r_free = [i for i in range(n_r) if i not in rc and i not in rb]

    def position(st, contracting, batch, free, offset):
        if st.axis in contracting:
            return "reduced", None
        if st.axis in batch:
            return "batch", list(batch).index(st.axis)
        return "free", offset + free.index(st.axis)

    where = {}
    for side, st, con, bat, free, off in (("l", lhs, lc, lb, l_free, len(lb)),
                                          ("r", rhs, rc, rb, r_free, len(lb) + len(l_free))):
        if st.kind == "B":
            where[side] = position(st, con, bat, free, off)
    if len(where) == 2:
        (kl, pl), (kr, pr) = where["l"], where["r"]
        if kl == kr == "batch" and pl == pr:
            return _State("B", pl, params)
        if kl == kr == "free" and lhs.params and rhs.params:
            raise CrossExampleError(
                f"the loss multiplies two parameter-dependent values over the batch axis{_where(eqn)}: "
                "a Gram or similarity matrix of the batch (e.g. a contrastive loss) mixes examples, and "
                "per-example clipping cannot bound one example's influence on it. Write the loss as a mean "
                "of per-example terms."
            )
        return _State("U", None, params)
    if len(where) == 1:
        kind, pos = next(iter(where.values()))
        if kind == "reduced":
            return _State("R", None, params)
        return _State("B", pos, params)
    return _State("U" if any(s.kind in "RU" for s in ins) else "C", None, params)


def _shape_state(eqn, st: _State) -> _State:
    """The example axis through reshape-like and reducing ops (``st`` is ``"B"``)."""
    name, p = eqn.primitive.name, eqn.params
    in_shape = tuple(eqn.invars[0].aval.shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if name in _REDUCE_OPS:
        axes = tuple(p.get("axes", ()))
        if st.axis in axes:
            return _State("R", None, st.params)
        return _State("B", st.axis - sum(a < st.axis for a in axes), st.params)
    if name == "broadcast_in_dim":
        return _State("B", tuple(p["broadcast_dimensions"])[st.axis], st.params)
    if name == "transpose":
        return _State("B", tuple(p["permutation"]).index(st.axis), st.params)
    if name == "squeeze":
        dims = tuple(p["dimensions"])
        if st.axis in dims:
            return _State("U", None, st.params)
        return _State("B", st.axis - sum(d < st.axis for d in dims), st.params)
    if name == "reshape":
        # Follows the example axis when it stays leading with the same size.
        if st.axis == 0 and out_shape[:1] == in_shape[:1]:
            return _State("B", 0, st.params)
        return _State("U", None, st.params)
    if name == "conv_general_dilated":
        dn = p["dimension_numbers"]
        if st.axis == dn.lhs_spec[0]:
            return _State("B", dn.out_spec[0], st.params)
        return _State("U", None, st.params)
    return _State("U", None, st.params)


def _elementwise(eqn, ins: Sequence[_State]) -> _State:
    params = any(s.params for s in ins)
    kinds = {s.kind for s in ins}
    if "B" in kinds and any(s.kind == "R" and s.params for s in ins):
        raise CrossExampleError(
            f"the model or loss combines each example with statistics of the whole batch "
            f"({eqn.primitive.name}{_where(eqn)}), as BatchNorm in training mode or a batch-level "
            "loss does. dpjax evaluates the loss on one example at a time, so each example would see "
            "only its own statistics. Use GroupNorm or LayerNorm, or BatchNorm with frozen statistics "
            "(use_running_average=True), and a loss that is a mean of per-example terms."
        )
    if "U" in kinds:
        return _State("U", None, params)
    axes = {s.axis for s in ins if s.kind == "B"}
    if len(axes) == 1:
        return _State("B", axes.pop(), params)
    if axes:
        return _State("U", None, params)
    return _State("R" if "R" in kinds else "C", None, params)


def _broadcasts_to(v, out) -> bool:
    """``v`` has the output's rank and each of its dimensions is the output's or 1 (elementwise ops)."""
    shape, target = tuple(getattr(v.aval, "shape", ())), tuple(getattr(out.aval, "shape", ()))
    return len(shape) == len(target) and all(a == b or a == 1 for a, b in zip(shape, target))


def _walk(jaxpr, states: Dict, shared_draws: list) -> None:
    def state(v):
        return states.get(v, _CONST) if _is_var(v) else _CONST

    for eqn in jaxpr.eqns:
        ins = [state(v) for v in eqn.invars]
        name = eqn.primitive.name
        inner = _inner_jaxpr(eqn) if name not in ("scan", "while", "cond") else None
        if name in _RANDOM_DRAWS and ins and ins[0].kind == "C":
            shared_draws.append(_where(eqn) or f" ({name})")
        if inner is not None and len(inner.invars) == len(eqn.invars):
            sub = {iv: s for iv, s in zip(inner.invars, ins)}
            _walk(inner, sub, shared_draws)
            outs = [sub.get(ov, _CONST) if _is_var(ov) else _CONST for ov in inner.outvars]
        elif all(s.kind == "C" for s in ins):
            outs = [_State("C", None, any(s.params for s in ins))] * len(eqn.outvars)
        elif (name in _VIEWS and sum(s.kind != "C" for s in ins) == 1 and ins[0].kind == "R"):
            outs = [_State("R", None, any(s.params for s in ins))]  # still a batch statistic
        elif name == "dot_general":
            outs = [_dot_state(eqn, ins)]
        elif name == "gather" and ins[0].kind == "C" and ins[1].kind == "B" and ins[1].axis == 0:
            outs = [_State("B", 0, ins[0].params)]  # a row lookup keeps the index's example axis
        elif (len(eqn.outvars) == 1 and sum(s.kind != "C" for s in ins) == 1 and ins[0].kind == "B"
              and name in _REDUCE_OPS + ("broadcast_in_dim", "transpose", "squeeze", "reshape",
                                         "conv_general_dilated")):
            outs = [_shape_state(eqn, dataclasses.replace(ins[0], params=any(s.params for s in ins)))]
        elif all(_broadcasts_to(v, eqn.outvars[0]) for v, s in zip(eqn.invars, ins) if s.kind != "C"):
            outs = [_elementwise(eqn, ins)] * len(eqn.outvars)
        else:
            outs = [_State("U", None, any(s.params for s in ins))] * len(eqn.outvars)
        for v, s in zip(eqn.outvars, outs):
            states[v] = s


def check(jaxpr, num_param_leaves: int, num_example_leaves: int, *, rng_given: bool = False) -> None:
    """Refuse a loss jaxpr (of a batch of one) that mixes examples or shares randomness.

    ``jaxpr``'s inputs are the parameter leaves, then the example's leaves (each
    with a leading axis of size 1), then anything else (held fixed).
    """
    states: Dict = {}
    for v in jaxpr.invars[:num_param_leaves]:
        states[v] = _State("C", None, True)
    for v in jaxpr.invars[num_param_leaves:num_param_leaves + num_example_leaves]:
        shape = getattr(v.aval, "shape", ())
        states[v] = _State("B", 0) if len(shape) >= 1 else _State("U")
    shared: list = []
    _walk(jaxpr, states, shared)
    if shared:
        fix = ("pass a fresh key each step as grad_fn(params, batch, rng=key): dpjax splits it into one "
               "key per example and calls loss_fn(params, batch, ..., rng=example_key)")
        raise SharedRandomnessError(
            f"the loss draws random numbers (dropout?) from a key that every example shares"
            f"{shared[0]}{' and elsewhere' if len(shared) > 1 else ''}, so every example would get the same "
            f"mask. To give each example its own randomness, {fix}."
            + (" The key passed with rng= must be the one the loss uses." if rng_given else "")
        )
