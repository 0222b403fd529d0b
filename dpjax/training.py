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
import os
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpjax import accounting, checkpointing, correlated_noise, ledger, validation
from dpjax.clipping import clipped_grad
from dpjax.noise import PrivatizeState, privatize
from dpjax.defaults import DEFAULTS
from dpjax.sampling import CyclicPoissonSampler, PoissonSampler


# The defaults live in dpjax.defaults (no JAX import) so that `dpjax train --help` is fast.


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


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """The settings of :func:`fit` (each one is also a keyword argument of ``fit``).

    Attributes:
      epochs: planned length, in expected passes over the data
        (steps = ceil(epochs · N / batch_size)).
      batch_size: expected batch size E[B] of the Poisson sampler (q = E[B]/N);
        None (the default) for the whole training set (q = 1).
      l2_clip_norm: per-example clip norm C.
      target_epsilon: budget ε at ``delta``. Without ``noise_multiplier``, σ is
        calibrated so the planned steps spend exactly this; with it, training
        stops before a step would exceed it. ``None``: no budget (then
        ``noise_multiplier`` is required).
      delta: δ.
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
      accountant: ``"rdp"`` or ``"pld"``.
      microbatch_size / clipping_method / keep_fraction: passed to
        :func:`dpjax.clipped_grad` (``microbatch_size``, ``method``,
        ``keep_fraction``): memory and speed only, the result is the same.
      checkpoint_dir / checkpoint_every / resume / overwrite: orbax checkpoints
        every N steps and at the end, verified on restore, with an append-only
        privacy log beside them (:mod:`dpjax.checkpointing`). ``resume=True``
        continues from the newest valid checkpoint (and is an error when there
        is none); a folder that already holds checkpoints is refused unless
        ``resume`` or ``overwrite=True`` (which deletes them; the log stays).
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
      noise / partitions: ``dpjax.BandMF(bands=b)`` or ``dpjax.TreeAggregation()``
        for noise correlated across steps (:mod:`dpjax.correlated_noise`).
        The data are then cycled through ``partitions`` secret parts (default:
        the steps of an epoch, at least ``b``), one Poisson-sampled part per
        step (:class:`dpjax.sampling.CyclicPoissonSampler`) with
        ``E[B] = min(batch_size, N / partitions)``; σ is calibrated for that
        mechanism. ``None`` (default): independent noise (DP-SGD).
    """

    epochs: float = DEFAULTS["epochs"]
    batch_size: Optional[int] = DEFAULTS["batch_size"]
    l2_clip_norm: float = DEFAULTS["l2_clip_norm"]
    target_epsilon: Optional[float] = 3.0
    delta: float = 1e-5
    noise_multiplier: Optional[float] = None
    optimizer: Optional[optax.GradientTransformation] = None
    learning_rate: float = DEFAULTS["learning_rate"]
    loss: Callable = cross_entropy
    seed: Optional[int] = 0
    accountant: str = "rdp"
    microbatch_size: Optional[int] = None
    clipping_method: str = "auto"
    keep_fraction: Optional[float] = None
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 50
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    max_steps: Optional[int] = None
    on_checkpoint: Optional[Callable[[int], None]] = None
    mesh: Optional[jax.sharding.Mesh] = None
    noise: Any = None
    partitions: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the settings and the data size fix before training starts."""

    num_examples: int
    batch_size: int
    total_steps: int
    steps_per_epoch: int
    sigma: float
    config: Dict[str, Any]  # what a checkpoint must agree with to be resumed
    partitions: int = 1  # > 1 or with noise=: the cyclic sampler's parts


@dataclasses.dataclass
class _Run:
    """The state of a run in progress (mutable: the loop advances it)."""

    params: Any
    opt_state: Any
    sampler: Any
    seeds: Dict[str, int]
    history: List[Dict[str, float]]


def _settings_from(settings: Optional[FitSettings], overrides: Dict[str, Any]) -> FitSettings:
    base = FitSettings() if settings is None else settings
    if not isinstance(base, FitSettings):
        raise TypeError(f"settings must be a dpjax.training.FitSettings, got {type(base).__name__}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(FitSettings)})
    if unknown:
        raise TypeError(f"fit() got unknown settings {unknown}; see dpjax.training.FitSettings")
    return dataclasses.replace(base, **overrides)


def _training_arrays(data) -> tuple:
    for key in ("x_train", "y_train"):
        if key not in data:
            raise ValueError(f"data must contain {key!r}; it has {sorted(data)}")
    x_train, y_train = np.asarray(data["x_train"]), np.asarray(data["y_train"])
    test = None
    if "x_test" in data and "y_test" in data:
        test = (np.asarray(data["x_test"]), np.asarray(data["y_test"]))
    return x_train, y_train, test


def _cycle(s: FitSettings, n: int, batch_size: int) -> tuple:
    """(partitions, expected batch size) of the cyclic sampler correlated noise needs."""
    if s.noise is not None and not isinstance(s.noise, (correlated_noise.BandMF, correlated_noise.TreeAggregation)):
        raise TypeError(f"noise must be None, dpjax.BandMF(bands=...) or dpjax.TreeAggregation(), got {s.noise!r}")
    if s.mesh is not None:
        raise ValueError("noise= (correlated noise) is not supported with mesh= yet: the sharded sampler "
                         "is not cyclic")
    bands = correlated_noise.code_and_bands(s.noise)[1]
    parts = max(bands, n // batch_size) if s.partitions is None else validation.check_positive_int(
        "partitions", s.partitions)
    if parts < bands or parts > n:
        raise ValueError(f"partitions must be in [bands={bands}, N={n}], got {parts}")
    return parts, min(batch_size, n // parts)


def _calibrated_sigma(s: FitSettings, q: float, total_steps: int, partitions: int) -> float:
    """σ for ``target_epsilon`` over the planned steps, with the float32 values the ledger
    records (q rounded up, σ rounded up to a float32 here so the ledger keeps it
    exactly): the ledger's ε is then within the target and the budget guard does not
    stop the run a step early."""
    code, bands = correlated_noise.code_and_bands(s.noise)
    count, sampled = correlated_noise.compositions(code, total_steps, partitions, bands)
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=s.target_epsilon, delta=s.delta, steps=count, accountant=s.accountant,
        sampling_rate=float(ledger.round_to_float32(q, +1.0)) if sampled else 1.0)
    return float(ledger.round_to_float32(sigma, +1.0))


def _plan(s: FitSettings, n: int) -> _Plan:
    """Validate the settings against ``n`` examples; calibrate σ if asked."""
    validation.check_positive("epochs", s.epochs)
    batch_size = n if s.batch_size is None else validation.check_positive_int("batch_size", s.batch_size)
    if batch_size > n:
        raise ValueError(f"batch_size ({batch_size}) must be <= the number of training examples ({n})")
    validation.check_open_unit("delta", s.delta)
    validation.check_positive_int("checkpoint_every", s.checkpoint_every)
    if s.target_epsilon is None and s.noise_multiplier is None:
        raise ValueError("pass target_epsilon (σ is then calibrated) or noise_multiplier (or both)")
    if s.target_epsilon is not None:
        validation.check_positive("target_epsilon", s.target_epsilon)
    if s.resume and s.checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if s.resume and s.overwrite:
        raise ValueError("pass resume=True (continue the checkpoints) or overwrite=True (discard them), not both")
    partitions, q = 1, batch_size / n
    if s.noise is not None or s.partitions is not None:
        partitions, batch_size = _cycle(s, n, batch_size)
        q = batch_size * partitions / n
    total_steps = math.ceil(s.epochs * n / batch_size)
    sigma = s.noise_multiplier
    if sigma is None:
        sigma = _calibrated_sigma(s, q, total_steps, partitions)
    sigma = validation.check_positive("noise_multiplier", sigma)
    config = {
        "num_examples": n,
        "batch_size": batch_size,
        "noise_multiplier": sigma,
        "l2_clip_norm": float(s.l2_clip_norm),
        "delta": float(s.delta),
        "target_epsilon": None if s.target_epsilon is None else float(s.target_epsilon),
        "total_steps": total_steps,
        "accountant": s.accountant,
    }
    if partitions > 1 or s.noise is not None:
        config.update(noise=repr(s.noise), partitions=partitions)
    return _Plan(n, batch_size, total_steps, max(1, math.ceil(n / batch_size)), sigma, config, partitions)


def _start(s: FitSettings, plan: _Plan, params, seeds):
    """The sampler, the private optimizer and its state for a fresh run."""
    if s.noise is not None or plan.partitions > 1:
        sampler = CyclicPoissonSampler(plan.num_examples, partitions=plan.partitions,
                                       expected_batch_size=plan.batch_size, seed=seeds["sampler"])
    elif s.mesh is None:
        sampler = PoissonSampler(plan.num_examples, expected_batch_size=plan.batch_size, seed=seeds["sampler"])
    else:
        from dpjax import parallel

        sampler = parallel.ShardedPoissonSampler.for_mesh(plan.num_examples, s.mesh,
                                                          expected_batch_size=plan.batch_size, seed=seeds["sampler"])
    tx = privatize(
        s.optimizer if s.optimizer is not None else default_optimizer(s.learning_rate),
        noise_multiplier=plan.sigma,
        l2_clip_norm=s.l2_clip_norm,
        sampler=sampler,
        seed=seeds["noise"],
        target_epsilon=s.target_epsilon,
        target_delta=s.delta if s.target_epsilon is not None else None,
        accountant=s.accountant,
        noise=s.noise,
    )
    opt_state = tx.init(params)
    if s.mesh is not None:
        from dpjax import parallel

        params, opt_state = parallel.replicate((params, opt_state), s.mesh)
    return tx, _Run(params=params, opt_state=opt_state, sampler=sampler, seeds=seeds, history=[])


def _open_checkpoints(s: FitSettings, run: _Run, plan: _Plan):
    """The checkpoint manager, after resuming or checking that nothing is overwritten silently."""
    if s.checkpoint_dir is None:
        return None
    manager = checkpointing.CheckpointManager(s.checkpoint_dir)
    if s.resume:
        _restore(manager, run, plan)
    elif manager.has_history():
        steps = manager.steps()
        if not s.overwrite:
            raise checkpointing.CheckpointError(
                f"{s.checkpoint_dir} already holds a run (checkpoint steps {steps or 'none'}, privacy log "
                f"{'present' if os.path.exists(manager.log_path) else 'absent'}); starting again at step 0 "
                "would hide what it spent. Resume it (resume=True, --resume) or discard it explicitly "
                "(overwrite=True, --overwrite)."
            )
        manager.discard_steps()
        manager.append_log({"event": "overwrite", "discarded_steps": steps})
    return manager


def _restore(manager, run: _Run, plan: _Plan) -> None:
    """Continue ``run`` from the newest valid checkpoint (reporting the bad newer ones)."""
    if not manager.steps():
        raise checkpointing.CheckpointError(
            f"nothing to resume in {manager.directory}: no checkpoint there. Drop --resume (resume=True) "
            "to start a new run.")
    restored = manager.restore({"params": run.params, "opt_state": run.opt_state}, config=plan.config)
    checkpointing.check_same_config(restored.meta["config"], plan.config)
    run.params, run.opt_state = restored.state["params"], restored.state["opt_state"]
    run.sampler.load_state_dict(restored.meta["sampler"])
    run.seeds = restored.meta["seeds"]  # seed=None runs continue their own streams
    run.history = restored.meta["history"]
    if ledger.steps_taken(run.opt_state) != run.sampler.step:
        raise checkpointing.CheckpointError(f"checkpoint step {restored.step} is inconsistent: ledger steps "
                                            f"{ledger.steps_taken(run.opt_state)} != sampler step {run.sampler.step}")
    for step, why in restored.skipped:
        warnings.warn(f"checkpoint step {step} in {manager.directory} is bad ({why}); resumed from step "
                      f"{restored.step}. The steps after it are replayed with the stored seeds, which "
                      "recomputes the same noisy updates.", checkpointing.CheckpointFallbackWarning, stacklevel=3)
    manager.append_log({"event": "resume", "from_step": restored.step,
                        "skipped": [{"step": st, "why": why} for st, why in restored.skipped]})


def _train_step(s: FitSettings, apply_fn, tx):
    """``train_step(params, opt_state, batch) -> (params, opt_state, train loss)`` for a SampledBatch."""

    def batch_loss(p, batch):
        return s.loss(apply_fn(p, batch["x"]), batch["y"])

    grad_fn = clipped_grad(batch_loss, l2_clip_norm=s.l2_clip_norm, microbatch_size=s.microbatch_size,
                           method=s.clipping_method, keep_fraction=s.keep_fraction, return_per_example=True)
    if s.mesh is not None:
        from dpjax import parallel

        parallel_step = parallel.make_step(grad_fn, tx, s.mesh)

        def sharded_step(p, st, batch):
            p, st, metrics = parallel_step(p, st, parallel.shard_batch(batch, s.mesh))
            return p, st, metrics["loss"]

        return sharded_step

    @jax.jit
    def train_step(p, st, batch):
        g = grad_fn(p, batch)
        updates, st = tx.update(g, st, p)
        train_loss = jnp.sum(jnp.where(batch.mask, g.per_example_loss, 0.0)) / jnp.maximum(g.num_examples, 1)
        return optax.apply_updates(p, updates), st, train_loss

    return train_step


class _Loop:
    """Evaluation, checkpoints and the progress bar around the training steps."""

    def __init__(self, s: FitSettings, plan: _Plan, run: _Run, apply_fn, test, manager):
        self.s, self.plan, self.run, self.manager = s, plan, run, manager
        self.bar = None
        self.test = None
        if test is not None:
            self.test = (_replicate(test, s.mesh) if s.mesh is not None
                         else tuple(jnp.asarray(a) for a in test))

        @jax.jit
        def evaluate(p, x, y):
            logits = apply_fn(p, x)
            return jnp.mean(jnp.argmax(logits, -1) == y), s.loss(logits, y)

        self.evaluate = evaluate

    def spent(self) -> float:
        return ledger.epsilon(self.run.opt_state, self.s.delta, accountant=self.s.accountant)

    def record_eval(self, done: int, train_loss) -> None:
        run = self.run
        record = {"step": done, "epoch": done / self.plan.steps_per_epoch, "epsilon": self.spent(),
                  "train_loss": float(train_loss)}
        if self.test is not None:
            acc, test_loss = self.evaluate(eval_params(run.opt_state, run.params), *self.test)
            record.update(test_accuracy=float(acc), test_loss=float(test_loss))
        run.history.append(record)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{record[k]:.3g}" for k in ("train_loss", "test_accuracy", "epsilon")
                                  if k in record})

    def save(self, step: int) -> None:
        if self.manager is None:
            return
        run = self.run
        led = ledger.find_ledger(run.opt_state)
        spent = {"steps_spent": int(led.steps), "noise_multiplier": float(led.noise_multiplier),
                 "sampling_rate": float(led.sampling_rate), "dataset_size": int(led.dataset_size),
                 "delta": self.s.delta, "epsilon": self.spent(), "accountant": self.s.accountant}
        self.manager.save(
            step,
            {"params": run.params, "opt_state": run.opt_state},
            {"config": self.plan.config, "sampler": run.sampler.state_dict(), "seeds": run.seeds,
             "history": run.history},
            log=spent,
        )
        if self.s.on_checkpoint is not None:
            self.s.on_checkpoint(step)

    def train(self, train_step, train_data) -> Optional[str]:
        """Run the steps of this call; the reason for stopping early, or None."""
        run, plan = self.run, self.plan
        start = run.sampler.step
        end = plan.total_steps if self.s.max_steps is None else min(plan.total_steps, start + self.s.max_steps)
        if self.s.progress and (self.s.mesh is None or jax.process_index() == 0):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=plan.total_steps, initial=start, desc="DP training", unit="step",
                            dynamic_ncols=True)
        stopped, tl = None, float("nan")
        for step in range(start, end):
            try:
                ledger.check_budget(run.opt_state)
            except accounting.PrivacyBudgetExceeded as e:
                stopped = f"stopped before step {step + 1} to stay within the budget: {e}"
                break
            batch = run.sampler.sample().take(train_data)
            run.params, run.opt_state, tl = train_step(run.params, run.opt_state, batch)
            done = step + 1
            if done % plan.steps_per_epoch == 0 or done == plan.total_steps:
                self.record_eval(done, tl)
            if done % self.s.checkpoint_every == 0:
                self.save(done)
            if self.bar is not None:
                self.bar.update(1)
        steps_done = ledger.steps_taken(run.opt_state)
        if steps_done > 0 and (not run.history or run.history[-1]["step"] != steps_done):
            self.record_eval(steps_done, tl)
        if self.manager is not None and not self.manager.has_step(steps_done):
            self.save(steps_done)
        return stopped

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.manager is not None:
            self.manager.close()


def _replicate(tree, mesh):
    from dpjax import parallel

    return parallel.replicate(tree, mesh)


def fit(model, data: Dict[str, np.ndarray], settings: Optional[FitSettings] = None, /,
        **overrides) -> TrainResult:
    """Train ``model`` with DP-SGD on ``data`` and report the ε spent.

    Args:
      model: a ``flax.linen`` or ``flax.nnx`` module mapping a batch of inputs
        to logits.
      data: dict with ``x_train, y_train`` and optionally ``x_test, y_test``.
      settings: a :class:`FitSettings` (default: ``FitSettings()``).
      **overrides: any field of :class:`FitSettings` (``epochs``,
        ``batch_size``, ``l2_clip_norm``, ``target_epsilon``, ``delta``,
        ``noise_multiplier``, ``optimizer``, ``learning_rate``, ``loss``,
        ``seed``, ``accountant``, ``microbatch_size``, ``clipping_method``,
        ``keep_fraction``, ``checkpoint_dir``, ``checkpoint_every``, ``resume``,
        ``progress``, ``max_steps``, ``on_checkpoint``, ``mesh``), replacing
        the value in ``settings``.

    Example:

    >>> import dpjax
    >>> from dpjax.models import MLP
    >>> data = dpjax.datasets.load_digits()
    >>> result = dpjax.fit(MLP(), data, epochs=1, target_epsilon=3.0, progress=False)
    >>> result.epsilon <= 3.0
    True
    """
    s = _settings_from(settings, overrides)
    x_train, y_train, test = _training_arrays(data)
    plan = _plan(s, len(x_train))
    seeds = _derive_seeds(s.seed)
    if s.mesh is not None:
        from dpjax import parallel

        seeds = parallel.broadcast_seeds(seeds)  # every process: same init, sampler and noise seeds
    apply_fn, params, finalize = _functional(model, jnp.asarray(x_train[:1]), jax.random.PRNGKey(seeds["init"]))
    tx, run = _start(s, plan, params, seeds)
    manager = _open_checkpoints(s, run, plan)
    train_data = {"x": x_train, "y": y_train}
    if s.mesh is not None:
        train_data = run.sampler.local_slice(train_data)  # this process samples only its own range
    loop = _Loop(s, plan, run, apply_fn, test, manager)
    with warnings.catch_warnings():
        warnings.simplefilter("once", accounting.RdpConvergenceWarning)
        try:
            stopped_early = loop.train(_train_step(s, apply_fn, tx), train_data)
            eps = loop.spent()
        finally:
            loop.close()
    steps_done = ledger.steps_taken(run.opt_state)
    if stopped_early is None and steps_done < plan.total_steps and s.max_steps is None:
        stopped_early = "stopped before the planned steps"
    final_params = eval_params(run.opt_state, run.params)
    return TrainResult(
        params=final_params,
        opt_state=run.opt_state,
        history=run.history,
        epsilon=eps,
        delta=s.delta,
        noise_multiplier=plan.sigma,
        steps=steps_done,
        stopped_early=stopped_early,
        statement=ledger.privacy_statement(run.opt_state, s.delta, l2_clip_norm=s.l2_clip_norm),
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


def run_cli(args, data, num_classes: int) -> int:
    """``dpjax train`` once :mod:`dpjax.cli` has checked the arguments and the data."""
    from dpjax import models

    model = models.build(args.model, num_classes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", accounting.RdpConvergenceWarning)
        result = _fit_for_cli(model, data, args)
    if any(issubclass(w.category, accounting.RdpConvergenceWarning) for w in caught):
        print("note: dp-accounting's RDP accountant dropped some fractional orders here, so its "
              "epsilon is a valid but loose bound; --accountant pld gives a tighter one.")
    for w in caught:
        if not issubclass(w.category, accounting.RdpConvergenceWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    return _report(result, args)


def _fit_for_cli(model, data, args) -> TrainResult:
    from dpjax import cli

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
        overwrite=args.overwrite,
        progress=not args.quiet,
        microbatch_size=args.microbatch_size,
        clipping_method=args.clipping_method,
        keep_fraction=args.keep_fraction,
        noise=cli.noise_object(args),
        partitions=args.partitions,
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
