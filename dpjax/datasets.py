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


def load_npz(path: str) -> Arrays:
    """The user's own arrays from an ``.npz`` with x_train, y_train, x_test, y_test.

    Labels must be integer class ids in [0, num_classes); features any float
    array with a leading example axis. Raises ``ValueError`` (or
    ``FileNotFoundError``) with what is wrong and what is expected.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"could not read {path} as an .npz archive: {e}") from None
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(
            f"{path} is missing key(s) {missing}; it has {sorted(data)} and needs "
            f"{list(REQUIRED_KEYS)} (np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...))"
        )
    return check_arrays(data, source=path)


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
