"""The real-model zoo: the architectures people fine-tune, written here in Flax Linen.

Each model comes at two sizes: ``"small"`` (the test suite compares the fast
path with vmap on it) and ``"bench"`` (``python -m benchmarks.zoo``, sized for a
2-core CPU; the structure is that of the real model, the widths are smaller).

==============  ===========================================================
``gpt2``        decoder, causal attention, learned positions, tied input/output
                embedding (``Embed.attend``), vocabulary 32,768 at bench size
``bert``        encoder, learned positions, pooled first token, classifier
``vit``         patch convolution, class token and position parameters, encoder
``resnet18``    ResNet-18 layout (4 stages of 2 basic blocks) with GroupNorm
``scan``        residual MLP blocks stacked with ``nn.scan`` (stacked kernels)
``remat``       the same blocks with ``nn.remat`` inside ``nn.scan``
``lora``        the encoder with LoRA adapters on every projection; only the
                adapters train (the base weights are frozen constants)
==============  ===========================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

SIZES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "gpt2": {"small": dict(vocab=50, d=16, heads=2, layers=2, seq=6),
             "bench": dict(vocab=32768, d=128, heads=4, layers=2, seq=32)},
    "bert": {"small": dict(vocab=40, d=16, heads=2, layers=2, seq=6, classes=5),
             "bench": dict(vocab=8192, d=128, heads=4, layers=2, seq=32, classes=10)},
    "vit": {"small": dict(hw=8, patch=4, d=16, heads=2, layers=2, classes=5),
            "bench": dict(hw=32, patch=4, d=128, heads=4, layers=2, classes=10)},
    "resnet18": {"small": dict(hw=8, widths=(4, 8, 8, 8), classes=5),
                 "bench": dict(hw=32, widths=(16, 32, 64, 128), classes=10)},
    "scan": {"small": dict(inputs=12, d=16, blocks=3, classes=5),
             "bench": dict(inputs=256, d=256, blocks=4, classes=10)},
    "remat": {"small": dict(inputs=12, d=16, blocks=3, classes=5),
              "bench": dict(inputs=256, d=256, blocks=4, classes=10)},
    "lora": {"small": dict(vocab=40, d=16, heads=2, layers=2, seq=6, classes=5, rank=2),
             "bench": dict(vocab=8192, d=128, heads=4, layers=2, seq=32, classes=10, rank=8)},
}
MODELS = tuple(SIZES)
BENCH_BATCH = {"gpt2": 8, "bert": 16, "vit": 16, "resnet18": 16, "scan": 32, "remat": 32, "lora": 16}


class Dense(nn.Module):
    """``nn.Dense``, or with LoRA adapters: ``x W + b + (x A)(B · scale)``."""

    features: int
    rank: int = 0
    scale: float = 2.0

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.features, name="base")(x)
        if self.rank:
            a = self.param("lora_a", nn.initializers.normal(0.02), (x.shape[-1], self.rank))
            b = self.param("lora_b", nn.initializers.normal(0.02), (self.rank, self.features))
            y = y + (x @ a) @ (b * self.scale)
        return y


class SelfAttention(nn.Module):
    d: int
    heads: int
    causal: bool = False
    rank: int = 0

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        hd = self.d // self.heads
        q, k, v = (Dense(self.d, self.rank, name=n)(x).reshape(b, t, self.heads, hd) for n in ("q", "k", "v"))
        logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
        if self.causal:
            logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
        out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v).reshape(b, t, self.d)
        return Dense(self.d, self.rank, name="o")(out)


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    d: int
    heads: int
    causal: bool = False
    rank: int = 0

    @nn.compact
    def __call__(self, x):
        x = x + SelfAttention(self.d, self.heads, self.causal, self.rank)(nn.LayerNorm()(x))
        h = nn.gelu(Dense(4 * self.d, self.rank)(nn.LayerNorm()(x)))
        return x + Dense(self.d, self.rank)(h)


class GPT2(nn.Module):
    vocab: int
    d: int
    heads: int
    layers: int
    seq: int

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.d, name="wte")
        x = embed(tokens) + nn.Embed(self.seq, self.d, name="wpe")(jnp.arange(tokens.shape[1]))[None]
        for _ in range(self.layers):
            x = Block(self.d, self.heads, causal=True)(x)
        return embed.attend(nn.LayerNorm()(x))  # the output layer is the input embedding


class Encoder(nn.Module):
    """BERT-style encoder classifier (``rank > 0``: with LoRA adapters)."""

    vocab: int
    d: int
    heads: int
    layers: int
    seq: int
    classes: int
    rank: int = 0

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d)(tokens) + nn.Embed(self.seq, self.d)(jnp.arange(tokens.shape[1]))[None]
        for _ in range(self.layers):
            x = Block(self.d, self.heads, rank=self.rank)(x)
        pooled = jnp.tanh(Dense(self.d, self.rank, name="pooler")(nn.LayerNorm()(x)[:, 0]))
        return nn.Dense(self.classes, name="head")(pooled)


class ViT(nn.Module):
    hw: int
    patch: int
    d: int
    heads: int
    layers: int
    classes: int

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(self.d, (self.patch, self.patch), strides=(self.patch, self.patch), padding="VALID")(images)
        b = x.shape[0]
        x = x.reshape(b, -1, self.d)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.d)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.d))
        for _ in range(self.layers):
            x = Block(self.d, self.heads)(x)
        return nn.Dense(self.classes)(nn.LayerNorm()(x)[:, 0])


class BasicBlock(nn.Module):
    width: int
    stride: int

    @nn.compact
    def __call__(self, x):
        groups = min(8, self.width // 2) or 1
        y = nn.relu(nn.GroupNorm(groups)(nn.Conv(self.width, (3, 3), (self.stride, self.stride), use_bias=False)(x)))
        y = nn.GroupNorm(groups)(nn.Conv(self.width, (3, 3), use_bias=False)(y))
        if self.stride != 1 or x.shape[-1] != self.width:
            x = nn.GroupNorm(groups)(nn.Conv(self.width, (1, 1), (self.stride, self.stride), use_bias=False)(x))
        return nn.relu(x + y)


class ResNet18(nn.Module):
    widths: Tuple[int, ...]
    classes: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(min(8, self.widths[0] // 2))(nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)))
        for stage, width in enumerate(self.widths):
            for i in range(2):
                x = BasicBlock(width, 2 if (i == 0 and stage > 0) else 1)(x)
        return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


class ResidualMLP(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(self.d)(nn.gelu(nn.Dense(self.d)(nn.LayerNorm()(x)))), None


class ScanStack(nn.Module):
    d: int
    blocks: int
    classes: int
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.d)(x)
        block = nn.remat(ResidualMLP) if self.remat else ResidualMLP
        x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.blocks)(self.d)(x, None)
        return nn.Dense(self.classes)(x)


@dataclasses.dataclass
class ZooModel:
    """A zoo model at one size: trainable parameters, loss and a batch maker."""

    name: str
    size: str
    params: Any
    loss_fn: Callable  # loss_fn(params, batch) -> mean loss
    make_batch: Callable  # make_batch(batch_size, seed) -> dict of numpy arrays

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(self.params)))

    def batch(self, batch_size: int, seed: int = 0) -> dict:
        return jax.tree_util.tree_map(jnp.asarray, self.make_batch(batch_size, seed))


def _classification(model, params_of, x_of, classes):
    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params_of(p), b["x"]), b["y"]).mean()

    def make_batch(n, seed):
        rng = np.random.default_rng([seed, n])
        return {"x": x_of(rng, n), "y": rng.integers(0, classes, n).astype(np.int32)}

    return loss_fn, make_batch


def build(name: str, size: str = "small", seed: int = 0) -> ZooModel:
    """The zoo model ``name`` at ``size`` (``"small"`` or ``"bench"``) with initial parameters."""
    s = SIZES[name][size]
    key = jax.random.PRNGKey(seed)
    if name == "gpt2":
        model = GPT2(s["vocab"], s["d"], s["heads"], s["layers"], s["seq"])
        params = model.init(key, jnp.zeros((1, s["seq"]), jnp.int32))

        def loss_fn(p, b):  # next-token prediction, mean over positions
            logits = model.apply(p, b["x"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

        def make_batch(n, seed_):
            tokens = np.random.default_rng([seed_, n]).integers(0, s["vocab"], (n, s["seq"] + 1)).astype(np.int32)
            return {"x": tokens[:, :-1], "y": tokens[:, 1:]}

        return ZooModel(name, size, params, loss_fn, make_batch)
    if name in ("bert", "lora"):
        model = Encoder(s["vocab"], s["d"], s["heads"], s["layers"], s["seq"], s["classes"], s.get("rank", 0))
        x_of = lambda rng, n: rng.integers(0, s["vocab"], (n, s["seq"])).astype(np.int32)  # noqa: E731
        example = jnp.zeros((1, s["seq"]), jnp.int32)
    elif name == "vit":
        model = ViT(s["hw"], s["patch"], s["d"], s["heads"], s["layers"], s["classes"])
        x_of = lambda rng, n: rng.normal(size=(n, s["hw"], s["hw"], 3)).astype(np.float32)  # noqa: E731
        example = jnp.zeros((1, s["hw"], s["hw"], 3))
    elif name == "resnet18":
        model = ResNet18(tuple(s["widths"]), s["classes"])
        x_of = lambda rng, n: rng.normal(size=(n, s["hw"], s["hw"], 3)).astype(np.float32)  # noqa: E731
        example = jnp.zeros((1, s["hw"], s["hw"], 3))
    else:
        model = ScanStack(s["d"], s["blocks"], s["classes"], remat=name == "remat")
        x_of = lambda rng, n: rng.normal(size=(n, s["inputs"])).astype(np.float32)  # noqa: E731
        example = jnp.zeros((1, s["inputs"]))
    variables = model.init(key, example)
    if name != "lora":
        loss_fn, make_batch = _classification(model, lambda p: p, x_of, s["classes"])
        return ZooModel(name, size, variables, loss_fn, make_batch)
    # LoRA: only the adapters (and the classifier head) train; the rest is frozen.
    flat = traverse_util.flatten_dict(variables["params"])
    trains = lambda path: path[-1].startswith("lora_") or path[0] == "head"  # noqa: E731
    frozen = {k: v for k, v in flat.items() if not trains(k)}
    trainable = traverse_util.unflatten_dict({k: v for k, v in flat.items() if trains(k)})

    def params_of(p):
        return {"params": traverse_util.unflatten_dict({**frozen, **traverse_util.flatten_dict(p)})}

    loss_fn, make_batch = _classification(model, params_of, x_of, s["classes"])
    return ZooModel(name, size, trainable, loss_fn, make_batch)


def fast_fraction(zm: ZooModel, batch_size: int = 2) -> float:
    """Share of the trainable parameter scalars that the fast path handles without vmap."""
    from dpjax import fast_clipping

    batch = zm.batch(batch_size)
    plan = fast_clipping.plan_for(zm.loss_fn, zm.params, batch)
    sizes = [int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(zm.params)]
    fast = {m.leaf for m in plan.matched.values()}
    return sum(sizes[i] for i in fast) / sum(sizes)
