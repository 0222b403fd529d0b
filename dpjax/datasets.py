"""Data sets that ship with dpjax's dependencies, and the user's own arrays.

The default data set is scikit-learn's handwritten digits (1,797 8×8 images,
10 classes), which is installed with scikit-learn, so everything works offline.
"""

from __future__ import annotations

import os
from typing import Dict

import numpy as np

Arrays = Dict[str, np.ndarray]
REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Arrays:
    """Digits as float32 images in [0, 1], shape (N, 8, 8, 1), int32 labels.

    A stratified train/test split with a fixed seed (1,437 / 360 by default).

    >>> data = load_digits()
    >>> data["x_train"].shape, data["x_test"].shape
    ((1437, 8, 8, 1), (360, 8, 8, 1))
    """
    try:
        from sklearn.datasets import load_digits as sk_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency of the demo
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def validation_split(data: Arrays, *, fraction: float = 0.2, seed: int = 0) -> Arrays:
    """Hold out part of the *training* split for choosing hyper-parameters.

    Returns new ``x_train``/``y_train`` (the rest) and ``x_test``/``y_test``
    (the held-out validation rows), stratified by label; the real test split is
    not touched, so it stays an honest measure of the choice.

    >>> parts = validation_split(load_digits())
    >>> parts["x_train"].shape[0], parts["x_test"].shape[0]
    (1149, 288)
    """
    from sklearn.model_selection import train_test_split

    x_fit, x_val, y_fit, y_val = train_test_split(
        np.asarray(data["x_train"]), np.asarray(data["y_train"]), test_size=fraction, random_state=seed,
        stratify=np.asarray(data["y_train"]))
    return {"x_train": x_fit, "y_train": y_fit, "x_test": x_val, "y_test": y_val}


def load_npz(path: str) -> Arrays:
    """The user's own arrays from an ``.npz`` with x_train, y_train, x_test, y_test.

    Labels must be integer class ids in [0, num_classes); features any float
    array with a leading example axis. Raises ``ValueError`` (or
    ``FileNotFoundError``) with what is wrong and what is expected.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"--data {path} is a folder; it needs an .npz file (np.savez(path, x_train=..., ...))")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise ValueError(f"--data {path} is a single .npy array, not an .npz archive of x_train, y_train, "
                         "x_test, y_test: save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    if not magic.startswith(b"PK"):
        raise ValueError(f"--data {path} is not an .npz archive (an .npz is a zip of .npy arrays; this file "
                         f"starts with {magic!r}, text or CSV?): save the arrays with np.savez(path, x_train=..., "
                         "y_train=..., x_test=..., y_test=...)")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"could not read {path} as an .npz archive of arrays ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(
            f"{path} is missing key(s) {missing}; it has {sorted(data)} and needs "
            f"{list(REQUIRED_KEYS)} (np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...))"
        )
    return check_arrays(data, source=path)


# Implied classes (max label + 1) above this many times the distinct labels, plus
# some slack, look like ids rather than class indices (the head would be huge).
_SPARSE_LABELS = 10


def num_classes(data: Arrays, requested=None, *, source: str = "data") -> int:
    """The number of classes: from the training labels (max + 1), or ``requested``.

    Refuses test labels outside those classes, and labels that look like ids
    (a maximum far above the number of distinct labels) unless the classes are
    given explicitly.

    >>> num_classes({"y_train": np.array([0, 1, 2]), "y_test": np.array([2, 0])})
    3
    """
    y_train, y_test = np.asarray(data["y_train"]), np.asarray(data["y_test"])
    implied = int(y_train.max()) + 1
    if requested is None:
        distinct = len(np.unique(y_train))
        if implied > _SPARSE_LABELS * distinct + 10:
            raise ValueError(
                f"{source}: the largest training label is {implied - 1} but there are only {distinct} distinct "
                f"labels: these look like ids, not class indices 0..K-1 (the model would get {implied} "
                "outputs). Relabel them to 0..K-1, or pass --num-classes K if you mean it.")
        classes = implied
    else:
        classes = int(requested)
        if classes < 2 or classes > 100_000:
            raise ValueError(f"--num-classes must be in [2, 100000], got {requested}")
        if implied > classes:
            raise ValueError(f"{source}: y_train has label {implied - 1}, outside --num-classes {classes} "
                             f"(labels must be in 0..{classes - 1})")
    if int(y_test.max()) >= classes:
        raise ValueError(
            f"{source}: y_test has label {int(y_test.max())}, but the classes are 0..{classes - 1} "
            + ("(from the training labels); a test class the model never trains on cannot be learnt: check the "
               "labels, or pass --num-classes" if requested is None else f"(--num-classes {classes})"))
    return classes


def check_arrays(data: Arrays, *, source: str = "data") -> Arrays:
    """Validate shapes and dtypes; returns float32 features and int32 labels."""
    out = {}
    for split in ("train", "test"):
        x, y = np.asarray(data[f"x_{split}"]), np.asarray(data[f"y_{split}"])
        if x.ndim < 2:
            raise ValueError(f"{source}: x_{split} must have shape (examples, features...), got {x.shape}")
        if y.ndim != 1:
            raise ValueError(f"{source}: y_{split} must be a 1-D vector of class ids, got shape {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"{source}: x_{split} has {len(x)} examples but y_{split} has {len(y)}")
        if len(x) == 0:
            raise ValueError(f"{source}: x_{split} is empty")
        if not np.issubdtype(y.dtype, np.integer):
            if not np.all(np.equal(np.mod(y, 1), 0)):
                raise ValueError(f"{source}: y_{split} must hold integer class ids, got dtype {y.dtype}")
        if y.min() < 0:
            raise ValueError(f"{source}: y_{split} has negative class ids")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{source}: x_{split} has NaN or Inf values")
        out[f"x_{split}"] = x.astype(np.float32)
        out[f"y_{split}"] = y.astype(np.int32)
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise ValueError(
            f"{source}: x_train examples have shape {out['x_train'].shape[1:]} but x_test "
            f"examples have {out['x_test'].shape[1:]}"
        )
    return out
