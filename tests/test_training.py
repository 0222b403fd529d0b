"""dpjax.fit and `dpjax train`: Linen and NNX, checkpoint/resume with the
ledger (invariant 5 across restarts), a killed run, the budget guard, CLI errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import dpjax
from dpjax import checkpointing, cli, ledger, training
from dpjax.models import MLP, NnxMLP


@pytest.fixture(scope="module")
def data():
    return dpjax.datasets.load_digits()


# learning_rate is that of the default optimizer, schedule-free SGD (training.default_optimizer).
FAST = dict(epochs=4, batch_size=256, l2_clip_norm=1.0, learning_rate=4.0, progress=False)


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_linen_model_trains(data):
    r = dpjax.fit(MLP(), data, target_epsilon=8.0, **FAST)
    assert r.history[-1]["test_accuracy"] > 0.5
    assert r.epsilon <= 8.0
    assert r.steps == dpjax.steps_taken(r.opt_state) == int(np.ceil(4 * 1437 / 256))
    assert r.stopped_early is None
    assert "Poisson" in r.statement


def test_clipping_engine_settings_do_not_change_training(data):
    """vmap, and fast with keep_fraction=0 and microbatching, train the same model;
    the settings reach clipped_grad (bad values are refused there)."""
    kw = dict(FAST, epochs=1, seed=3, target_epsilon=8.0)
    ref = dpjax.fit(MLP(), data, clipping_method="vmap", **kw)
    other = dpjax.fit(MLP(), data, clipping_method="fast", keep_fraction=0.0, microbatch_size=64, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(other.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
    for bad, match in ((dict(clipping_method="ghostly"), "method"), (dict(keep_fraction=-1.0), "keep_fraction"),
                       (dict(microbatch_size=0), "microbatch_size")):
        with pytest.raises(ValueError, match=match):
            dpjax.fit(MLP(), data, **bad, **kw)


def test_nnx_model_trains(data):
    model = NnxMLP(64, rngs=nnx.Rngs(0))
    r = dpjax.fit(model, data, target_epsilon=8.0, **FAST)
    assert r.history[-1]["test_accuracy"] > 0.5
    assert r.model is model
    # The NNX module itself now holds the trained weights.
    logits = model(data["x_test"])
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == data["y_test"]))
    assert acc == pytest.approx(r.history[-1]["test_accuracy"], abs=1e-6)


def test_resume_is_bit_identical_and_ledger_continues(data, tmp_path):
    full = dpjax.fit(MLP(), data, target_epsilon=3.0, seed=5, **FAST)
    ckpt = str(tmp_path / "ckpt")
    part = dpjax.fit(MLP(), data, target_epsilon=3.0, seed=5, checkpoint_dir=ckpt, checkpoint_every=4,
                     max_steps=9, **FAST)
    assert part.steps == 9
    resumed = dpjax.fit(MLP(), data, target_epsilon=3.0, seed=5, checkpoint_dir=ckpt, resume=True, **FAST)
    assert resumed.steps == full.steps
    assert_trees_equal(resumed.params, full.params)
    assert_trees_equal(resumed.opt_state, full.opt_state)  # includes the ledger and noise key
    assert resumed.epsilon == full.epsilon
    # Same evaluations at every epoch boundary (the stopped run also logged its stop at step 9).
    by_step = {h["step"]: h for h in resumed.history}
    for h in full.history:
        assert by_step[h["step"]] == h


def test_resume_with_other_settings_is_refused(data, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    dpjax.fit(MLP(), data, target_epsilon=3.0, checkpoint_dir=ckpt, max_steps=2, **FAST)
    with pytest.raises(ValueError, match="noise_multiplier|target_epsilon"):
        dpjax.fit(MLP(), data, target_epsilon=5.0, checkpoint_dir=ckpt, resume=True, **FAST)


def test_budget_guard_stops_the_loop(data):
    # sigma fixed and small: the planned 23 steps would overspend epsilon = 2.
    r = dpjax.fit(MLP(), data, target_epsilon=2.0, noise_multiplier=0.9, **FAST)
    assert r.stopped_early is not None and "budget" in r.stopped_early
    led = ledger.find_ledger(r.opt_state)
    assert r.steps == int(led.max_steps) < 23
    assert int(led.refused_steps) == 0
    assert r.epsilon <= 2.0


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="target_epsilon"):
        dpjax.fit(MLP(), data, target_epsilon=-1.0, **FAST)
    with pytest.raises(ValueError, match="batch_size"):
        dpjax.fit(MLP(), data, target_epsilon=1.0, **{**FAST, "batch_size": 10**6})
    with pytest.raises(ValueError, match="resume"):
        dpjax.fit(MLP(), data, target_epsilon=1.0, resume=True, **FAST)
    with pytest.raises(TypeError, match="Module"):
        dpjax.fit(lambda x: x, data, target_epsilon=1.0, **FAST)


def _train_cmd(*extra):
    return [sys.executable, "-m", "dpjax", "train", "--model", "mlp", "--quiet", "--lr", "0.01", "--seed", "0", *extra]


def test_killed_run_leaves_consistent_checkpoint_and_resumes(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "out"
    args = ["--epochs", "200", "--epsilon", "8", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "3",
            "--out", str(out)]
    proc = subprocess.Popen(_train_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            steps = [int(p) for p in os.listdir(ckpt) if p.isdigit()] if ckpt.exists() else []
            if steps and max(steps) >= 9:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    manager = checkpointing.CheckpointManager(str(ckpt))
    step = manager.latest_step()
    assert step is not None and step % 3 == 0
    # The same run in-process, stopped at that step: the reference (and the structure to restore into).
    d = training.DEFAULTS
    reference = dpjax.fit(MLP(), data, epochs=200, batch_size=d["batch_size"], l2_clip_norm=d["l2_clip_norm"],
                          target_epsilon=8.0, learning_rate=0.01, seed=0, max_steps=step, progress=False)
    restored = manager.restore({"params": reference.params, "opt_state": reference.opt_state})
    manager.close()
    # The ledger matches the checkpointed parameters: same step count, same sampler position,
    # and the parameters are exactly those of an uninterrupted run after that many steps.
    assert dpjax.steps_taken(restored.state["opt_state"]) == step
    assert restored.meta["sampler"]["step"] == step
    # (fit returns the schedule-free optimizer's evaluation parameters; checkpoints hold the raw ones)
    assert_trees_equal(training.eval_params(restored.state["opt_state"], restored.state["params"]),
                       reference.params)
    assert_trees_equal(restored.state["opt_state"], reference.opt_state)
    # Resuming continues from there without double counting: three more steps, ledger = step + 3.
    resumed = dpjax.fit(MLP(), data, epochs=200, batch_size=d["batch_size"], l2_clip_norm=d["l2_clip_norm"],
                        target_epsilon=8.0, learning_rate=0.01, seed=0, checkpoint_dir=str(ckpt), resume=True,
                        max_steps=3, progress=False)
    assert resumed.steps == step + 3
    direct = dpjax.fit(MLP(), data, epochs=200, batch_size=d["batch_size"], l2_clip_norm=d["l2_clip_norm"],
                       target_epsilon=8.0, learning_rate=0.01, seed=0, max_steps=step + 3, progress=False)
    assert_trees_equal(resumed.params, direct.params)
    assert resumed.epsilon == direct.epsilon


def test_cli_trains_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["train", "--model", "mlp", "--epochs", "2", "--quiet", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed and "epsilon spent:" in printed and "Differential privacy statement" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epsilon"] <= 3.0
    assert metrics["steps"] == 2  # full batch by default: one step per epoch
    assert (out / "training.png").stat().st_size > 1000


def test_cli_user_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=rng.normal(size=(300, 5)).astype(np.float32), y_train=rng.integers(0, 3, 300),
             x_test=rng.normal(size=(50, 5)).astype(np.float32), y_test=rng.integers(0, 3, 50))
    code = cli.main(["train", "--data", str(path), "--model", "mlp", "--epochs", "1", "--batch-size", "50",
                     "--quiet", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epsilon", "0"], "--epsilon must be > 0"),
        (["--epsilon", "-2"], "--epsilon must be > 0"),
        (["--delta", "1.5"], "--delta"),
        (["--data", "/no/such/file.npz"], "not found"),
        (["--microbatch-size", "0"], "--microbatch-size"),
        (["--keep-fraction", "-1"], "--keep-fraction"),
    ],
)
def test_cli_bad_input_is_clear_and_nonzero(argv, message, capsys, tmp_path):
    code = cli.main(["train", "--quiet", "--out", str(tmp_path / "o"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_wrong_npz_keys_and_shapes(tmp_path, capsys):
    bad_keys = tmp_path / "bad.npz"
    np.savez(bad_keys, x=np.zeros((4, 2)), y=np.zeros(4))
    assert cli.main(["train", "--data", str(bad_keys), "--quiet", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing key(s)" in err and "x_train" in err
    bad_shape = tmp_path / "shape.npz"
    np.savez(bad_shape, x_train=np.zeros((4, 2)), y_train=np.zeros(5, int), x_test=np.zeros((2, 2)),
             y_test=np.zeros(2, int))
    assert cli.main(["train", "--data", str(bad_shape), "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert "4 examples but y_train has 5" in capsys.readouterr().err


def test_cli_subprocess_bad_input_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dpjax", "train", "--epsilon", "0"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "error: --epsilon must be > 0" in r.stderr
    assert "Traceback" not in r.stderr
