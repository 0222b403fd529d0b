"""Orbax checkpoints of a private training run.

A checkpoint holds the parameters and the optimizer state (which contains the
privacy ledger) as arrays, and as JSON the run's configuration, the sampler's
state and the evaluation history. Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint as the latest one: parameters and ledger always match.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass
class Restored:
    state: Any
    meta: Dict[str, Any]


class CheckpointManager:
    """Save / restore ``(state pytree, JSON metadata)`` pairs by step."""

    def __init__(self, directory: str, *, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
            ),
        )

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def has_step(self, step: int) -> bool:
        return step in self._manager.all_steps()

    def save(self, step: int, state: Any, meta: Dict[str, Any]) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, like: Any, step: Optional[int] = None) -> Restored:
        """Restore into the structure of ``like`` (e.g. a freshly initialised state)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        r = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return Restored(state=r.state, meta=r.meta)

    def close(self) -> None:
        self._manager.close()


def check_same_config(saved: Dict[str, Any], current: Dict[str, Any]) -> None:
    """Refuse to resume with settings that would make the ledger wrong."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        same = (
            math.isclose(a, b, rel_tol=1e-9)
            if isinstance(a, (int, float)) and isinstance(b, (int, float))
            else a == b
        )
        if not same:
            diffs.append(f"{key}: checkpoint has {a!r}, this run has {b!r}")
    if diffs:
        raise ValueError(
            "cannot resume: the checkpoint was written with different settings, and mixing them "
            "would make the privacy ledger wrong (" + "; ".join(diffs) + "). Use the original "
            "settings or a new --checkpoint-dir."
        )
