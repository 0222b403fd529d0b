"""Per-example norms of a weight used more than once, without its per-example gradient.

A tied embedding (a row lookup ``E[tok]`` and an LM head ``h Eᵀ``) or a layer
applied at several places has, per example, the gradient ``Σ_k U_k`` over its
uses, so its squared norm is ``Σ_k ‖U_k‖² + 2 Σ_{k<l} ⟨U_k, U_l⟩``. The fast
path already has each ``‖U_k‖²``; this module adds the cross terms from the
uses' activations and output gradients:

* two matrix products with the same layout of the weight (``U = AᵀG``):
  ``⟨A_kᵀG_k, A_lᵀG_l⟩ = ⟨A_k A_lᵀ, G_k G_lᵀ⟩``, a ``T_k × T_l`` cross Gram;
* a row lookup (rows ``tok_t`` get the output gradients ``e_t``) and a product
  whose output axis runs over the table's rows (the LM head ``h Eᵀ``, output
  gradient ``G``): ``Σ_t Σ_s G[s, tok_t] ⟨h_s, e_t⟩``, ``T × T``; no
  vocabulary-sized array per example;
* two row lookups: ``Σ_{t,s} [tok_t = tok'_s] ⟨e_t, e'_s⟩``.

Uses whose layouts fit none of these make the leaf fall back to its exact
per-example gradient, as before.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

__all__ = ["pair_rule", "shareable", "cross_term"]


def _forward_chain(x: np.ndarray, chain, operand_shape) -> np.ndarray:
    """Apply a use's view chain (leaf -> weight operand) to an array laid out like the leaf."""
    for i, (name, params, _) in enumerate(chain):
        out_shape = chain[i + 1][2] if i + 1 < len(chain) else operand_shape
        if name == "transpose":
            x = np.transpose(x, params["permutation"])
        elif name != "scale":  # a constant factor does not move elements
            x = x.reshape(out_shape)
    return x


def _dot_layout(m) -> np.ndarray:
    """Leaf element index at each entry of the (d, p) matrix ``AᵀG`` of a matched product."""
    (lc, rc), _ = m.params["dimension_numbers"]
    w_con = list(lc if m.weight_operand == 0 else rc)
    w_free = [i for i in range(len(m.weight_shape)) if i not in w_con]
    leaf_shape = m.chain[0][2] if m.chain else m.weight_shape
    operand = _forward_chain(np.arange(int(np.prod(leaf_shape))).reshape(leaf_shape), m.chain, m.weight_shape)
    d = int(np.prod([m.weight_shape[i] for i in w_con], dtype=np.int64))
    return np.transpose(operand, w_con + w_free).reshape(d, -1)


def _table_layout(m) -> np.ndarray:
    vocab, dim = m.weight_shape
    return np.arange(vocab * dim).reshape(vocab, dim)


def pair_rule(mk, ml) -> Optional[str]:
    """How the cross term of two uses of one leaf is formed, or None if no rule fits."""
    kinds = (mk.kind, ml.kind)
    if kinds == ("dot", "dot"):
        return "dot_dot" if np.array_equal(_dot_layout(mk), _dot_layout(ml)) else None
    if kinds == ("embed", "embed"):
        return "embed_embed" if not mk.chain and not ml.chain else None
    if set(kinds) == {"dot", "embed"}:
        dot, table = (mk, ml) if mk.kind == "dot" else (ml, mk)
        if table.chain:
            return None
        # The head's (d, p) matrix must be the table transposed: p runs over the rows.
        return "embed_dot" if np.array_equal(_dot_layout(dot), _table_layout(table).T) else None
    return None


def shareable(uses: Sequence) -> bool:
    """Every pair of ``uses`` (matched ops of one leaf) has a cross-term rule."""
    if any(u.kind not in ("dot", "embed") or u.scan_length for u in uses):
        return False
    return all(pair_rule(uses[i], uses[j]) is not None for i in range(len(uses)) for j in range(i + 1, len(uses)))


def cross_term(rule: str, k: Tuple, l: Tuple):
    """``(B,)`` float32 ``⟨U_k, U_l⟩`` per example.

    ``k``/``l``: ``("dot", a (B,T,d), g (B,T,p))`` or ``("embed", idx (B,T), e (B,T,D))``
    (out-of-range rows already zeroed in ``e``), in the order of ``rule``'s name
    for ``embed_dot`` (the lookup first).
    """
    f32 = jnp.float32
    if rule == "dot_dot":
        (_, ak, gk), (_, al, gl) = k, l
        ga = jnp.einsum("btd,bsd->bts", ak.astype(f32), al.astype(f32))
        gg = jnp.einsum("btp,bsp->bts", gk.astype(f32), gl.astype(f32))
        return jnp.sum(ga * gg, axis=(1, 2))
    if rule == "embed_embed":
        (_, ik, ek), (_, il, el) = k, l
        same = ik[:, :, None] == il[:, None, :]
        gram = jnp.einsum("btd,bsd->bts", ek.astype(f32), el.astype(f32))
        return jnp.sum(jnp.where(same, gram, 0.0), axis=(1, 2))
    if rule == "embed_dot":
        (_, idx, e), (_, h, g) = k, l
        vocab = g.shape[-1]
        cols = jnp.clip(idx, 0, vocab - 1)
        g_at = jnp.take_along_axis(g.astype(f32), cols[:, None, :], axis=2)  # (B, T_h, T_e): G[s, tok_t]
        m = jnp.einsum("bsd,btd->bst", h.astype(f32), e.astype(f32))
        return jnp.sum(g_at * m, axis=(1, 2))
    raise ValueError(f"unknown cross-term rule {rule!r}")
