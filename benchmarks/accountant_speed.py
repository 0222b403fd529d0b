"""How long ``dpjax.accounting.epsilon`` takes after many steps (RDP and PLD).

A training loop that prints ε every epoch, or a sweep that calibrates σ, calls
the accountant often; this times one call after ``steps`` (default 10⁵) steps
of Poisson-sampled DP-SGD, cold (first call in the process for that setting)
and warm (the same call again).
"""

from __future__ import annotations

import time
import traceback
import warnings

import dpjax

# (σ, q): a small-batch setting and the MNIST-like one of the TF Privacy tutorial.
SETTINGS = ((1.0, 0.01), (1.1, 256 / 60000))
DELTA = 1e-5


def measure(steps: int = 100_000, settings=SETTINGS, accountants=("rdp", "pld")) -> list:
    rows = []
    for sigma, q in settings:
        for acc in accountants:
            row = {"kind": "accountant", "accountant": acc, "noise_multiplier": sigma, "sampling_rate": q,
                   "steps": steps, "delta": DELTA}
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    t0 = time.perf_counter()
                    eps = dpjax.accounting.epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps,
                                                   delta=DELTA, accountant=acc)
                    t1 = time.perf_counter()
                    dpjax.accounting.epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps,
                                             delta=DELTA, accountant=acc)
                    t2 = time.perf_counter()
                row.update(status="ok", epsilon=eps, first_call_s=t1 - t0, repeat_call_s=t2 - t1,
                           warnings=sorted({type(w.message).__name__ for w in caught}))
            except Exception as e:  # noqa: BLE001
                row.update(status="error", error=f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc(limit=3)[-1000:])
            rows.append(row)
    return rows
