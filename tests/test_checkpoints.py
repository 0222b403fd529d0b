"""Checkpoints that fail safe (dpjax.checkpointing): a damaged newest checkpoint falls
back to the previous one and the run ends as an uninterrupted one; runs killed at
random points resume exactly; the privacy log; the no-silent-restart rules."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

import dpjax
from dpjax import checkpointing
from dpjax.models import MLP

SETTINGS = dict(epochs=10, batch_size=256, l2_clip_norm=1.0, learning_rate=4.0, target_epsilon=6.0, seed=3,
                progress=False)


@pytest.fixture(scope="module")
def data():
    d = dpjax.datasets.load_digits()
    return {"x_train": d["x_train"][:768], "y_train": d["y_train"][:768],
            "x_test": d["x_test"][:100], "y_test": d["y_test"][:100]}


def assert_same_run(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.steps == b.steps and a.epsilon == b.epsilon
    assert a.history == b.history


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """A run checkpointed at steps 2, 4, 6 (then stopped) and the uninterrupted 8-step reference."""
    base = tmp_path_factory.mktemp("ckpt") / "base"
    dpjax.fit(MLP(), data, checkpoint_dir=str(base), checkpoint_every=2, max_steps=6, **SETTINGS)
    reference = dpjax.fit(MLP(), data, max_steps=8, **SETTINGS)
    return base, reference


def _largest_file(folder):
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(max(0, os.path.getsize(path) // 2))


DAMAGE = {
    "array data truncated": lambda step: _truncate(_largest_file(os.path.join(step, "state"))),
    "metadata truncated": lambda step: _truncate(os.path.join(step, "meta", "metadata")),
    "metadata emptied": lambda step: open(os.path.join(step, "meta", "metadata"), "w").close(),
    "state folder deleted": lambda step: shutil.rmtree(os.path.join(step, "state")),
    "commit marker deleted": lambda step: os.remove(os.path.join(step, "commit_success.txt")),
    "dpjax manifest deleted (killed while saving it)": lambda step: os.remove(
        os.path.join(step, checkpointing.MANIFEST)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_and_the_run_ends_the_same(runs, data, tmp_path, damage):
    base, reference = runs
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base, ckpt)
    DAMAGE[damage](str(ckpt / "6"))
    with pytest.warns(checkpointing.CheckpointFallbackWarning, match="step 6 .* is bad .*resumed from step 4"):
        resumed = dpjax.fit(MLP(), data, checkpoint_dir=str(ckpt), resume=True, max_steps=4, **SETTINGS)
    assert_same_run(resumed, reference)
    log = checkpointing.CheckpointManager(str(ckpt)).read_log()
    resume = [r for r in log if r["event"] == "resume"][-1]
    assert resume["from_step"] == 4 and resume["skipped"][0]["step"] == 6
    assert [r["steps_spent"] for r in log if r["event"] == "checkpoint"] == [2, 4, 6, 8]


def test_no_valid_checkpoint_is_an_error_that_names_each_step(runs, data, tmp_path):
    base, _ = runs
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base, ckpt)
    for step in (2, 4, 6):
        os.remove(ckpt / str(step) / checkpointing.MANIFEST)
    with pytest.raises(checkpointing.CheckpointError, match="step 6: incomplete.*step 4.*step 2.*privacy log"):
        dpjax.fit(MLP(), data, checkpoint_dir=str(ckpt), resume=True, **SETTINGS)


def test_the_privacy_log_records_every_checkpoint(runs):
    base, _ = runs
    log = checkpointing.CheckpointManager(str(base)).read_log()
    assert [r["step"] for r in log] == [2, 4, 6]
    assert all(r["event"] == "checkpoint" and r["delta"] == 1e-5 for r in log)
    eps = [r["epsilon"] for r in log]
    assert eps == sorted(eps) and eps[-1] <= SETTINGS["target_epsilon"]


def test_no_silent_restart(runs, data, tmp_path):
    base, _ = runs
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base, ckpt)
    with pytest.raises(checkpointing.CheckpointError, match="already holds a run.*resume.*overwrite"):
        dpjax.fit(MLP(), data, checkpoint_dir=str(ckpt), **SETTINGS)
    assert checkpointing.CheckpointManager(str(ckpt)).steps() == [2, 4, 6]  # untouched
    with pytest.raises(checkpointing.CheckpointError, match="nothing to resume"):
        dpjax.fit(MLP(), data, checkpoint_dir=str(tmp_path / "empty"), resume=True, **SETTINGS)
    junk = tmp_path / "junk"
    (junk / "7").mkdir(parents=True)
    (junk / "7" / "notes.txt").write_text("not a checkpoint")
    (junk / "readme.md").write_text("hello")
    with pytest.raises(checkpointing.CheckpointError, match="step 7: incomplete"):
        dpjax.fit(MLP(), data, checkpoint_dir=str(junk), resume=True, **SETTINGS)
    with pytest.raises(ValueError, match="not both"):
        dpjax.fit(MLP(), data, checkpoint_dir=str(ckpt), resume=True, overwrite=True, **SETTINGS)
    # An explicit overwrite discards the steps, keeps the log and says so in it.
    dpjax.fit(MLP(), data, checkpoint_dir=str(ckpt), overwrite=True, max_steps=2, checkpoint_every=2, **SETTINGS)
    manager = checkpointing.CheckpointManager(str(ckpt))
    assert manager.steps() == [2]
    events = [r["event"] for r in manager.read_log()]
    assert events == ["checkpoint"] * 3 + ["overwrite", "checkpoint"]


def _cli_run(ckpt, out, *extra):
    cmd = [sys.executable, "-m", "dpjax", "train", "--model", "mlp", "--quiet", "--lr", "4", "--epochs", "8",
           "--batch-size", "256", "--clip-norm", "1", "--epsilon", "6", "--seed", "3", "--checkpoint-dir", str(ckpt),
           "--checkpoint-every", "1", "--out", str(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                    "JAX_PLATFORMS": "cpu"})


def test_killed_at_random_points_resumes_exactly(data, tmp_path):
    """kill -9 twice, at random moments after the first checkpoint (mid-step or mid-save),
    then resume to the end: parameters, ledger and history equal an uninterrupted run."""
    rng = np.random.default_rng(0)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    for kill in range(2):
        proc = _cli_run(ckpt, out, *(["--resume"] if kill else []))
        try:
            deadline = time.time() + 180
            start = checkpointing.CheckpointManager(str(ckpt)).latest_step() or 0
            while time.time() < deadline:  # wait for a checkpoint beyond where this attempt started
                if (checkpointing.CheckpointManager(str(ckpt)).latest_step() or 0) > start:
                    break
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                time.sleep(0.05)
            time.sleep(float(rng.uniform(0.0, 1.5)))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    proc = _cli_run(ckpt, out, "--resume")
    assert proc.wait(timeout=300) == 0, proc.stdout.read().decode()[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    full = dict(data)
    full.update(dpjax.datasets.load_digits())  # the CLI trains on all of digits
    reference = dpjax.fit(MLP(), full, epochs=8, batch_size=256, l2_clip_norm=1.0, learning_rate=4.0,
                          target_epsilon=6.0, seed=3, progress=False)
    manager = checkpointing.CheckpointManager(str(ckpt))
    restored = manager.restore({"params": reference.params, "opt_state": reference.opt_state})
    assert restored.step == reference.steps == metrics["steps"]
    assert dpjax.steps_taken(restored.state["opt_state"]) == reference.steps
    np.testing.assert_array_equal(
        jax.tree_util.tree_leaves(dpjax.training.eval_params(restored.state["opt_state"], restored.state["params"]))[0],
        jax.tree_util.tree_leaves(reference.params)[0])
    assert metrics["epsilon"] == reference.epsilon
    assert metrics["history"] == reference.history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log = manager.read_log()
    assert [r["event"] for r in log].count("resume") == 2
