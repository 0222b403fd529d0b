"""Data-parallel and multi-host DP training (dpjax.parallel, fit(mesh=...)).

The pytest process has already initialised JAX with one CPU device, so every
check that needs several devices runs in a subprocess (tests/parallel_worker.py)
with XLA_FLAGS=--xla_force_host_platform_device_count=N. Each subprocess has a
timeout and is killed on the way out, so a hang fails instead of blocking.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpjax
from dpjax import parallel
from dpjax.sampling import BucketOverflowWarning

WORKER = os.path.join(os.path.dirname(__file__), "parallel_worker.py")
TIMEOUT = 300  # seconds for all subprocesses together; ~40 s is typical


def _env(devices_per_process: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONWARNINGS"] = "ignore"
    return env


# ------------------------------------------------------------------ subprocesses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Run:
    """A child process whose output goes to a file; waited for with a deadline."""

    def __init__(self, args, env, log_path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, text=True)

    def wait(self, deadline: float) -> None:
        try:
            self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.log_path.name}: hung past the {TIMEOUT}s limit:\n{self.tail()}")
        assert self.proc.returncode == 0, f"{self.log_path.name}: exit {self.proc.returncode}:\n{self.tail()}"

    def tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:  # only our own child, by its handle
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Start every subprocess at once (they overlap their compiles), kill them at the end.

    * checks: one process, 4 virtual CPU devices, the single-host checks;
    * multihost: two real processes on 127.0.0.1 (2 CPU devices each) joined by
      jax.distributed with gloo CPU collectives.
    """
    out = tmp_path_factory.mktemp("parallel")
    port, nproc = _free_port(), 2
    runs = {"checks": _Run(["checks", str(out / "checks.json")], _env(4), out / "checks.log")}
    for i in range(nproc):
        runs[f"process_{i}"] = _Run(["multihost", str(i), str(nproc), str(port), str(out)], _env(2),
                                    out / f"process_{i}.log")
    deadline = time.monotonic() + TIMEOUT
    try:
        yield out, runs, deadline
    finally:
        for run in runs.values():
            run.kill()


@pytest.fixture(scope="module")
def checks(workers):
    out, runs, deadline = workers
    runs["checks"].wait(deadline)
    return json.loads((out / "checks.json").read_text())


@pytest.fixture(scope="module")
def multihost(workers):
    out, runs, deadline = workers
    results = []
    for i in range(2):
        runs[f"process_{i}"].wait(deadline)
        results.append(json.loads((out / f"process_{i}.json").read_text()))
    return results


def _result(checks, name):
    r = checks[name]
    if "error" in r:
        pytest.fail(f"check {name!r} raised in the worker:\n{r['error']}")
    return r


# ------------------------------------------------- data-parallel step (4 devices)


@pytest.mark.parametrize("config", ["vmap/microbatch=None", "fast/microbatch=4"])
def test_data_parallel_step_equals_single_device_step(checks, config):
    """4 devices, a batch of 50 padded to 52 with masked rows, same key: the same
    parameters after 3 steps as the plain single-device step, on every replica."""
    r = _result(checks, "equivalence")[config]
    assert r["diff_vs_single_device"] <= 1e-5
    assert r["replicas_identical"]
    assert r["steps"] == 3  # one ledger step per logical batch, not per device
    assert r["num_examples"] == 50  # padding rows are not counted


def test_fast_conv_strategies_under_shard_map(checks):
    """Kept and recomputed conv gradients (scan over offsets, second backward pass)
    give the single-device clipped sum on 4 devices; NaN and padded rows drop out."""
    for keep_fraction, r in _result(checks, "fast_conv").items():
        if keep_fraction == "seconds":
            continue
        assert r["diff"] <= 1e-5, (keep_fraction, r)
        assert r["nonfinite"] == 1 and r["num_examples"] == 14


def test_per_example_norms_stay_per_example(checks):
    """Each device clips its own examples: a shard_map with varying-axes checking
    on would psum per-example gradients across devices and break clipping."""
    r = _result(checks, "equivalence")["vmap/microbatch=None"]
    assert r["per_example_norm_diff"] <= 1e-5


def test_noise_added_exactly_once(checks):
    r = _result(checks, "noise_once")
    # Zero clipped sums: the update is -noise/E[B]; its variance is σ²C²/E[B]² exactly
    # once (4x if each of 4 devices added noise, 1/4 if noise were split over them).
    assert r["num_samples"] >= 50_000
    assert abs(r["variance_ratio"] - 1.0) < 0.05, r
    assert all(abs(v - 1.0) < 0.1 for v in r["per_step_variance_ratio"]), r
    assert abs(r["mean"]) < 5 * math.sqrt(1.0 / r["num_samples"]) * (2.0 * 0.5 / 8.0)
    assert abs(r["leaf_correlation"]) < 0.35  # leaves do not share noise (100 pairs)
    # Structure: one random draw per parameter leaf, all outside the shard_map (on the
    # replicated, already-reduced sum); the clipped sums are all-reduced across devices.
    assert r["random_bits_inside_shard_map"] == 0
    assert r["random_bits_outside_shard_map"] == r["num_leaves"]
    assert r["hlo_has_all_reduce"]
    assert r["steps"] == 5
    assert r["replicas_identical"]
    # Negative control: noise inside the shard_map (same key on every device, then a
    # psum) gives 4² = 16x the variance -- the statistic above would catch it.
    assert r["wrong_variance_ratio"] > 8


def test_provenance_is_checked_in_the_data_parallel_step(checks):
    """The stamp travels through shard_batch and the shard_map; replaying a draw is
    refused inside the jitted parallel step: nothing applied, check_budget says why."""
    r = _result(checks, "provenance")
    assert r["steps"] == [1, 1]
    assert r["unchanged"] == 0.0
    assert r["refused"] and "not drawn for the step" in r["refused"]
    assert r["warned"]


def test_fit_with_mesh_is_the_same_on_1_and_4_devices(checks):
    r = _result(checks, "fit")
    assert r["diff"] <= 1e-5
    assert r["eps"][0] == r["eps"][1] and r["steps"] == [3, 3]
    assert r["replicas_identical"]


# ------------------------------------------------------------- two processes


def test_two_process_run_agrees_and_matches_one_process_emulation(multihost, checks):
    a, b = multihost
    assert [a["process_index"], b["process_index"]] == [0, 1]
    assert a["process_count"] == b["process_count"] == 2 and a["devices"] == 4 and a["local_devices"] == 2
    # Hand-written loop: both processes hold the same parameters, and they equal a
    # single process feeding both processes' rows to 4 devices.
    for r in (a, b):
        assert r["manual"]["replicas_identical"] and r["manual"]["steps"] == 4
    assert a["manual"]["params"] == b["manual"]["params"]
    ref = _result(checks, "multihost_reference")
    assert ref["steps"] == 4
    assert ref["sizes"][0::2] == a["manual"]["sizes"] and ref["sizes"][1::2] == b["manual"]["sizes"]
    for x, y in zip(a["manual"]["params"], ref["params"]):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_two_process_fit_checkpoints_once_and_resumes_on_both(multihost):
    a, b = multihost
    fa, fb = a["fit"], b["fit"]
    assert fa["params"] == fb["params"]  # identical on both processes
    assert fa["epsilon"] == fb["epsilon"] > 0
    assert fa["steps"] == fb["steps"] == [3, 5, 5]  # 3, then resumed to 5; and 5 straight
    # Restored on both processes from the one checkpoint: resuming changes nothing.
    assert fa["resume_vs_straight"] <= 1e-6 and fb["resume_vs_straight"] <= 1e-6
    assert fa["epsilon"] == fa["epsilon_straight"]
    assert fa["replicas_identical"] and fb["replicas_identical"]
    assert fa["checkpoints"] == fb["checkpoints"] == ["2", "3", "5"]
    # The privacy log beside them is written once (by process 0), not once per process.
    assert fa["privacy_log"] == [["checkpoint", 2], ["checkpoint", 3], ["resume", 3], ["checkpoint", 5]]
    # seed=None: process 0's OS-drawn seeds are used on every process.
    assert fa["seed_none_params"] == fb["seed_none_params"]
    assert fa["seed_none_params"] != fa["params"]


# ----------------------------------------------- ShardedPoissonSampler (no devices)


def _samplers(n=1000, pc=3, ebs=100.0, seed=123, devices=4, **kw):
    return [parallel.ShardedPoissonSampler(n, process_index=p, process_count=pc, expected_batch_size=ebs,
                                           seed=seed, devices_per_process=devices, **kw) for p in range(pc)]


def test_sharded_sampler_union_is_poisson_of_the_whole_data_set():
    n, ebs, steps = 1000, 100.0, 400
    samplers = _samplers(n=n, ebs=ebs)
    q = ebs / n
    counts = np.zeros(n)
    totals = []
    pairs = 0  # example 0 (process 0) and example n-1 (process 2) in the same batch
    for _ in range(steps):
        batches = [s.sample() for s in samplers]
        assert len({b.bucket_size for b in batches}) == 1  # one compiled shape everywhere
        in_batch = np.zeros(n, bool)
        for s, b in zip(samplers, batches):
            start, stop = s.shard_range
            real = b.indices[: b.size]
            assert b.bucket_size % 4 == 0 and np.all(real < stop - start)
            assert len(np.unique(real)) == b.size
            in_batch[start + real] = True
        counts += in_batch
        totals.append(int(in_batch.sum()))
        pairs += in_batch[0] and in_batch[n - 1]
    sd_total = math.sqrt(n * q * (1 - q))
    assert abs(np.mean(totals) - n * q) < 4 * sd_total / math.sqrt(steps)
    assert 0.75 < np.var(totals) / (n * q * (1 - q)) < 1.3
    # Every example, whatever its shard, is included at rate q.
    per_shard = [counts[s.shard_range[0]: s.shard_range[1]].mean() / steps for s in samplers]
    assert all(abs(r - q) < 0.01 for r in per_shard), per_shard
    assert pairs / steps < 0.04  # independent across shards: q² = 0.01 (not q)
    # The accountant sees one global step at rate q on N examples.
    tx = dpjax.privatize(optax.sgd(0.1), noise_multiplier=1.0, l2_clip_norm=1.0, sampler=samplers[1], seed=0)
    led = tx.init(jnp.zeros(2)).ledger
    assert int(led.dataset_size) == n and abs(float(led.sampling_rate) - q) < 1e-7


def test_sharded_sampler_exact_joint_inclusion_small():
    """Tiny data set, many steps: all 2^N inclusion patterns at the Poisson probabilities."""
    n, pc, q, steps = 4, 2, 0.3, 6000
    samplers = [parallel.ShardedPoissonSampler(n, process_index=p, process_count=pc, sampling_rate=q, seed=9)
                for p in range(pc)]
    freq = np.zeros(2**n)
    for step in range(steps):
        code = 0
        for s in samplers:
            b = s.batch_at(step)
            for i in b.indices[: b.size]:
                code |= 1 << (s.shard_range[0] + int(i))
        freq[code] += 1
    expected = np.array([q ** bin(c).count("1") * (1 - q) ** (n - bin(c).count("1")) for c in range(2**n)]) * steps
    chi2 = float(np.sum((freq - expected) ** 2 / expected))
    assert chi2 < 40, chi2  # 15 degrees of freedom: P(chi2 > 40) ~ 5e-4


def test_sharded_sampler_is_deterministic_and_resumes():
    a, b = _samplers(pc=2)[0], _samplers(pc=2)[0]
    first = [a.sample() for _ in range(5)]
    assert first == [b.batch_at(t) for t in range(5)]
    state = a.state_dict()
    assert state["step"] == 5 and state["process_count"] == 2
    # Written by process 0, loaded by process 1: it continues its own part of the same stream.
    p1 = _samplers(pc=2, seed=1)[1]
    p1.load_state_dict(state)
    assert p1.step == 5 and p1.sample() == _samplers(pc=2)[1].batch_at(5)
    assert p1.state_dict()["seed"] == state["seed"]
    # Another layout keeps the stream's seed and step but rebuilds the ladder for itself.
    other = parallel.ShardedPoissonSampler(1000, process_index=0, process_count=4, expected_batch_size=100.0,
                                           seed=1, devices_per_process=4)
    other.load_state_dict(dict(state, bucket_sizes=[4]))
    assert other.step == 5 and other.bucket_sizes == other._default_buckets()


def test_sharded_sampler_overflow_is_agreed_without_communication():
    samplers = _samplers(n=400, pc=2, ebs=200.0, devices=2, bucket_sizes=[8])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [s.sample() for s in samplers]
    assert any(issubclass(w.category, BucketOverflowWarning) for w in caught)
    assert batches[0].bucket_size == batches[1].bucket_size > 8
    assert samplers[0].bucket_sizes == samplers[1].bucket_sizes
    assert all(b.size == b.mask.sum() for b in batches)  # nothing dropped


def test_sharded_sampler_bad_arguments():
    with pytest.raises(ValueError, match="same explicit seed"):
        parallel.ShardedPoissonSampler(100, process_index=0, process_count=2, expected_batch_size=10)
    with pytest.raises(ValueError, match="process_index"):
        parallel.ShardedPoissonSampler(100, process_index=2, process_count=2, expected_batch_size=10, seed=0)
    with pytest.raises(ValueError, match="exactly one"):
        parallel.ShardedPoissonSampler(100, seed=0)
    with pytest.raises(ValueError, match="multiples of devices_per_process"):
        parallel.ShardedPoissonSampler(100, expected_batch_size=10, seed=0, devices_per_process=4, bucket_sizes=[10])
    s = parallel.ShardedPoissonSampler(100, expected_batch_size=10, seed=0)
    with pytest.raises(ValueError, match="poisson"):
        s.load_state_dict(dict(dpjax.PoissonSampler(100, expected_batch_size=10, seed=0).state_dict(),
                               process_count=1))
    with pytest.raises(ValueError, match="num_examples"):
        s.load_state_dict(parallel.ShardedPoissonSampler(101, expected_batch_size=10, seed=0).state_dict())


# ------------------------------------------------------------ helpers (1 device)


def test_pad_batch_masks_the_padding():
    batch = {"x": np.arange(10).reshape(5, 2), "y": np.arange(5)}
    b, m = parallel.pad_batch(batch, np.array([1, 1, 1, 0, 1], bool), 4)
    assert b["x"].shape == (8, 2) and m.tolist() == [True, True, True, False, True, False, False, False]
    assert np.array_equal(b["x"][5:], np.repeat(batch["x"][:1], 3, axis=0))
    same, m2 = parallel.pad_batch(batch, None, 5)
    assert same["y"].shape == (5,) and m2.all()


def test_sharded_clipped_grad_refuses_unclipped_gradients():
    mesh = parallel.data_mesh()

    def plain_grad(params, batch, mask=None):
        return jax.grad(lambda p: jnp.sum(batch["x"] @ p))(params)

    f = parallel.sharded_clipped_grad(plain_grad, mesh)
    with pytest.raises(TypeError, match="clipped_grad"):
        jax.jit(f)(jnp.zeros(3), {"x": jnp.ones((2, 3))}, mask=jnp.ones(2, bool))


def test_mesh_axis_errors():
    mesh2d = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with pytest.raises(ValueError, match="axis"):
        parallel.shard_batch(np.zeros((4, 2)), mesh2d)
    with pytest.raises(ValueError, match="not an axis"):
        parallel.shard_batch(np.zeros((4, 2)), mesh2d, axis="batch")
    assert parallel.local_device_count(parallel.data_mesh()) == jax.local_device_count()


def test_sampler_for_mesh_and_doctests():
    import doctest

    s = parallel.ShardedPoissonSampler.for_mesh(100, parallel.data_mesh(), expected_batch_size=10, seed=0)
    assert (s.process_index, s.process_count, s.shard_range) == (0, 1, (0, 100))
    assert doctest.testmod(parallel, optionflags=doctest.ELLIPSIS).failed == 0
