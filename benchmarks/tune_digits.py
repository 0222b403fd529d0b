"""Sweep DP-SGD hyper-parameters of ``dpjax.fit`` on scikit-learn's digits.

Every combination of the given options is trained once per seed, one run after
another in this process (no parallelism: keep it friendly to a shared CPU). The
script prints one row per run and writes all rows as JSON under
``benchmarks/results/``.

Examples::

    python benchmarks/tune_digits.py --model mlp:64 cnn:16,32 --epsilon 1 3 \
        --epochs 30 --batch-size 256 512 --clip 1.0 --opt adam:2e-3 adam:1e-2

    python benchmarks/tune_digits.py --model mlp:32 --epsilon 0.5 1 3 8 inf --seeds 0 1 2

    # the best settings found (full batch, schedule-free SGD), as in results/tune_digits_seeds.json
    python benchmarks/tune_digits.py --model logreg:std mlp:32:std --epsilon 0.5 1 3 8 \
        --batch-size 1437 --epochs 60 --opt sf:4 sf:5 --seeds 0 1 2 --tag seeds

Model specs: ``mlp:H`` (tanh MLP, hidden width H), ``logreg``, ``cnn:F1,F2``
(tanh CNN), ``default-mlp`` / ``default-cnn`` (dpjax.models as shipped); flags
after further colons: ``relu`` (instead of tanh), ``gn`` (CNN: GroupNorm after
each convolution), ``std`` (per-example standardisation of the input: each
image to zero mean and unit variance over its own pixels).

Optimizer specs: ``adam:LR``, ``sgd:LR`` (momentum 0.9), ``sgd0:LR`` (plain
SGD); a ``cos`` suffix (``sgdcos:LR``, ``adamcos:LR``) decays the rate to zero
over the planned steps with a cosine schedule; ``sf:LR`` is schedule-free SGD
(optax.contrib); a third field adds weight decay (``sgd:1:1e-3``), applied
after privatization, so at no privacy cost.

``--epsilon inf`` means a non-private reference run: clipping still applies,
the noise multiplier is 0.1 (negligible next to N) and no budget is set.

Data normalisation is a public constant only (the [0, 1] scaling of
``load_digits``); nothing is computed from the private training data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import dpjax
from dpjax.models import CNN, MLP


def per_example_standardize(x):
    """Each example to zero mean, unit variance over its own features.

    Uses only that example's own values, so it is a fixed per-example map, not a
    statistic of the (private) training set.
    """
    flat = x.reshape((x.shape[0], -1))
    mu = flat.mean(axis=1, keepdims=True)
    sd = flat.std(axis=1, keepdims=True)
    return ((flat - mu) / (sd + 1e-6)).reshape(x.shape)


class SweepMLP(nn.Module):
    num_classes: int = 10
    hidden: int = 64
    act: str = "tanh"
    standardize: bool = False

    @nn.compact
    def __call__(self, x):
        if self.standardize:
            x = per_example_standardize(x)
        x = x.reshape((x.shape[0], -1))
        if self.hidden > 0:
            x = nn.Dense(self.hidden)(x)
            x = jnp.tanh(x) if self.act == "tanh" else nn.relu(x)
        return nn.Dense(self.num_classes)(x)


class SweepCNN(nn.Module):
    num_classes: int = 10
    features: tuple = (16, 32)
    act: str = "tanh"
    groupnorm: bool = False
    standardize: bool = False

    @nn.compact
    def __call__(self, x):
        if x.ndim == 2:
            x = x[:, :, None, None]
        if self.standardize:
            x = per_example_standardize(x)
        for f in self.features:
            x = nn.Conv(f, (3, 3))(x)
            if self.groupnorm:
                x = nn.GroupNorm(num_groups=min(4, f))(x)
            x = jnp.tanh(x) if self.act == "tanh" else nn.relu(x)
            x = nn.avg_pool(x, (2, 2), (2, 2), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


def build_model(spec: str):
    parts = spec.split(":")
    kind = parts[0]
    flags = set(parts[1:])
    std = "std" in flags
    if kind == "logreg":
        return SweepMLP(hidden=0, standardize=std)
    if kind == "default-mlp":
        return MLP()
    if kind == "default-cnn":
        return CNN()
    if kind == "mlp":
        hidden = int(parts[1]) if len(parts) > 1 else 64
        return SweepMLP(hidden=hidden, act="relu" if "relu" in flags else "tanh", standardize=std)
    if kind == "cnn":
        feats = tuple(int(f) for f in parts[1].split(",")) if len(parts) > 1 else (16, 32)
        act = "relu" if "relu" in flags else "tanh"
        return SweepCNN(features=feats, act=act, groupnorm="gn" in flags, standardize=std)
    raise ValueError(f"unknown model spec {spec!r}")


def build_optimizer(spec: str, clip: float = 1.0, lr_per_clip: bool = False, steps: int = 1):
    parts = spec.split(":")
    kind, lr = parts[0], float(parts[1])
    wd = float(parts[2]) if len(parts) > 2 else 0.0
    if lr_per_clip and kind.startswith(("sgd", "sf")):
        lr = lr / clip  # SGD step scales with C; keep lr * C fixed across clip norms
    if kind.endswith("cos"):  # cosine decay to zero over the planned steps
        kind = kind[: -len("cos")]
        lr = optax.cosine_decay_schedule(lr, max(1, steps))
    if kind == "sf":  # schedule-free SGD (Defazio et al. 2024); fit evaluates its y-sequence
        return optax.contrib.schedule_free_sgd(lr, b1=0.9, weight_decay=wd or None)
    if kind == "adam":
        inner = optax.adam(lr)
    elif kind == "sgd":
        inner = optax.sgd(lr, momentum=0.9)
    elif kind == "sgd0":
        inner = optax.sgd(lr)
    else:
        raise ValueError(f"unknown optimizer spec {spec!r}")
    # weight decay acts on the privatized gradient and the parameters only: no privacy cost
    return optax.chain(optax.add_decayed_weights(wd), inner) if wd else inner


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["mlp:64"])
    p.add_argument("--epsilon", nargs="+", default=["1", "3"])
    p.add_argument("--epochs", nargs="+", type=float, default=[30.0])
    p.add_argument("--batch-size", nargs="+", type=int, default=[256])
    p.add_argument("--clip", nargs="+", type=float, default=[1.0])
    p.add_argument("--opt", nargs="+", default=["adam:2e-3"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--tag", default="sweep", help="name of the JSON file under benchmarks/results/")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--lr-per-clip", action="store_true",
                   help="SGD learning rates are given as lr * C: the rate used is LR / C")
    p.add_argument("--compile-cache", default=None,
                   help="directory for JAX's persistent compilation cache (speeds up repeated sweeps)")
    args = p.parse_args(argv)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    data = dpjax.datasets.load_digits()
    n = len(data["x_train"])
    rows = []
    header = (f"{'model':<16}{'eps':>6}{'ep':>6}{'B':>6}{'C':>6}{'opt':>13}{'seed':>5}"
              f"{'sigma':>8}{'steps':>6}{'acc':>8}{'best':>8}{'eps_sp':>8}{'sec':>7}")
    print(header, flush=True)
    combos = itertools.product(args.model, args.opt, args.clip, args.batch_size, args.epochs, args.epsilon, args.seeds)
    warnings.simplefilter("ignore", dpjax.accounting.RdpConvergenceWarning)
    for model_spec, opt_spec, clip, batch, epochs, eps_s, seed in combos:
        batch = min(batch, n)
        eps = math.inf if eps_s.lower() in ("inf", "none") else float(eps_s)
        kwargs = dict(epochs=epochs, batch_size=batch, l2_clip_norm=clip, seed=seed, delta=args.delta,
                      optimizer=build_optimizer(opt_spec, clip, args.lr_per_clip, math.ceil(epochs * n / batch)), progress=False)
        if math.isinf(eps):
            kwargs.update(target_epsilon=None, noise_multiplier=0.1)
        else:
            kwargs.update(target_epsilon=eps)
        t0 = time.perf_counter()
        res = dpjax.fit(build_model(model_spec), data, **kwargs)
        sec = time.perf_counter() - t0
        accs = [h["test_accuracy"] for h in res.history]
        row = dict(model=model_spec, target_epsilon=eps_s, epochs=epochs, batch_size=batch, l2_clip_norm=clip,
                   optimizer=opt_spec, seed=seed, noise_multiplier=res.noise_multiplier, steps=res.steps,
                   test_accuracy=accs[-1], best_test_accuracy=max(accs),
                   epsilon_spent=None if math.isinf(eps) else res.epsilon, seconds=sec)
        rows.append(row)
        eps_sp = "-" if row["epsilon_spent"] is None else f"{row['epsilon_spent']:.3f}"
        print(f"{model_spec:<16}{eps_s:>6}{epochs:>6g}{batch:>6}{clip:>6g}{opt_spec:>13}{seed:>5}"
              f"{res.noise_multiplier:>8.3g}{res.steps:>6}{accs[-1]:>8.4f}{max(accs):>8.4f}{eps_sp:>8}{sec:>7.1f}",
              flush=True)

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"tune_digits_{args.tag}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "jax_backend": jax.default_backend(), "rows": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
