"""Input checks shared by every public entry point.

Each check raises ``ValueError`` naming the parameter, the value it got and the
range it allows, so a bad call fails before anything is half-applied.
"""

from __future__ import annotations

import math
import numbers


def _as_real(name: str, value, allowed: str = "") -> float:
    # ``allowed`` ("> 0", "in (0, 1)") goes into the message: say what is allowed.
    what = f"a finite number {allowed}".rstrip()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:
            value = float(value)  # numpy / jax scalars
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be {what}, got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_positive(name: str, value) -> float:
    """``value > 0`` and finite."""
    v = _as_real(name, value, "> 0")
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def check_non_negative(name: str, value) -> float:
    """``value >= 0`` and finite."""
    v = _as_real(name, value, ">= 0")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def check_open_unit(name: str, value) -> float:
    """``0 < value < 1`` (e.g. δ)."""
    v = _as_real(name, value, "in the open interval (0, 1)")
    if not 0 < v < 1:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return v


def check_rate(name: str, value) -> float:
    """``0 < value <= 1`` (e.g. a sampling rate q)."""
    v = _as_real(name, value, "in (0, 1]")
    if not 0 < v <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return v


def _as_int(name: str, value, what: str) -> int:
    """An exact integer: Python/numpy ints as they are (no float round-trip,
    which would lose precision above 2**53), floats only if integral."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {what}, got {value!r}") from None
    if not math.isfinite(as_float) or as_float != int(as_float):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(as_float)


def check_positive_int(name: str, value) -> int:
    """An integer ``>= 1`` (floats with an integer value are accepted)."""
    v = _as_int(name, value, "a positive integer")
    if v < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return v


def check_non_negative_int(name: str, value) -> int:
    """An integer ``>= 0``."""
    v = _as_int(name, value, "a non-negative integer")
    if v < 0:
        raise ValueError(f"{name} must be a non-negative integer (>= 0), got {value!r}")
    return v


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_output_dir(name: str, path) -> str:
    """``path`` is a folder this process can write to (created if missing), not a file."""
    import os
    import tempfile

    if not isinstance(path, str) or not path:
        raise ValueError(f"{name} must be a folder path, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name} {path!r} exists and is not a folder; name a folder (it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dpjax-write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{name} {path!r} is not a writable folder ({e.strerror or e})") from None
    return path
