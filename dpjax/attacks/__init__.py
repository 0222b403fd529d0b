"""Attacks on trained models, to ask how robust a (private) model is.

* :func:`fgsm` — the fast gradient sign method and its iterative variant
  (white box: the model's input gradients).
* :class:`Oracle` and :func:`blackbox_attack` — the black-box attack: a
  substitute trained from an oracle's labels, grown by Jacobian-based dataset
  augmentation, whose FGSM examples transfer to the oracle.
* :func:`transferability` and :func:`private_vs_nonprivate` — the experiments
  behind ``dpjax attack --attack transfer`` and ``--attack privacy``.
"""

from dpjax.attacks.blackbox import BlackBoxResult, BlackBoxSettings, Round, blackbox_attack, jacobian_augmentation
from dpjax.attacks.gradient_sign import fgsm, input_gradient, logits_fn, misclassification_rate, random_sign
from dpjax.attacks.oracle import Oracle, QueryBudgetExceeded
from dpjax.attacks.targets import DNN, PlainTraining, Target, train_plain, train_target
from dpjax.attacks.transfer import PrivacySweep, private_vs_nonprivate, transferability

__all__ = ["BlackBoxResult", "BlackBoxSettings", "DNN", "Oracle", "PlainTraining", "PrivacySweep",
           "QueryBudgetExceeded", "Round", "Target", "blackbox_attack", "fgsm", "input_gradient",
           "jacobian_augmentation", "logits_fn", "misclassification_rate", "private_vs_nonprivate",
           "random_sign", "train_plain", "train_target", "transferability"]
