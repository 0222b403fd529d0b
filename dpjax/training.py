"""A complete private training loop: :func:`fit`.

It is the loop of the README's two-line change, plus what a real run needs:
noise calibration for a target ε, Poisson sampling, per-epoch evaluation, a
progress bar, a budget guard that stops *before* overspending, and orbax
checkpoints (parameters, optimizer state with the privacy ledger, sampler
state) from which ``resume=True`` continues bit-for-bit.

Works with ``flax.linen`` modules and ``flax.nnx`` modules. Copy it and change
it if your project needs something else: everything private happens in
``dpjax.clipped_grad`` and ``dpjax.privatize``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpjax import accounting, checkpointing, ledger, validation
from dpjax.clipping import clipped_grad
from dpjax.noise import PrivatizeState, privatize
from dpjax.sampling import PoissonSampler


# Tuned on digits (benchmarks/tune_digits.py, then the default CNN; see
# benchmarks/results/accuracy_vs_epsilon.md); used by fit() and `dpjax train`.
# Full batch (1,437 = all of digits' training set, so q = 1): each epoch is one
# noisy step. The optimizer is schedule-free SGD (default_optimizer), evaluated
# at its averaged parameters.
DEFAULTS = {
    "model": "cnn",
    "epochs": 30,
    "batch_size": None,  # None: the whole training set (q = 1)
    "l2_clip_norm": 1.0,
    "optimizer": "schedule_free_sgd",
    "learning_rate": 8.0,
    "momentum": 0.95,
}


@dataclasses.dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
      params: trained parameters (for an NNX model, the model is updated too).
      opt_state: final optimizer state, holding the privacy ledger.
      history: one dict per evaluation: step, epoch, epsilon, test_accuracy,
        test_loss, train_loss (the last is a diagnostic of the training data
        and **not private**).
      epsilon: ε spent (RDP unless ``accountant="pld"``) at ``delta``.
      delta: δ.
      noise_multiplier: σ used.
      steps: noisy steps taken.
      stopped_early: why training stopped before the planned steps, or None.
      statement: the privacy statement.
    """

    params: Any
    opt_state: Any
    history: List[Dict[str, float]]
    epsilon: float
    delta: float
    noise_multiplier: float
    steps: int
    stopped_early: Optional[str]
    statement: str
    model: Any = None


def _functional(model, x_example, key):
    """(apply_fn, params, finalize) for a Linen or NNX model."""
    if isinstance(model, nn.Module):
        params = model.init(key, x_example)
        return (lambda p, x: model.apply(p, x)), params, (lambda p: model)
    if isinstance(model, nnx.Module):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def apply(p, x):
            return nnx.merge(graphdef, p, rest)(x)

        def finalize(p):
            nnx.update(model, p)
            return model

        return apply, params, finalize
    raise TypeError(f"model must be a flax.linen or flax.nnx Module, got {type(model).__name__}")


def _derive_seeds(seed: Optional[int]) -> Dict[str, int]:
    """Independent sub-seeds for init, sampler and noise from one seed (or the OS)."""
    if seed is None:
        import secrets

        return {"init": secrets.randbits(31), "sampler": secrets.randbits(63), "noise": secrets.randbits(31)}
    s = np.random.SeedSequence(int(seed)).generate_state(4, dtype=np.uint32)
    return {"init": int(s[0] >> 1), "sampler": (int(s[1]) << 31) | int(s[2] >> 1), "noise": int(s[3] >> 1)}


def default_optimizer(learning_rate: float = DEFAULTS["learning_rate"]) -> optax.GradientTransformation:
    """The inner optimizer :func:`fit` uses when given none (``DEFAULTS["optimizer"]``).

    Schedule-free SGD (Defazio et al., 2024; ``optax.contrib.schedule_free_sgd``)
    with interpolation ``b1 = DEFAULTS["momentum"]`` and no learning-rate
    schedule to tune. It averages its iterates, which also averages out much of
    the DP noise; :func:`fit` evaluates and returns those averaged parameters
    (see :func:`eval_params`). The rate multiplies the clipped, noised mean
    gradient, whose norm is at most the clip norm, hence its size.
    """
    name = DEFAULTS["optimizer"]
    if name == "schedule_free_sgd":
        return optax.contrib.schedule_free_sgd(learning_rate, b1=DEFAULTS["momentum"])
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"unknown DEFAULTS['optimizer'] {name!r}: 'schedule_free_sgd' or 'adam'")


def eval_params(opt_state, params):
    """The parameters to evaluate and release.

    For a schedule-free optimizer (at any depth of the inner optimizer's state),
    ``optax.contrib.schedule_free_eval_params`` of the trained ``params``; for
    any other optimizer, ``params`` unchanged. Post-processing of private
    quantities only: no privacy cost.
    """
    inner = opt_state.inner_state if isinstance(opt_state, PrivatizeState) else opt_state
    found = [s for s in jax.tree_util.tree_leaves(
        inner, is_leaf=lambda x: isinstance(x, optax.contrib.ScheduleFreeState))
        if isinstance(s, optax.contrib.ScheduleFreeState)]
    if len(found) != 1:
        return params
    try:
        return optax.contrib.schedule_free_eval_params(found[0], params)
    except (ValueError, TypeError):  # z does not have the structure of params (e.g. a partition)
        return params


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def fit(
    model,
    data: Dict[str, np.ndarray],
    *,
    epochs: float = DEFAULTS["epochs"],
    batch_size: Optional[int] = DEFAULTS["batch_size"],
    l2_clip_norm: float = DEFAULTS["l2_clip_norm"],
    target_epsilon: Optional[float] = 3.0,
    delta: float = 1e-5,
    noise_multiplier: Optional[float] = None,
    optimizer: Optional[optax.GradientTransformation] = None,
    learning_rate: float = DEFAULTS["learning_rate"],
    loss: Callable = cross_entropy,
    seed: Optional[int] = 0,
    accountant: str = "rdp",
    microbatch_size: Optional[int] = None,
    clipping_method: str = "auto",
    keep_fraction: Optional[float] = None,
    checkpoint_dir: Optional[str] = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: bool = True,
    max_steps: Optional[int] = None,
    on_checkpoint: Optional[Callable[[int], None]] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> TrainResult:
    """Train ``model`` with DP-SGD on ``data`` and report the ε spent.

    Args:
      model: a ``flax.linen`` or ``flax.nnx`` module mapping a batch of inputs
        to logits.
      data: dict with ``x_train, y_train`` and optionally ``x_test, y_test``.
      epochs: planned length, in expected passes over the data
        (steps = ceil(epochs · N / batch_size)).
      batch_size: expected batch size E[B] of the Poisson sampler (q = E[B]/N);
        None (the default) for the whole training set (q = 1).
      l2_clip_norm: per-example clip norm C.
      target_epsilon: budget ε at ``delta``. Without ``noise_multiplier``, σ is
        calibrated so the planned steps spend exactly this; with it, training
        stops before a step would exceed it. ``None``: no budget (then
        ``noise_multiplier`` is required).
      noise_multiplier: σ, instead of calibrating it.
      optimizer: the inner optax optimizer (default :func:`default_optimizer`,
        schedule-free SGD with ``learning_rate``). With a schedule-free
        optimizer, evaluation and the returned ``params`` use its averaged
        parameters (:func:`eval_params`).
      learning_rate: learning rate of the default optimizer (ignored when
        ``optimizer`` is given).
      loss: ``loss(logits, labels) -> scalar`` (mean over the batch).
      seed: one int that fixes initialisation, sampling and noise (keep it
        secret for a real release), or None to draw them from the OS.
      microbatch_size / clipping_method / keep_fraction: passed to
        :func:`dpjax.clipped_grad` (``microbatch_size``, ``method``,
        ``keep_fraction``): memory and speed only, the result is the same.
      checkpoint_dir / checkpoint_every / resume: orbax checkpoints every N
        steps and at the end; ``resume=True`` continues from the latest.
      progress: show a progress bar (tqdm); ``False`` for logs.
      max_steps: stop after this many steps in this call (for tests and
        time-boxed runs; a later ``resume`` continues).
      on_checkpoint: called with the step after each checkpoint is written.
      mesh: data-parallel training over a one-axis ``jax.sharding.Mesh``
        (e.g. :func:`dpjax.parallel.data_mesh`), on one process or on every
        process after ``jax.distributed.initialize``; call ``fit`` the same way
        in each. Each process Poisson-samples its own range of the data
        (:class:`dpjax.parallel.ShardedPoissonSampler`), every device clips its
        rows, the clipped sums are added across devices and noise is added
        once (see :mod:`dpjax.parallel`). Parameters, optimizer state and
        ledger are replicated; checkpoints are written once and restored on
        every process. ``None`` (default): the single-device loop.

    Example:

    >>> import dpjax
    >>> from dpjax.models import MLP
    >>> data = dpjax.datasets.load_digits()
    >>> result = dpjax.fit(MLP(), data, epochs=1, target_epsilon=3.0, progress=False)
    >>> result.epsilon <= 3.0
    True
    """
    for key in ("x_train", "y_train"):
        if key not in data:
            raise ValueError(f"data must contain {key!r}; it has {sorted(data)}")
    x_train, y_train = np.asarray(data["x_train"]), np.asarray(data["y_train"])
    has_test = "x_test" in data and "y_test" in data
    n = len(x_train)
    validation.check_positive("epochs", epochs)
    batch_size = n if batch_size is None else validation.check_positive_int("batch_size", batch_size)
    if batch_size > n:
        raise ValueError(f"batch_size ({batch_size}) must be <= the number of training examples ({n})")
    validation.check_open_unit("delta", delta)
    validation.check_positive_int("checkpoint_every", checkpoint_every)
    if target_epsilon is None and noise_multiplier is None:
        raise ValueError("pass target_epsilon (σ is then calibrated) or noise_multiplier (or both)")
    if target_epsilon is not None:
        validation.check_positive("target_epsilon", target_epsilon)
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")

    total_steps = math.ceil(epochs * n / batch_size)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    if noise_multiplier is None:
        # Calibrate with the float32 values the ledger will record (q rounded up, σ
        # rounded up to a float32 here so the ledger keeps it exactly): the ledger's
        # ε for the planned steps is then within the target, and the budget guard
        # does not stop the run a step early.
        q_ledger = float(ledger.round_to_float32(batch_size / n, +1.0))
        noise_multiplier = accounting.calibrate_noise_multiplier(
            target_epsilon=target_epsilon, delta=delta, sampling_rate=q_ledger, steps=total_steps,
            accountant=accountant,
        )
        noise_multiplier = float(ledger.round_to_float32(noise_multiplier, +1.0))
    sigma = validation.check_positive("noise_multiplier", noise_multiplier)

    seeds = _derive_seeds(seed)
    if mesh is not None:
        from dpjax import parallel

        seeds = parallel.broadcast_seeds(seeds)  # every process: same init, sampler and noise seeds
    config = {
        "num_examples": n,
        "batch_size": batch_size,
        "noise_multiplier": sigma,
        "l2_clip_norm": float(l2_clip_norm),
        "delta": float(delta),
        "target_epsilon": None if target_epsilon is None else float(target_epsilon),
        "total_steps": total_steps,
        "accountant": accountant,
    }

    apply_fn, params, finalize = _functional(model, jnp.asarray(x_train[:1]), jax.random.PRNGKey(seeds["init"]))
    if mesh is None:
        sampler = PoissonSampler(n, expected_batch_size=batch_size, seed=seeds["sampler"])
    else:
        sampler = parallel.ShardedPoissonSampler.for_mesh(n, mesh, expected_batch_size=batch_size,
                                                          seed=seeds["sampler"])
    tx = privatize(
        optimizer if optimizer is not None else default_optimizer(learning_rate),
        noise_multiplier=sigma,
        l2_clip_norm=l2_clip_norm,
        sampler=sampler,
        seed=seeds["noise"],
        target_epsilon=target_epsilon,
        target_delta=delta if target_epsilon is not None else None,
        accountant=accountant,
    )
    opt_state = tx.init(params)
    if mesh is not None:
        params, opt_state = parallel.replicate((params, opt_state), mesh)
    history: List[Dict[str, float]] = []

    manager = checkpointing.CheckpointManager(checkpoint_dir) if checkpoint_dir else None
    if resume and manager is not None and manager.latest_step() is not None:
        restored = manager.restore({"params": params, "opt_state": opt_state})
        checkpointing.check_same_config(restored.meta["config"], config)
        params, opt_state = restored.state["params"], restored.state["opt_state"]
        sampler.load_state_dict(restored.meta["sampler"])
        seeds = restored.meta["seeds"]  # seed=None runs continue their own streams
        history = restored.meta["history"]
        if ledger.steps_taken(opt_state) != sampler.step:
            raise RuntimeError("checkpoint is inconsistent: ledger steps != sampler steps")

    def batch_loss(p, batch):
        return loss(apply_fn(p, batch["x"]), batch["y"])

    grad_fn = clipped_grad(batch_loss, l2_clip_norm=l2_clip_norm, microbatch_size=microbatch_size,
                           method=clipping_method, keep_fraction=keep_fraction, return_per_example=True)

    if mesh is None:

        @jax.jit
        def train_step(p, s, batch, mask):
            g = grad_fn(p, batch, mask=mask)
            updates, s = tx.update(g, s, p)
            train_loss = jnp.sum(jnp.where(mask, g.per_example_loss, 0.0)) / jnp.maximum(g.num_examples, 1)
            return optax.apply_updates(p, updates), s, train_loss

    else:
        parallel_step = parallel.make_step(grad_fn, tx, mesh)

        def train_step(p, s, batch, mask):
            batch, mask = parallel.shard_batch((batch, mask), mesh)
            p, s, metrics = parallel_step(p, s, batch, mask)
            return p, s, metrics["loss"]

    @jax.jit
    def evaluate(p, x, y):
        logits = apply_fn(p, x)
        return jnp.mean(jnp.argmax(logits, -1) == y), loss(logits, y)

    def spent():
        return ledger.epsilon(opt_state, delta, accountant=accountant)

    def save(step):
        if manager is None:
            return
        manager.save(
            step,
            {"params": params, "opt_state": opt_state},
            {"config": config, "sampler": sampler.state_dict(), "seeds": seeds, "history": history},
        )
        if on_checkpoint is not None:
            on_checkpoint(step)

    def record_eval(done, train_loss):
        record = {"step": done, "epoch": done / steps_per_epoch, "epsilon": spent(),
                  "train_loss": float(train_loss)}
        if has_test:
            acc, test_loss = evaluate(eval_params(opt_state, params), *test_data)
            record.update(test_accuracy=float(acc), test_loss=float(test_loss))
        history.append(record)
        if bar is not None:
            bar.set_postfix({k: f"{record[k]:.3g}" for k in ("train_loss", "test_accuracy", "epsilon") if k in record})

    train_data = {"x": x_train, "y": y_train}
    test_data = (jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])) if has_test else None
    if mesh is not None:
        train_data = sampler.local_slice(train_data)  # this process samples only its own range
        if has_test:
            test_data = parallel.replicate((np.asarray(data["x_test"]), np.asarray(data["y_test"])), mesh)
        progress = progress and jax.process_index() == 0
    start = sampler.step
    end = total_steps if max_steps is None else min(total_steps, start + max_steps)
    stopped_early = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start, desc="DP training", unit="step", dynamic_ncols=True)
    tl = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("once", accounting.RdpConvergenceWarning)
        for step in range(start, end):
            try:
                ledger.check_budget(opt_state)
            except accounting.PrivacyBudgetExceeded as e:
                stopped_early = f"stopped before step {step + 1} to stay within the budget: {e}"
                break
            b = sampler.sample()
            params, opt_state, tl = train_step(params, opt_state, b.take(train_data), b.mask)
            done = step + 1
            if done % steps_per_epoch == 0 or done == total_steps:
                record_eval(done, tl)
            if done % checkpoint_every == 0:
                save(done)
            if bar is not None:
                bar.update(1)
        steps_done = ledger.steps_taken(opt_state)
        if steps_done > 0 and (not history or history[-1]["step"] != steps_done):
            record_eval(steps_done, tl)
        if manager is not None and (not manager.has_step(steps_done)):
            save(steps_done)
        eps = spent()
    if bar is not None:
        bar.close()
    if manager is not None:
        manager.close()
    if stopped_early is None and steps_done < total_steps and max_steps is None:
        stopped_early = "stopped before the planned steps"
    statement = ledger.privacy_statement(opt_state, delta, l2_clip_norm=l2_clip_norm)
    final_params = eval_params(opt_state, params)
    return TrainResult(
        params=final_params,
        opt_state=opt_state,
        history=history,
        epsilon=eps,
        delta=delta,
        noise_multiplier=sigma,
        steps=steps_done,
        stopped_early=stopped_early,
        statement=statement,
        model=finalize(final_params),
    )


def save_plot(history: List[Dict[str, float]], path: str, title: str = "") -> None:
    """Test accuracy and ε against steps, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    if history and "test_accuracy" in history[0]:
        ax1.plot(steps, [h["test_accuracy"] for h in history], marker="o", ms=3)
    ax1.set_xlabel("noisy steps")
    ax1.set_ylabel("test accuracy")
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [h["epsilon"] for h in history], color="tab:red", marker="o", ms=3)
    ax2.set_xlabel("noisy steps")
    ax2.set_ylabel("epsilon spent")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cli(args) -> int:
    """``dpjax train``: see ``dpjax train --help``."""
    from dpjax import datasets, models

    validation.check_positive("--epsilon", args.epsilon)
    validation.check_open_unit("--delta", args.delta)
    if args.noise_multiplier is not None:
        validation.check_positive("--noise-multiplier", args.noise_multiplier)
    validation.check_positive("--clip-norm", args.clip_norm)
    validation.check_positive("--lr", args.lr)
    validation.check_positive("--epochs", args.epochs)
    if args.batch_size is not None:
        validation.check_positive_int("--batch-size", args.batch_size)
    if args.microbatch_size is not None:
        validation.check_positive_int("--microbatch-size", args.microbatch_size)
    if args.keep_fraction is not None and not args.keep_fraction >= 0:
        raise ValueError(f"--keep-fraction must be >= 0 (or inf), got {args.keep_fraction}")
    if args.resume and not args.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir")
    data = datasets.load_npz(args.data) if args.data else datasets.load_digits()
    num_classes = int(max(data["y_train"].max(), data["y_test"].max())) + 1
    model = models.build(args.model, num_classes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", accounting.RdpConvergenceWarning)
        result = _fit_for_cli(model, data, args)
    if any(issubclass(w.category, accounting.RdpConvergenceWarning) for w in caught):
        print("note: dp-accounting's RDP accountant dropped some fractional orders here, so its "
              "epsilon is a valid but loose bound; --accountant pld gives a tighter one.")
    for w in caught:
        if not issubclass(w.category, accounting.RdpConvergenceWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return _report(result, args)


def _fit_for_cli(model, data, args) -> TrainResult:
    return fit(
        model,
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        l2_clip_norm=args.clip_norm,
        target_epsilon=args.epsilon,
        delta=args.delta,
        noise_multiplier=args.noise_multiplier,
        learning_rate=args.lr,
        seed=args.seed,
        accountant=args.accountant,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        progress=not args.quiet,
        microbatch_size=args.microbatch_size,
        clipping_method=args.clipping_method,
        keep_fraction=args.keep_fraction,
    )


def _report(result: TrainResult, args) -> int:
    import json
    import os

    os.makedirs(args.out, exist_ok=True)
    final = result.history[-1] if result.history else {}
    metrics = {
        "test_accuracy": final.get("test_accuracy"),
        "epsilon": result.epsilon,
        "delta": result.delta,
        "noise_multiplier": result.noise_multiplier,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "history": result.history,
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    save_plot(result.history, os.path.join(args.out, "training.png"),
              title=f"dpjax train --model {args.model}: epsilon = {result.epsilon:.3g}, delta = {args.delta:g}")
    if result.stopped_early:
        print(result.stopped_early)
    acc = final.get("test_accuracy")
    print(f"test accuracy: {acc:.4f}" if acc is not None else "test accuracy: n/a")
    print(f"epsilon spent: {result.epsilon:.4f} (delta = {args.delta:g}, {result.steps} steps, "
          f"noise multiplier {result.noise_multiplier:.4g})")
    print()
    print(result.statement)
    print(f"\nwrote {os.path.join(args.out, 'metrics.json')} and {os.path.join(args.out, 'training.png')}")
    return 0
