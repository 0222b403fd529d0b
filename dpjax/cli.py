"""The ``dpjax`` command line.

Usage: ``dpjax <command> [options]`` (or ``python -m dpjax ...``).  Run
``dpjax --help`` for the list of commands and ``dpjax <command> --help`` for
each command's options.

Adding a subcommand: write two functions in your own module,
``add_arguments(parser: argparse.ArgumentParser) -> None`` and
``run(args: argparse.Namespace) -> int``, and list them in :data:`COMMANDS`
as a :class:`Command` (or call :func:`register_command`).  ``run`` may raise
``ValueError`` / ``TypeError`` for bad input: :func:`main` prints
``error: <message>`` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import textwrap
from typing import Callable, List, Optional, Sequence

__all__ = ["Command", "COMMANDS", "register_command", "build_parser", "main"]

EXIT_OK = 0
EXIT_USAGE = 2
AUDIT_LOOP_FORMS = ("plain", "accumulation", "microbatch", "nnx")  # dpjax.audit.LOOP_FORMS (tested equal)

_EPS_DELTA_LINE = (
    "(epsilon, delta) in one line: changing any one training example changes "
    "the probability of any training outcome by at most a factor exp(epsilon), "
    "up to a small slack delta (roughly the chance that the bound fails); "
    "smaller is more private, and delta should be well below 1 / dataset size."
)


def _wrap(*paragraphs: str) -> str:
    return "\n\n".join(textwrap.fill(p, width=78) for p in paragraphs)


@dataclasses.dataclass(frozen=True)
class Command:
    """One ``dpjax <name>`` subcommand."""

    name: str
    help: str  # one line, shown in ``dpjax --help``
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""
    epilog: str = ""


# --------------------------------------------------------------------------
# Shared options
# --------------------------------------------------------------------------


def _add_training_arguments(parser: argparse.ArgumentParser, *, noise: bool) -> None:
    group = parser.add_argument_group("training setting")
    group.add_argument(
        "--dataset-size", type=int, required=True, metavar="N",
        help="number of training examples N")
    group.add_argument(
        "--batch-size", type=int, required=True, metavar="B",
        help="(expected) batch size B; the sampling rate is q = B / N")
    if noise:
        group.add_argument(
            "--noise-multiplier", type=float, required=True, metavar="SIGMA",
            help="noise multiplier sigma: the Gaussian noise added to the sum of "
                 "clipped per-example gradients has std sigma * C (C = clipping norm)")
    length = group.add_mutually_exclusive_group(required=True)
    length.add_argument(
        "--epochs", type=float, metavar="E",
        help="training length in epochs; steps = ceil(E * N / B), TensorFlow "
             "Privacy's convention")
    length.add_argument(
        "--steps", type=int, metavar="T",
        help="training length in noisy steps (instead of --epochs)")
    group.add_argument(
        "--delta", type=float, required=True,
        help="delta, the probability that the epsilon bound may fail; in (0, 1), "
             "typically 1e-5 or below 1 / N")
    acct = parser.add_argument_group("accounting")
    acct.add_argument(
        "--accountant", choices=["rdp", "pld"], default="rdp",
        help="rdp: Renyi DP, fast (default); pld: privacy loss distributions, "
             "tighter and slower")
    acct.add_argument(
        "--sampling", choices=["poisson", "fixed_size"], default="poisson",
        help="poisson: each example joins each batch independently with "
             "probability q (default, what dpjax's PoissonSampler does); "
             "fixed_size: each step uses an independent uniformly random subset "
             "of exactly B examples (rdp only). Shuffled epochs are not supported.")
    _add_noise_arguments(acct, batch_help="each step Poisson-samples one part with rate q = B * P / N")


def _accounted(args: argparse.Namespace, steps: int) -> dict:
    """The DP-SGD accounting arguments that describe ``steps`` steps of the --noise mechanism."""
    check_noise_arguments(args)
    if args.noise == "independent" and args.partitions is None:
        return dict(steps=steps, sampling=args.sampling, dataset_size=args.dataset_size,
                    batch_size=args.batch_size)
    from dpjax import correlated_noise as cn

    noise, parts = noise_object(args), args.partitions or max(args.bands or 1, 1)
    if args.batch_size * parts > args.dataset_size:
        raise ValueError(f"--batch-size * --partitions must be <= --dataset-size (B = {args.batch_size} per "
                         f"step from a part of N / P = {args.dataset_size / parts:g} examples)")
    code, bands = cn.code_and_bands(noise)
    count, sampled = cn.compositions(code, steps, parts, bands)
    return dict(steps=count, sampling="poisson",
                sampling_rate=args.batch_size * parts / args.dataset_size if sampled else 1.0)


NOISE_CHOICES = ("independent", "bandmf", "tree", "tree-one")
_NOISE_HELP = ("noise across steps: independent (DP-SGD, default); bandmf: banded matrix factorisation "
               "with --bands B; tree: tree aggregation (DP-FTRL), a new tree every pass over the "
               "partitions; tree-one: one tree for the whole run. The correlated ones cycle the data "
               "through --partitions P secret parts, one Poisson-sampled per step")


def _add_noise_arguments(group, *, batch_help: str) -> None:
    group.add_argument("--noise", choices=NOISE_CHOICES, default="independent", help=_NOISE_HELP)
    group.add_argument("--bands", type=int, default=None, metavar="B",
                       help="bands of --noise bandmf (>= 1; 1 is DP-SGD)")
    group.add_argument("--partitions", type=int, default=None, metavar="P",
                       help="parts the data are cycled through (cyclic Poisson sampling, >= the bands); "
                            + batch_help)


def check_noise_arguments(args: argparse.Namespace) -> None:
    """The --noise/--bands/--partitions rules, before any import of JAX."""
    if args.bands is not None and args.noise != "bandmf":
        raise ValueError(f"--bands is for --noise bandmf, got --noise {args.noise}")
    if args.noise == "bandmf":
        if args.bands is None:
            raise ValueError("--noise bandmf needs --bands B (an integer >= 1)")
        if args.bands < 1:
            raise ValueError(f"--bands must be an integer >= 1, got {args.bands}")
    if args.partitions is not None:
        if args.partitions < 1:
            raise ValueError(f"--partitions must be an integer >= 1, got {args.partitions}")
        if args.noise == "bandmf" and args.partitions < args.bands:
            raise ValueError(f"--partitions ({args.partitions}) must be >= --bands ({args.bands}): an example "
                             "would be in two steps of one band")
    if getattr(args, "sampling", "poisson") == "fixed_size" and (args.noise != "independent" or args.partitions):
        raise ValueError("--noise and --partitions need --sampling poisson (cyclic Poisson sampling)")


def noise_object(args: argparse.Namespace):
    """The dpjax.BandMF / dpjax.TreeAggregation that --noise names (None: independent)."""
    from dpjax import correlated_noise as cn

    return {"independent": None, "bandmf": cn.BandMF(bands=args.bands) if args.bands else None,
            "tree": cn.TreeAggregation(), "tree-one": cn.TreeAggregation(restarts=False)}[args.noise]


def _steps(args: argparse.Namespace) -> int:
    """Steps from --steps, or ceil(epochs * N / B) (TF Privacy's convention)."""
    if args.steps is not None:
        return args.steps
    epochs = args.epochs
    if not math.isfinite(epochs) or epochs <= 0:
        raise ValueError(f"--epochs must be a finite number > 0, got {epochs!r}")
    if args.dataset_size <= 0 or args.batch_size <= 0:
        return 0  # the accounting module reports the real error
    return math.ceil(epochs * args.dataset_size / args.batch_size)


def warn_large_delta(delta: float, n: int) -> None:
    """Say so on stderr when δ is not below 1/N (a weak guarantee)."""
    if n > 0 and 0 < delta < 1 and delta >= 1.0 / n:
        print(f"warning: delta = {delta:g} is not below 1/N = {1.0 / n:.3g} (N = {n}): a mechanism that "
              "publishes one random training example outright satisfies (0, 1/N)-DP; choose delta well "
              "below 1/N (e.g. 1e-5 or 1/N^1.1)", file=sys.stderr)


def _format_up(x: float, significant: int = 4) -> str:
    from dpjax.accounting import _round_up
    return _round_up(x, significant)


def _setting_line(args: argparse.Namespace, steps: int, accounted: dict) -> str:
    q = args.batch_size / args.dataset_size
    how = (f"--steps {steps}" if args.steps is not None else
           f"ceil({args.epochs:g} epochs * {args.dataset_size} / {args.batch_size})")
    line = (f"q = {args.batch_size}/{args.dataset_size} = {q:.6g}, "
            f"steps = {steps} ({how}), sampling = {args.sampling}, "
            f"accountant = {args.accountant}")
    if accounted["steps"] != steps or "sampling_rate" in accounted:
        line += (f"\nnoise = {args.noise}" + (f" with {args.bands} bands" if args.bands else "")
                 + f", cyclic over {args.partitions or args.bands or 1} parts: accounted as "
                 f"{accounted['steps']} DP-SGD steps at q = {accounted['sampling_rate']:.6g}")
    return line


# --------------------------------------------------------------------------
# dpjax epsilon
# --------------------------------------------------------------------------


def _epsilon_arguments(parser: argparse.ArgumentParser) -> None:
    _add_training_arguments(parser, noise=True)
    out = parser.add_argument_group("output")
    out.add_argument(
        "--statement", action="store_true",
        help="also print a privacy statement (mechanism, neighbouring relation, "
             "epsilon under RDP and PLD, dp-accounting version)")
    out.add_argument(
        "--l2-clip-norm", type=float, metavar="C", default=None,
        help="clipping norm C, only shown in the --statement")


def _epsilon_run(args: argparse.Namespace) -> int:
    from dpjax import accounting

    steps = _steps(args)
    warn_large_delta(args.delta, args.dataset_size)
    how = _accounted(args, steps)
    eps = accounting.epsilon(noise_multiplier=args.noise_multiplier, delta=args.delta,
                             accountant=args.accountant, **how)
    print(f"epsilon = {_format_up(eps)} (delta = {args.delta:g}, "
          f"noise multiplier = {args.noise_multiplier:g})")
    print(_setting_line(args, steps, how))
    if args.statement:
        print()
        print(accounting.privacy_statement(noise_multiplier=args.noise_multiplier, delta=args.delta,
                                           l2_clip_norm=args.l2_clip_norm, **how))
    return EXIT_OK


# --------------------------------------------------------------------------
# dpjax calibrate
# --------------------------------------------------------------------------


def _calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target-epsilon", type=float, required=True, metavar="EPS",
        help="the epsilon the whole training run may spend (> 0)")
    _add_training_arguments(parser, noise=False)


def _calibrate_run(args: argparse.Namespace) -> int:
    from dpjax import accounting

    steps = _steps(args)
    warn_large_delta(args.delta, args.dataset_size)
    how = _accounted(args, steps)
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=args.target_epsilon, delta=args.delta, accountant=args.accountant, **how)
    print(f"noise multiplier = {_format_up(sigma, 5)} (smallest sigma with "
          f"epsilon <= {args.target_epsilon:g} at delta = {args.delta:g})")
    print(_setting_line(args, steps, how))
    return EXIT_OK



# --------------------------------------------------------------------------
# dpjax train
# --------------------------------------------------------------------------


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from dpjax.defaults import DEFAULTS

    d = DEFAULTS
    data = parser.add_argument_group("data and model")
    data.add_argument("--data", metavar="PATH.npz", default=None,
                      help="your own arrays: an .npz with x_train, y_train, x_test, y_test "
                           "(integer labels); default: scikit-learn's digits, shipped offline")
    data.add_argument("--model", choices=("mlp", "cnn"), default=d["model"],
                      help=f"model to train (default {d['model']})")
    data.add_argument("--num-classes", type=int, default=None, metavar="K",
                      help="number of classes (default: largest training label + 1); test labels "
                           "must be among them")
    priv = parser.add_argument_group("privacy")
    priv.add_argument("--epsilon", type=float, default=3.0, metavar="EPS",
                      help="privacy budget epsilon (> 0; default 3). The noise is calibrated so the "
                           "planned run spends it; with --noise-multiplier, training stops "
                           "before exceeding it")
    priv.add_argument("--delta", type=float, default=1e-5,
                      help="privacy parameter delta (default 1e-5; keep it below 1/N)")
    priv.add_argument("--noise-multiplier", type=float, default=None, metavar="SIGMA",
                      help="use this noise multiplier instead of calibrating one")
    priv.add_argument("--clip-norm", type=float, default=d["l2_clip_norm"], metavar="C",
                      help=f"per-example L2 clipping norm (default {d['l2_clip_norm']})")
    priv.add_argument("--accountant", choices=("rdp", "pld"), default="rdp",
                      help="privacy accountant (default rdp)")
    _add_noise_arguments(priv, batch_help="default: the steps of an epoch, N / --batch-size")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=float, default=d["epochs"],
                     help=f"expected passes over the data (default {d['epochs']})")
    opt.add_argument("--batch-size", type=int, default=d["batch_size"],
                     help="expected (Poisson) batch size (default: the whole training set, q = 1)")
    opt.add_argument("--lr", type=float, default=d["learning_rate"],
                     help=f"learning rate (default {d['learning_rate']})")
    opt.add_argument("--seed", type=int, default=None,
                     help="one seed for initialisation, sampling and noise, for a reproducible "
                          "run (keep it secret for a real release: it determines the batches and "
                          "the noise). Default: seeds drawn from the operating system, stored with "
                          "the checkpoints (which are then secret like a key)")
    speed = parser.add_argument_group("speed and memory (same result either way)")
    speed.add_argument("--clipping-method", choices=("auto", "fast", "vmap"), default="auto",
                       help="per-example clipping engine (default auto: fast, vmap if the model defeats it)")
    speed.add_argument("--microbatch-size", type=int, default=None, metavar="N",
                       help="clip N examples at a time to bound memory")
    speed.add_argument("--keep-fraction", type=float, default=None, metavar="F",
                       help="fast path: keep a layer's per-example gradients when they are at most F times "
                            "its activations (default 0.25; 0: least memory; inf: one backward pass)")
    run = parser.add_argument_group("run")
    run.add_argument("--checkpoint-dir", default=None, help="write orbax checkpoints here")
    run.add_argument("--checkpoint-every", type=int, default=50, metavar="STEPS",
                     help="steps between checkpoints (default 50)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest valid checkpoint in --checkpoint-dir (an error "
                          "if there is none)")
    run.add_argument("--overwrite", action="store_true",
                     help="discard the checkpoints already in --checkpoint-dir and start again (their "
                          "privacy log is kept); without it or --resume such a folder is refused")
    run.add_argument("--out", default="dpjax-out", metavar="DIR",
                     help="where to write metrics.json and training.png (default dpjax-out)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_train_values(args: argparse.Namespace) -> None:
    from dpjax import validation

    validation.check_positive("--epsilon", args.epsilon)
    validation.check_open_unit("--delta", args.delta)
    if args.noise_multiplier is not None:
        validation.check_positive("--noise-multiplier", args.noise_multiplier)
    validation.check_positive("--clip-norm", args.clip_norm)
    validation.check_positive("--lr", args.lr)
    validation.check_positive("--epochs", args.epochs)
    validation.check_positive_int("--checkpoint-every", args.checkpoint_every)
    for name in ("batch_size", "microbatch_size"):
        if getattr(args, name) is not None:
            validation.check_positive_int("--" + name.replace("_", "-"), getattr(args, name))
    if args.keep_fraction is not None and not args.keep_fraction >= 0:
        raise ValueError(f"--keep-fraction must be >= 0 (or inf), got {args.keep_fraction}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")
    check_noise_arguments(args)
    if (args.resume or args.overwrite) and not args.checkpoint_dir:
        raise ValueError(f"--{'resume' if args.resume else 'overwrite'} needs --checkpoint-dir")
    if args.resume and args.overwrite:
        raise ValueError("pass --resume (continue the checkpoints) or --overwrite (discard them), not both")
    validation.check_output_dir("--out", args.out)
    if args.checkpoint_dir:
        _check_checkpoint_dir(args)


def _check_checkpoint_dir(args: argparse.Namespace) -> None:
    """The resume rules, checked before any work (dpjax.fit checks them again)."""
    import os

    from dpjax import checkpointing, validation

    path = args.checkpoint_dir
    had = os.path.isdir(path)
    validation.check_output_dir("--checkpoint-dir", path)
    manager = checkpointing.CheckpointManager(path)
    steps, log = manager.steps(), os.path.exists(manager.log_path)
    if args.resume and not steps:
        raise ValueError(f"--resume: nothing to resume in {path} ({'an empty folder' if had else 'no such folder'}"
                         f"{', but it has a privacy log' if log else ''}); drop --resume to start a new run")
    if not args.resume and not args.overwrite and (steps or log):
        raise ValueError(f"--checkpoint-dir {path} already holds a run (checkpoint steps {steps or 'none'}"
                         f"{', a privacy log' if log else ''}); pass --resume to continue it or --overwrite to "
                         "discard its checkpoints (its privacy log is kept)")


def _train_run(args: argparse.Namespace) -> int:
    """``dpjax train``: every argument, the data and the output folders are checked
    before JAX is imported or anything is trained."""
    from dpjax import datasets

    _check_train_values(args)
    data = datasets.load_npz(args.data) if args.data else datasets.load_digits()
    classes = datasets.num_classes(data, args.num_classes, source=args.data or "digits")
    warn_large_delta(args.delta, len(data["y_train"]))
    print("seeds: " + ("from --seed (keep it secret for a real release)" if args.seed is not None else
                       ("drawn from the operating system" + (" (stored with the checkpoints: keep them secret)"
                                                              if args.checkpoint_dir else ""))))
    from dpjax import training

    return training.run_cli(args, data, classes)


# --------------------------------------------------------------------------
# dpjax audit
# --------------------------------------------------------------------------


def _audit_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dpjax audit`` (here, not in dpjax.audit, so that they need no JAX import)."""
    g = parser.add_argument_group("audited DP-SGD setting")
    g.add_argument("--noise-multiplier", type=float, default=3.0, metavar="SIGMA",
                   help="noise multiplier (default 3)")
    g.add_argument("--steps", type=int, default=10, help="noisy steps (default 10)")
    g.add_argument("--sampling-rate", type=float, default=0.5, metavar="Q",
                   help="Poisson sampling rate of examples and canaries (default 0.5)")
    g.add_argument("--num-canaries", type=int, default=2000, metavar="M",
                   help="gradient-space canaries, each included with probability 1/2 (default 2000)")
    g.add_argument("--num-real", type=int, default=16,
                   help="real digits training examples (default 16)")
    g.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    g.add_argument("--confidence", type=float, default=0.95,
                   help="confidence of the lower bound (default 0.95)")
    g.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    g.add_argument("--loop", choices=AUDIT_LOOP_FORMS, default="plain",
                   help="the training-loop form to audit: plain, accumulation (4 micro-batches of one "
                        "draw), microbatch (clipped_grad(microbatch_size=128)) or nnx (dpjax.nnx.Optimizer); "
                        "default plain")
    parser.add_argument("--demo-config", action="store_true",
                        help="audit the privacy setting of `dpjax train`'s defaults instead: all "
                             "1,437 digits training examples, full batch (q = 1), the default "
                             "number of steps and the sigma calibrated for epsilon = 3 (a weak "
                             "audit: expect a lower bound near 0)")
    parser.add_argument("--out", default="dpjax-audit", metavar="DIR",
                        help="where to write audit_scores.png and audit.json (default dpjax-audit)")


def _audit_run(args: argparse.Namespace) -> int:
    from dpjax import audit

    return audit.run_cli(args)


# --------------------------------------------------------------------------
# dpjax pate
# --------------------------------------------------------------------------


def _pate_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("PATE")
    g.add_argument("--teachers", type=int, default=100, help="number of teachers (default 100)")
    g.add_argument("--aggregator", choices=("confident", "gnmax", "lnmax"), default="confident",
                   help="noisy vote (default confident: Confident-GNMax)")
    g.add_argument("--sigma", type=float, default=10.0,
                   help="GNMax noise std (sigma2 of Confident-GNMax; default 10)")
    g.add_argument("--threshold", type=float, default=60.0,
                   help="Confident-GNMax threshold T on the top vote count (default 60)")
    g.add_argument("--sigma1", type=float, default=30.0,
                   help="Confident-GNMax threshold-check noise std (default 30)")
    g.add_argument("--gamma", type=float, default=0.05,
                   help="LNMax: Laplace noise of scale 1/gamma (default 0.05)")
    g.add_argument("--queries", type=int, default=200,
                   help="public points the student may query (taken from the test split; "
                        "the rest evaluates the student; default 200)")
    g.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    g.add_argument("--use-abstained", action="store_true",
                   help="also train the student on abstained points (entropy minimisation)")
    g.add_argument("--seed", type=int, default=0)


def _pate_run(args: argparse.Namespace) -> int:
    from dpjax import pate

    return pate.run(args)


# --------------------------------------------------------------------------
# dpjax attack
# --------------------------------------------------------------------------

ATTACKS = ("fgsm", "blackbox", "transfer", "privacy")
ATTACK_TARGETS = ("dnn", "lr", "svm", "dt", "knn", "dp")  # dpjax.attacks.targets.KINDS + "dp" (tested)


def _attack_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("attack")
    g.add_argument("--attack", choices=ATTACKS, default="fgsm",
                   help="fgsm: white-box FGSM against --target; blackbox: substitute + Jacobian augmentation "
                        "against an oracle; transfer: the source x target transferability matrix; privacy: "
                        "dpjax.fit models at epsilon 1, 3, 8 against a non-private one (default fgsm)")
    g.add_argument("--target", choices=ATTACK_TARGETS, default="dnn",
                   help="model attacked: dnn (MLP), lr (logistic regression), svm (linear), dt (decision tree), "
                        "knn, dp (dpjax.fit's default CNN at --privacy-epsilon); dt and knn have no gradients, "
                        "so only --attack blackbox reaches them (default dnn)")
    g.add_argument("--eps", type=float, default=0.1,
                   help="FGSM size (L-infinity, inputs in [0, 1]; default 0.1: on 8x8 digits the papers' "
                        "0.3 for MNIST misclassifies nearly everything)")
    g.add_argument("--steps", type=int, default=1, help="FGSM steps (> 1: the iterative variant; default 1)")
    g.add_argument("--privacy-epsilon", type=float, default=3.0, help="epsilon of --target dp (default 3)")
    b = parser.add_argument_group("black-box attack")
    b.add_argument("--query-budget", type=int, default=10_000, help="oracle queries allowed (default 10000)")
    b.add_argument("--initial", type=int, default=150,
                   help="test examples the attacker starts from (the paper's 150); the rest evaluate (default 150)")
    b.add_argument("--rounds", type=int, default=6, help="substitute training rounds rho (default 6)")
    b.add_argument("--lam", type=float, default=0.1, help="Jacobian augmentation step lambda (default 0.1)")
    b.add_argument("--no-flip", action="store_true", help="keep lambda's sign (default: flip it every 3 rounds)")
    b.add_argument("--reservoir", type=int, default=None, metavar="KAPPA",
                   help="from round 3 on, augment only KAPPA random points (reservoir sampling)")
    r = parser.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="seed of the models and the attack (default 0)")
    r.add_argument("--out", default="dpjax-attack", metavar="DIR", help="where to write JSON and PNG")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_attack_values(args: argparse.Namespace) -> None:
    from dpjax import validation

    eps = validation.check_non_negative("--eps", args.eps)
    if eps > 1:
        raise ValueError(f"--eps must be in [0, 1] (inputs lie in [0, 1]), got {args.eps}")
    validation.check_positive_int("--steps", args.steps)
    validation.check_positive("--privacy-epsilon", args.privacy_epsilon)
    validation.check_positive_int("--rounds", args.rounds)
    validation.check_positive("--lam", args.lam)
    if args.reservoir is not None:
        validation.check_positive_int("--reservoir", args.reservoir)
    if not 1 <= args.initial <= 300:
        raise ValueError(f"--initial must be in [1, 300] (digits has 360 test examples; the rest evaluate), "
                         f"got {args.initial}")
    validation.check_positive_int("--query-budget", args.query_budget)
    if args.attack == "blackbox" and args.query_budget < args.initial:
        raise ValueError(f"--query-budget {args.query_budget} is below --initial {args.initial}: labelling the "
                         "initial set alone needs that many queries")
    if args.attack == "fgsm" and args.target in ("dt", "knn"):
        raise ValueError(f"--target {args.target} has no gradients for white-box FGSM: use --attack blackbox "
                         "(a substitute's gradients) or --attack transfer")
    validation.check_output_dir("--out", args.out)


def _attack_run(args: argparse.Namespace) -> int:
    _check_attack_values(args)
    from dpjax.attacks import run

    return run.run_cli(args)

# --------------------------------------------------------------------------
# Registry and parser
# --------------------------------------------------------------------------

_EXAMPLE_EPSILON = (
    "example (the TensorFlow Privacy MNIST tutorial):\n"
    "  dpjax epsilon --dataset-size 60000 --batch-size 256 \\\n"
    "      --noise-multiplier 1.1 --epochs 60 --delta 1e-5\n"
    "  -> epsilon = 2.597 with the RDP accountant (add --accountant pld for 2.382)"
)
_EXAMPLE_CALIBRATE = (
    "example:\n"
    "  dpjax calibrate --target-epsilon 3 --dataset-size 60000 \\\n"
    "      --batch-size 256 --epochs 60 --delta 1e-5\n"
    "  -> the smallest noise multiplier that keeps epsilon <= 3 (about 1.014)"
)

_EXAMPLE_TRAIN = (
    "examples:\n"
    "  dpjax train                          # small CNN on digits at epsilon = 3\n"
    "  dpjax train --epsilon 1 --model mlp --out runs/eps1\n"
    "  dpjax train --data mine.npz --checkpoint-dir ckpt   # then add --resume after a stop"
)

COMMANDS: List[Command] = [
    Command(
        name="train",
        help="train a model with DP-SGD and report the epsilon spent",
        add_arguments=_train_arguments,
        run=_train_run,
        description=_wrap("Train a small model with DP-SGD (Poisson sampling, per-example "
                          "clipping, Gaussian noise) and print its test accuracy, the epsilon "
                          "spent and a privacy statement.", _EPS_DELTA_LINE),
        epilog=_EXAMPLE_TRAIN,
    ),
    Command(
        name="epsilon",
        help="privacy spent (epsilon) by a DP-SGD training run",
        add_arguments=_epsilon_arguments,
        run=_epsilon_run,
        description=_wrap("Compute the epsilon spent by DP-SGD training.",
                          _EPS_DELTA_LINE),
        epilog=_EXAMPLE_EPSILON,
    ),
    Command(
        name="calibrate",
        help="smallest noise multiplier that meets a target epsilon",
        add_arguments=_calibrate_arguments,
        run=_calibrate_run,
        description=_wrap("Find the smallest noise multiplier sigma for which "
                          "DP-SGD training stays within a target epsilon.",
                          _EPS_DELTA_LINE),
        epilog=_EXAMPLE_CALIBRATE,
    ),
    Command(
        name="audit",
        help="empirical lower bound on epsilon (one-run canary audit of DP-SGD)",
        add_arguments=_audit_arguments,
        run=_audit_run,
        description=_wrap("Audit dpjax's DP-SGD on digits with gradient-space canaries "
                          "(Steinke, Nasr & Jagielski 2023, one training run): print the "
                          "empirical lower bound on epsilon beside the accounted epsilon "
                          "and plot the canary scores.", _EPS_DELTA_LINE),
        epilog="example:\n  dpjax audit --out runs/audit   # about 10 s on a CPU",
    ),
    Command(
        name="pate",
        help="PATE: teachers on disjoint shards, noisy votes label a student",
        add_arguments=_pate_arguments,
        run=_pate_run,
        description=_wrap("Train an ensemble of teachers on disjoint shards of digits, label "
                          "public points with a noisy vote (LNMax, GNMax or Confident-GNMax) "
                          "and train a student on them; print the accuracies, the answered "
                          "queries and epsilon (data-independent and data-dependent).",
                          _EPS_DELTA_LINE),
        epilog="examples:\n  dpjax pate\n  dpjax pate --aggregator gnmax --sigma 15\n  dpjax pate --teachers 250 --threshold 150 --sigma1 75 --sigma 25",
    ),    Command(
        name="attack",
        help="attacks on trained models: FGSM, the black-box substitute attack, transferability",
        add_arguments=_attack_arguments,
        run=_attack_run,
        description=_wrap("Attack models trained on digits: white-box FGSM (Goodfellow et al. 2015), the "
                          "black-box attack of Papernot et al. 2017 (a substitute trained from an oracle's "
                          "labels, grown by Jacobian-based dataset augmentation), the cross-technique "
                          "transferability matrix (Papernot et al. 2016), and private against non-private "
                          "targets. Writes attack_<name>.json and .png under --out."),
        epilog="examples:\n  dpjax attack --attack fgsm --target dp --privacy-epsilon 1\n"
               "  dpjax attack --attack blackbox --target knn --query-budget 2000\n"
               "  dpjax attack --attack transfer --eps 0.1\n  dpjax attack --attack privacy",
    ),
]


def register_command(command: Command) -> None:
    """Adds (or replaces, by name) a subcommand."""
    COMMANDS[:] = [c for c in COMMANDS if c.name != command.name] + [command]


def build_parser(commands: Optional[Sequence[Command]] = None,
                 only: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``dpjax`` parser. With ``only``, just that command's options are
    built (the others keep their one-line help): options may import modules."""
    parser = argparse.ArgumentParser(
        prog="dpjax",
        description=_wrap("dpjax: differentially private training for JAX.",
                          _EPS_DELTA_LINE),
        epilog="Run 'dpjax <command> --help' for a command's options.\n\n"
               + _EXAMPLE_EPSILON,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for command in COMMANDS if commands is None else commands:
        p = sub.add_parser(
            command.name, help=command.help,
            description=command.description or _wrap(command.help),
            epilog=command.epilog or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if only is None or only == command.name:
            command.add_arguments(p)
        p.set_defaults(_run=command.run)
    parser.command_parsers = sub.choices  # so main can report a command's errors with its usage
    return parser


def _command_in(argv: Sequence[str]) -> Optional[str]:
    names = {c.name for c in COMMANDS}
    return next((a for a in argv if a in names), None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``dpjax``; returns the exit status (0 ok, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_command_in(argv) or "")
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # say it with the command's usage line, not the top-level one
            parser.command_parsers.get(getattr(args, "command", None) or "", parser).error(
                "unrecognized arguments: " + " ".join(unknown))
    except SystemExit as exit_:  # --help (0) or an argparse usage error (2)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args._run(args))
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
