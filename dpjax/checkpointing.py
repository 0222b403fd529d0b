"""Checkpoints of a private training run that fail safe, and the privacy log beside them.

A checkpoint (one folder per step) holds the parameters and the optimizer state,
which contains the privacy ledger, as orbax arrays, and as JSON the run's
configuration, the sampler's state (with its secret seed), the noise and
initialisation seeds and the evaluation history.

Fail-safe rules (compromise recording):

* **Written atomically.** Orbax writes each step to a temporary folder and
  renames it when complete; then dpjax writes ``dpjax_manifest.json`` (the size
  and SHA-256 of every file) by write-and-rename. A step folder without its
  manifest is incomplete (a run killed mid-save) and is never restored.
* **Verified on restore.** Steps are tried newest first: the manifest must be
  there, every file must match it, orbax must read it and the ledger must agree
  with the sampler. A bad step is reported (which step, and why) and the
  previous valid one is used. Replaying the steps after it with the stored
  seeds recomputes exactly the same noisy updates (batches and noise are pure
  functions of the seeds and the step), so nothing more is spent.
* **Append-only privacy log.** ``privacy_log.jsonl`` beside the step folders
  gets one line per checkpoint (steps spent, σ, q, N, ε at δ), per resume and
  per overwrite, flushed to disk with each checkpoint: whatever happens to the
  checkpoints, a reader can tell what was spent.
* **No silent restart.** :func:`dpjax.fit` refuses to start at step 0 in a
  folder that holds checkpoints or a privacy log unless told to resume them or to
  overwrite them, and refuses to resume when there is nothing valid to resume.

Checkpoints contain the secret seeds: store them like the training data.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

# jax and orbax are imported where they are used: the CLI reads the step folders
# and the privacy log through this module before JAX is imported.

__all__ = ["CheckpointError", "CheckpointFallbackWarning", "CheckpointManager", "Restored", "check_same_config", "MANIFEST", "PRIVACY_LOG"]

MANIFEST = "dpjax_manifest.json"
PRIVACY_LOG = "privacy_log.jsonl"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used as asked (the message says why and what to do)."""


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was bad; an older valid one was restored."""


@dataclasses.dataclass
class Restored:
    state: Any
    meta: Dict[str, Any]
    step: int = 0
    skipped: List[Tuple[int, str]] = dataclasses.field(default_factory=list)  # (step, why) of bad newer steps


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> Dict[str, int]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MANIFEST:
                out[rel] = os.path.getsize(path)
    return out


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Save, verify and restore ``(state pytree, JSON metadata)`` pairs by step.

    ``directory`` must be a folder (created if missing) or not exist yet.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {directory!r} exists and is not a folder")
        self._max_to_keep = max_to_keep
        self._orbax = None

    # -- what is there ----------------------------------------------------------
    def steps(self) -> List[int]:
        """Every step folder present (valid or not), oldest first."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(n) for n in os.listdir(self.directory)
                      if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

    def has_history(self) -> bool:
        """Step folders or a privacy log: a run has been here."""
        return bool(self.steps()) or os.path.exists(self.log_path)

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, PRIVACY_LOG)

    def latest_step(self) -> Optional[int]:
        """The newest step whose manifest is written (not yet verified)."""
        done = [s for s in self.steps() if os.path.exists(os.path.join(self.directory, str(s), MANIFEST))]
        return done[-1] if done else None

    def has_step(self, step: int) -> bool:
        return step in self.steps()

    def verify(self, step: int) -> Optional[str]:
        """``None`` if step ``step`` is complete and matches its manifest, else why not."""
        folder = os.path.join(self.directory, str(step))
        path = os.path.join(folder, MANIFEST)
        if not os.path.exists(path):
            return "incomplete: no dpjax manifest (the run stopped while saving it, or dpjax did not write it)"
        try:
            with open(path) as f:
                manifest = json.load(f)
            expected = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable manifest ({type(e).__name__}: {e})"
        for rel, entry in expected.items():
            file = os.path.join(folder, rel)
            if not os.path.exists(file):
                return f"file missing: {rel}"
            if os.path.getsize(file) != entry["size"] or _sha256(file) != entry["sha256"]:
                return f"file changed since it was written: {rel}"
        return None

    # -- writing -----------------------------------------------------------------
    def _manager(self):
        import orbax.checkpoint as ocp

        if self._orbax is None:
            os.makedirs(self.directory, exist_ok=True)
            self._orbax = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep,
                                                     enable_async_checkpointing=False, create=True),
            )
        return self._orbax

    def save(self, step: int, state: Any, meta: Dict[str, Any], log: Optional[Dict[str, Any]] = None) -> None:
        """Write step ``step``; then its manifest, then ``log`` as a line of the privacy log."""
        import jax
        import orbax.checkpoint as ocp

        folder = os.path.join(self.directory, str(step))
        if os.path.isdir(folder):  # a bad leftover of an earlier attempt at this step
            shutil.rmtree(folder)
            self.close()
        manager = self._manager()
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                     force=True)
        manager.wait_until_finished()
        if jax.process_index() == 0:
            files = {rel: {"size": size, "sha256": _sha256(os.path.join(folder, rel))}
                     for rel, size in _files(folder).items()}
            _write_atomically(os.path.join(folder, MANIFEST), json.dumps({"step": step, "files": files}, indent=1))
            if log is not None:
                self.append_log(dict(log, event="checkpoint", step=step))

    def append_log(self, record: Dict[str, Any]) -> None:
        """Append one JSON line to the privacy log and flush it to disk."""
        import jax

        if jax.process_index() != 0:
            return
        os.makedirs(self.directory, exist_ok=True)
        record = dict(record, time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_log(self) -> List[Dict[str, Any]]:
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def discard_steps(self) -> List[int]:
        """Delete every step folder (the privacy log stays); the steps deleted."""
        steps = self.steps()
        self.close()
        for s in steps:
            shutil.rmtree(os.path.join(self.directory, str(s)))
        return steps

    # -- reading -------------------------------------------------------------------
    def restore(self, like: Any, step: Optional[int] = None, config: Optional[Dict[str, Any]] = None) -> Restored:
        """The newest valid checkpoint (or ``step``), restored into the structure of ``like``.

        Bad newer steps are skipped and listed in ``Restored.skipped``; raises
        :class:`CheckpointError` if no step is valid. With ``config``, a valid
        step's ``meta["config"]`` is compared with it (:func:`check_same_config`)
        before its arrays are read, so other settings are named as such rather
        than as arrays of another shape.
        """
        import jax
        import orbax.checkpoint as ocp

        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        skipped: List[Tuple[int, str]] = []
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        for s in candidates:
            why = self.verify(s)
            if why is None and config is not None:
                try:
                    saved = self._manager().restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
                except Exception as e:  # noqa: BLE001 - unreadable metadata: try the previous step
                    why = f"orbax could not read its metadata ({type(e).__name__}: {str(e)[:200]})"
                else:
                    check_same_config(saved.get("config", {}), config)
            if why is None:
                try:
                    r = self._manager().restore(
                        s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                    return Restored(state=r.state, meta=r.meta, step=s, skipped=skipped)
                except Exception as e:  # noqa: BLE001 - any failure to read a step: try the previous one
                    why = f"orbax could not read it ({type(e).__name__}: {str(e)[:200]})"
            skipped.append((s, why))
        raise CheckpointError(
            f"no valid checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {why}" for s, why in skipped)
            + ". The privacy log there records what was spent."
        )

    def close(self) -> None:
        if self._orbax is not None:
            self._orbax.close()
            self._orbax = None


def check_same_config(saved: Dict[str, Any], current: Dict[str, Any]) -> None:
    """Refuse to resume with settings that would make the ledger wrong."""
    import math

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
        raise CheckpointError(
            "cannot resume: the checkpoint was written with different settings, and mixing them "
            "would make the privacy ledger wrong (" + "; ".join(diffs) + "). Use the original "
            "settings or a new --checkpoint-dir."
        )
