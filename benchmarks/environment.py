"""What a result was measured on: device, memory, library versions."""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import re
import sys
from typing import Optional

import jax


def package_version(dist: str) -> Optional[str]:
    """Installed version of a distribution, or ``None``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def importable(module: str) -> tuple[bool, str]:
    """(True, version) when ``module`` imports, else (False, why not)."""
    try:
        m = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return False, f"{module} not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return True, str(getattr(m, "__version__", package_version(module) or "unknown"))


def device_info() -> dict:
    """The first JAX device: platform, kind, and its memory limit where reported."""
    d = jax.devices()[0]
    info = {
        "platform": d.platform,
        "device_kind": getattr(d, "device_kind", "unknown"),
        "device_count": jax.device_count(),
        "bytes_limit": None,
    }
    stats = memory_stats(d)
    if stats:
        info["bytes_limit"] = stats.get("bytes_limit")
    return info


def memory_stats(device=None) -> Optional[dict]:
    """``device.memory_stats()`` or ``None`` where the backend reports nothing (CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - unsupported on this backend
        return None
    return dict(stats) if stats else None


def peak_bytes(device=None) -> Optional[int]:
    stats = memory_stats(device)
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def device_label(info: Optional[dict] = None) -> str:
    """A folder name for the device, e.g. ``gpu-nvidia_h200`` or ``cpu-cpu``."""
    info = info or device_info()
    label = f"{info['platform']}-{info['device_kind']}".lower()
    return re.sub(r"[^a-z0-9._-]+", "_", label).strip("_")


def versions() -> dict:
    """Versions of Python, the JAX stack and the libraries compared."""
    v = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": package_version("jaxlib"),
        "flax": package_version("flax"),
        "optax": package_version("optax"),
        "numpy": package_version("numpy"),
        "dp_accounting": package_version("dp-accounting") or package_version("dp_accounting"),
        "dpjax": package_version("dpjax"),
        "jax_privacy": package_version("jax-privacy") or package_version("jax_privacy"),
    }
    try:
        import dpjax

        v["dpjax"] = dpjax.__version__
    except Exception:  # noqa: BLE001
        pass
    return v


def write_rows(out_dir: str, module: str, argv, rows: list) -> str:
    """Write ``<out_dir>/<last part of module>.json``: device, versions, the command
    (``python -m module argv...``) and ``rows``; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, module.rsplit(".", 1)[-1] + ".json")
    with open(path, "w") as f:
        json.dump({"device": device_info(), "versions": versions(),
                   "command": f"python -m {module} " + " ".join(argv or sys.argv[1:]), "rows": rows}, f, indent=1)
    return path


def host_info() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "argv": " ".join(sys.argv),
        "env": {k: os.environ[k] for k in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                          "XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH") if k in os.environ},
    }
