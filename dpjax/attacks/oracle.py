"""A remote model as a black-box attacker sees it: labels for the inputs it sends,
and nothing else, up to a query budget."""

from __future__ import annotations

from typing import Callable

import numpy as np

from dpjax import validation


class QueryBudgetExceeded(RuntimeError):
    """A request would take the oracle past its query budget; nothing was answered."""


class Oracle:
    """Labels only, counted, refused past ``budget`` queries (one query per input).

    The model is held in a closure: the object has no attribute that leads to its
    scores, parameters or training data, only :meth:`label`, :attr:`queries`,
    :attr:`budget` and :attr:`remaining`.

    >>> import numpy as np
    >>> oracle = Oracle(lambda x: (x.sum(axis=1) > 0).astype(int), budget=3)
    >>> oracle.label(np.array([[1.0], [-1.0]])), oracle.remaining
    (array([1, 0]), 1)
    >>> oracle.label(np.zeros((2, 1)))
    Traceback (most recent call last):
    ...
    dpjax.attacks.oracle.QueryBudgetExceeded: 2 queries asked, 1 left of the budget of 3: nothing answered
    """

    __slots__ = ("_answer", "_count", "_budget")

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], budget: int):
        budget = validation.check_positive_int("budget", budget)
        if not callable(predict):
            raise TypeError("predict must map a batch of inputs to integer labels")

        def answer(x):  # the only way to the model
            return np.asarray(predict(x)).astype(np.int64).reshape(len(x))

        self._answer, self._count, self._budget = answer, 0, int(budget)

    @property
    def queries(self) -> int:
        return self._count

    @property
    def budget(self) -> int:
        return self._budget

    @property
    def remaining(self) -> int:
        return self._budget - self._count

    def label(self, x) -> np.ndarray:
        """The oracle's labels for the batch ``x``, or :class:`QueryBudgetExceeded`."""
        x = np.asarray(x, np.float32)
        if x.ndim < 2 or len(x) == 0:
            raise ValueError(f"label needs a non-empty batch (examples, features...), got shape {x.shape}")
        if len(x) > self.remaining:
            raise QueryBudgetExceeded(f"{len(x)} queries asked, {self.remaining} left of the budget of "
                                      f"{self._budget}: nothing answered")
        self._count += len(x)
        return self._answer(x)

    def __repr__(self) -> str:
        return f"Oracle(queries={self._count}, budget={self._budget})"
