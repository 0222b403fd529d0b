"""Experiments: cross-technique transferability (Papernot, McDaniel & Goodfellow,
"Transferability in Machine Learning", 2016) and private against non-private
targets under the same attacks."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import numpy as np

from dpjax.attacks import gradient_sign as fgsm_
from dpjax.attacks import targets as targets_
from dpjax.attacks.blackbox import BlackBoxSettings, blackbox_attack
from dpjax.attacks.oracle import Oracle

SOURCES = targets_.DIFFERENTIABLE
TARGETS = targets_.KINDS


def halves(data, seed: int = 0):
    """Two disjoint, stratified halves of the training split: sources train on
    one, targets on the other (as in the published experiment)."""
    from sklearn.model_selection import train_test_split

    xa, xb, ya, yb = train_test_split(np.asarray(data["x_train"]), np.asarray(data["y_train"]), test_size=0.5,
                                      random_state=seed, stratify=np.asarray(data["y_train"]))
    return (xa, ya), (xb, yb)


def transferability(data, *, eps: float = 0.3, sources: Sequence[str] = SOURCES,
                    targets: Sequence[str] = TARGETS, seed: int = 0, progress: bool = False) -> Dict:
    """FGSM examples of the test split crafted on each source, misclassified by
    each target: ``matrix[source][target]`` (a fraction), plus clean errors."""
    from tqdm.auto import tqdm

    (xa, ya), (xb, yb) = halves(data, seed)
    x_test, y_test = np.asarray(data["x_test"]), np.asarray(data["y_test"])
    trained = {}
    for name in tqdm([f"source {s}" for s in sources] + [f"target {t}" for t in targets], desc="training",
                     disable=not progress):
        role, kind = name.split()
        x, y = (xa, ya) if role == "source" else (xb, yb)
        trained[name] = targets_.train_target(kind, x, y, seed=seed)
    matrix, clean = {}, {}
    for t in targets:
        clean[t] = fgsm_.misclassification_rate(trained[f"target {t}"].predict, x_test, y_test)
    for s in sources:
        adv = np.asarray(fgsm_.fgsm(trained[f"source {s}"].logits, x_test, y_test, eps))
        matrix[s] = {t: fgsm_.misclassification_rate(trained[f"target {t}"].predict, adv, y_test) for t in targets}
    return {"eps": eps, "matrix": matrix, "clean_error": clean, "sources": list(sources), "targets": list(targets)}


@dataclasses.dataclass(frozen=True)
class PrivacySweep:
    """Which private targets and which attack sizes :func:`private_vs_nonprivate` uses."""

    epsilons: Sequence[float] = (1.0, 3.0, 8.0)
    fgsm_eps: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3)
    initial: int = 150
    blackbox: BlackBoxSettings = BlackBoxSettings(rounds=5)
    seed: int = 0


def private_vs_nonprivate(data, sweep: PrivacySweep = PrivacySweep(), *, progress: bool = False) -> List[Dict]:
    """White-box FGSM and the black-box attack against ``dpjax.fit`` models at each
    ε and the same CNN trained without privacy: misclassification per ``fgsm_eps``."""
    from tqdm.auto import tqdm

    x_test, y_test = np.asarray(data["x_test"]), np.asarray(data["y_test"])
    x0, x_eval, y_eval = x_test[:sweep.initial], x_test[sweep.initial:], y_test[sweep.initial:]
    rows = []
    for eps in tqdm([*sweep.epsilons, float("inf")], desc="targets", disable=not progress):
        target = (targets_.nonprivate_cnn_target(data, seed=sweep.seed) if eps == float("inf")
                  else targets_.private_target(eps, data, seed=sweep.seed))
        white = {e: fgsm_.misclassification_rate(target.predict, fgsm_.fgsm(target.logits, x_eval, y_eval, e),
                                                 y_eval) for e in sweep.fgsm_eps}
        attack = blackbox_attack(Oracle(target.predict, budget=10**6), x0, evaluate=target.predict, x_eval=x_eval,
                                 y_eval=y_eval, settings=sweep.blackbox, seed=sweep.seed)
        black = {e: fgsm_.misclassification_rate(target.predict, fgsm_.fgsm(attack.substitute, x_eval, y_eval, e),
                                                 y_eval) for e in sweep.fgsm_eps}
        rows.append({"target": target.name, "epsilon": "inf" if eps == float("inf") else eps,
                     "clean_accuracy": 1.0 - white[0.0] if 0.0 in white else None,
                     "whitebox": {str(e): v for e, v in white.items()},
                     "blackbox": {str(e): v for e, v in black.items()},
                     "blackbox_queries": attack.queries, "substitute_agreement": attack.rounds[-1].agreement})
    return rows
