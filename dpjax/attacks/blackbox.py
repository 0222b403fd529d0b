"""The black-box attack of Papernot, McDaniel, Goodfellow, Jha, Celik & Swami,
"Practical Black-Box Attacks against Machine Learning" (ASIA CCS 2017).

The attacker has an :class:`~dpjax.attacks.oracle.Oracle` (labels only, a query
budget) and a small set of inputs. It trains a local substitute on the oracle's
labels and grows the set by Jacobian-based dataset augmentation,

    S_{ρ+1} = S_ρ ∪ {x + λ_ρ · sign(∂F_{Õ(x)}(x) / ∂x) : x ∈ S_ρ},

where F is the substitute's softmax output and Õ(x) the oracle's label: each new
point moves along the direction in which the substitute's output for the
oracle's class changes most, where the decision boundary is. Then it crafts
FGSM examples on the substitute and sends them to the oracle: they transfer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.attacks import gradient_sign as fgsm_
from dpjax.attacks.oracle import Oracle
from dpjax.attacks.targets import DNN, PlainTraining, train_plain


@dataclasses.dataclass(frozen=True)
class BlackBoxSettings:
    """The attack's knobs (the paper's names in brackets).

    rounds [ρ]: substitute training epochs, each followed by an augmentation
    (the last is not augmented). step [λ]: augmentation step size.
    flip_every [τ]: λ changes sign every τ rounds (the paper's periodic step
    size), ``None`` never. reservoir [κ]: from round ``reservoir_after`` [σ] on,
    augment only κ points drawn at random (reservoir sampling), so queries grow
    linearly instead of doubling; ``None`` doubles every round.
    eps: FGSM size on the substitute. hidden / num_classes: the substitute
    MLP's widths and outputs. training: how the substitute is fitted
    each round (from scratch, on every point labelled so far).
    """

    rounds: int = 6
    step: float = 0.1
    flip_every: Optional[int] = 3
    reservoir: Optional[int] = None
    reservoir_after: int = 3
    eps: float = 0.3
    hidden: tuple = (128, 128)
    num_classes: int = 10
    training: PlainTraining = PlainTraining(epochs=20, batch_size=32, learning_rate=3e-3)


@dataclasses.dataclass
class Round:
    round: int
    queries: int
    substitute_size: int
    agreement: float  # substitute == target on the evaluation inputs
    misclassification: float  # target wrong on FGSM examples crafted on the substitute


@dataclasses.dataclass
class BlackBoxResult:
    rounds: List[Round]
    substitute: Callable  # logits function of the final substitute
    queries: int


def jacobian_augmentation(substitute: fgsm_.LogitsFn, x, labels, step: float, lo=0.0, hi=1.0):
    """``x + step · sign(∂ softmax(F(x))[label] / ∂x)``, clipped to the input range."""
    def prob_of_label(xb):
        probs = jax.nn.softmax(substitute(xb))
        return jnp.take_along_axis(probs, labels[:, None], axis=1).sum()

    grad = jax.grad(prob_of_label)(jnp.asarray(x, jnp.float32))
    return np.asarray(jnp.clip(x + step * jnp.sign(grad), lo, hi))


def _round_step(s: BlackBoxSettings, rho: int) -> float:
    if s.flip_every is None:
        return s.step
    return s.step * (-1.0) ** (rho // s.flip_every)


def _points_to_augment(s: BlackBoxSettings, rho: int, n: int, budget_left: int, rng) -> np.ndarray:
    take = n
    if s.reservoir is not None and rho >= s.reservoir_after:
        take = min(take, s.reservoir)
    take = min(take, budget_left)  # never ask the oracle for more than is left
    return np.sort(rng.choice(n, size=take, replace=False)) if take < n else np.arange(n)


def blackbox_attack(oracle: Oracle, x_initial, *, evaluate: Callable[[np.ndarray], np.ndarray], x_eval, y_eval,
                    settings: BlackBoxSettings = BlackBoxSettings(), seed: int = 0,
                    progress: bool = False) -> BlackBoxResult:
    """Run the attack; ``evaluate`` (the target's labels, *not* through the oracle:
    the experimenter's view) scores each round on ``x_eval``/``y_eval``."""
    from tqdm.auto import tqdm

    if settings.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {settings.rounds}")
    rng = np.random.default_rng(seed)
    model = DNN(settings.num_classes, hidden=tuple(settings.hidden))
    x_s = np.asarray(x_initial, np.float32)
    y_s = oracle.label(x_s)
    target_eval = np.asarray(evaluate(np.asarray(x_eval)))
    history = []
    for rho in tqdm(range(settings.rounds), desc="black-box rounds", disable=not progress):
        params = train_plain(model, x_s, y_s, seed=seed + rho, settings=settings.training)
        substitute = jax.jit(lambda x, p=params: model.apply(p, x))
        agree = float(np.mean(np.asarray(jnp.argmax(substitute(jnp.asarray(x_eval)), -1)) == target_eval))
        adv = fgsm_.fgsm(substitute, x_eval, y_eval, settings.eps)
        history.append(Round(rho, oracle.queries, len(x_s), agree,
                             fgsm_.misclassification_rate(evaluate, adv, y_eval)))
        if rho == settings.rounds - 1 or oracle.remaining == 0:
            break
        pick = _points_to_augment(settings, rho, len(x_s), oracle.remaining, rng)
        new = jacobian_augmentation(substitute, x_s[pick], jnp.asarray(y_s[pick]), _round_step(settings, rho))
        x_s = np.concatenate([x_s, new])
        y_s = np.concatenate([y_s, oracle.label(new)])
    return BlackBoxResult(history, substitute, oracle.queries)


def queries_needed(initial: int, settings: BlackBoxSettings) -> int:
    """The queries the attack spends with an unlimited budget."""
    n, total = initial, initial
    for rho in range(settings.rounds - 1):
        add = n if settings.reservoir is None or rho < settings.reservoir_after else min(n, settings.reservoir)
        n, total = n + add, total + add
    return total


__all__ = ["BlackBoxResult", "BlackBoxSettings", "Round", "blackbox_attack", "jacobian_augmentation",
           "queries_needed"]
