"""How a benchmark subprocess hands its results back: one JSON object a line.

Each result line starts with :data:`MARKER`, so warnings and log lines that
libraries print on the same stream are ignored. A subprocess prints every
result as soon as it has it; if it then dies (out of memory, a timeout), the
results printed before are kept. Pure Python: the PyTorch runner uses it too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Iterable, List, Optional, Tuple

MARKER = "@@dpjax-bench "


def finite(obj):
    """JSON without NaN/Infinity (not valid JSON): they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def emit(obj: dict) -> None:
    """Print one result line (flushed at once)."""
    sys.stdout.write(MARKER + json.dumps(finite(obj)) + "\n")
    sys.stdout.flush()


def parse(lines: Iterable[str]) -> List[dict]:
    """The result objects among ``lines``."""
    out = []
    for line in lines:
        if line.startswith(MARKER):
            try:
                out.append(json.loads(line[len(MARKER):]))
            except json.JSONDecodeError:
                pass
    return out


def run_module(module: str, args: List[str], timeout_s: float, env: Optional[dict] = None,
               cwd: Optional[str] = None, python: Optional[str] = None) -> Tuple[List[dict], Optional[str], float]:
    """Run ``python -m module *args`` (``python``: this interpreter unless given);
    return (results, error or None, wall seconds).

    The error is ``None`` when the process exited with status 0; otherwise it
    names the exit status or the timeout and quotes the end of stderr.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([python or sys.executable, "-m", module, *args], capture_output=True, text=True,
                              timeout=max(1.0, timeout_s), env=full_env, cwd=cwd)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
        error = None if rc == 0 else f"exit status {rc}: {_tail(err)}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        error = f"timed out after {timeout_s:.0f} s: {_tail(err)}"
    return parse(out.splitlines()), error, time.perf_counter() - t0


def _tail(text: str, lines: int = 6, chars: int = 1500) -> str:
    kept = [ln for ln in (text or "").strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-chars:]
