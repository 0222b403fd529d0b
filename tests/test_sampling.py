"""Tests for dpjax.sampling: Poisson / fixed-size sampling with static shapes.

Privacy invariants checked here: 2 (padding is masked, index 0, after the real
examples) and 6 (the sampler really is Poisson with rate q, i.e. the mechanism
the accountant analyses; no example is ever dropped to fit a bucket).
"""

from __future__ import annotations

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpjax import sampling
from dpjax.sampling import (
    Batch,
    BucketOverflowWarning,
    FixedSizeSampler,
    PoissonSampler,
    default_bucket_sizes,
)


def _inclusion_matrix(sampler, steps):
    """(steps, N) bool matrix: X[t, i] = example i in the batch of step t."""
    x = np.zeros((steps, sampler.num_examples), dtype=bool)
    for t in range(steps):
        b = sampler.sample()
        x[t, b.indices[: b.size]] = True
    return x


def _check_batch(batch, n):
    """Structural invariants every batch must satisfy."""
    assert batch.indices.dtype == np.int32 and batch.mask.dtype == np.bool_
    assert batch.indices.shape == batch.mask.shape == (batch.bucket_size,)
    assert batch.bucket_size >= batch.size
    assert int(batch.mask.sum()) == batch.size
    # real examples first, then padding
    assert batch.mask[: batch.size].all() and not batch.mask[batch.size :].any()
    real = batch.indices[: batch.size]
    assert len(np.unique(real)) == batch.size  # unique
    if batch.size:
        assert real.min() >= 0 and real.max() < n  # in range
    assert (batch.indices[batch.size :] == 0).all()  # padding uses index 0


# --------------------------------------------------------------------------
# Poisson: the distribution is the one the accountant assumes
# --------------------------------------------------------------------------

N, Q, STEPS = 50, 0.2, 4000


@pytest.fixture(scope="module")
def poisson_inclusions():
    return _inclusion_matrix(PoissonSampler(N, sampling_rate=Q, seed=2024), STEPS)


def test_inclusion_frequency_per_example(poisson_inclusions):
    counts = poisson_inclusions.sum(axis=0)
    sd = math.sqrt(STEPS * Q * (1 - Q))
    assert np.all(np.abs(counts - STEPS * Q) < 5 * sd), counts


def test_batch_size_is_binomial(poisson_inclusions):
    sizes = poisson_inclusions.sum(axis=1)
    mean, var = N * Q, N * Q * (1 - Q)
    assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / STEPS)
    assert abs(sizes.var() / var - 1) < 0.1
    # the whole histogram: total variation distance to Binomial(N, Q) is small
    pmf = np.array([math.comb(N, k) * Q**k * (1 - Q) ** (N - k) for k in range(N + 1)])
    hist = np.bincount(sizes, minlength=N + 1) / STEPS
    assert 0.5 * np.abs(hist - pmf).sum() < 0.05


def test_pairwise_inclusions_independent(poisson_inclusions):
    x = poisson_inclusions.astype(np.float64)
    co = (x.T @ x) / STEPS
    off = co[~np.eye(N, dtype=bool)]
    sd = math.sqrt(Q**2 * (1 - Q**2) / STEPS)
    assert np.all(np.abs(off - Q**2) < 5.5 * sd)
    assert abs(off.mean() - Q**2) < 0.002


def test_consecutive_steps_independent(poisson_inclusions):
    x = poisson_inclusions
    both = (x[:-1] & x[1:]).mean()
    sd = math.sqrt(Q**2 * (1 - Q**2) / x[1:].size)
    assert abs(both - Q**2) < 5 * sd
    # batch sizes of consecutive steps are uncorrelated
    sizes = x.sum(axis=1).astype(float)
    r = np.corrcoef(sizes[:-1], sizes[1:])[0, 1]
    assert abs(r) < 5 / math.sqrt(STEPS)


def test_q_one_includes_everything():
    s = PoissonSampler(13, sampling_rate=1.0, seed=0)
    for _ in range(5):
        b = s.sample()
        assert b.size == 13
        np.testing.assert_array_equal(b.indices[: b.size], np.arange(13))


def test_empty_batches_are_allowed_and_padded():
    s = PoissonSampler(1000, sampling_rate=1e-4, seed=3)  # E[B] = 0.1
    batches = [s.sample() for _ in range(50)]
    assert any(b.size == 0 for b in batches)
    for b in batches:
        _check_batch(b, 1000)
        assert b.bucket_size == s.bucket_sizes[0]


# --------------------------------------------------------------------------
# No drops, padding, overflow
# --------------------------------------------------------------------------


def test_every_batch_well_formed():
    s = PoissonSampler(300, expected_batch_size=40, seed=11)
    for _ in range(500):
        b = s.sample()
        _check_batch(b, 300)
        assert b.bucket_size in s.bucket_sizes
        assert b.bucket_size == min(x for x in s.bucket_sizes if x >= b.size)


def test_overflow_adds_bucket_with_warning_and_drops_nothing():
    s = PoissonSampler(200, expected_batch_size=8, seed=5, bucket_sizes=[8])
    with pytest.warns(BucketOverflowWarning, match="recompile"):
        batches = [s.sample() for _ in range(300)]
    assert len(s.bucket_sizes) > 1 and s.bucket_sizes[0] == 8
    sizes = np.array([b.size for b in batches])
    assert sizes.max() > 8
    for b in batches:
        _check_batch(b, 200)
        assert b.bucket_size in s.bucket_sizes
    # the mean size is unaffected by the buckets (nothing truncated)
    assert abs(sizes.mean() - 8) < 5 * math.sqrt(8 * (1 - 8 / 200) / 300)
    # the stream of real examples is independent of the bucket ladder
    ref = PoissonSampler(200, expected_batch_size=8, seed=5)
    for b in batches[:50]:
        r = ref.batch_at(b.step)
        np.testing.assert_array_equal(r.indices[: r.size], b.indices[: b.size])


def test_q_one_with_small_bucket_grows_once():
    s = PoissonSampler(20, sampling_rate=1.0, seed=0, bucket_sizes=[8])
    with pytest.warns(BucketOverflowWarning):
        b = s.sample()
    assert b.size == 20 and b.bucket_size == 20  # 1.25 * 20 rounded, capped at N
    assert s.bucket_sizes == (8, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert s.sample().bucket_size == 20


def test_tiny_dataset():
    s = PoissonSampler(10, expected_batch_size=3, seed=1)
    assert max(s.bucket_sizes) <= 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BucketOverflowWarning)
        for _ in range(200):
            _check_batch(s.sample(), 10)
    s1 = PoissonSampler(1, sampling_rate=0.5, seed=1)
    assert s1.bucket_sizes == (1,)
    sizes = {s1.sample().size for _ in range(50)}
    assert sizes == {0, 1}


# --------------------------------------------------------------------------
# Static shapes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n,b", [(1797, 256), (60000, 256), (50, 10), (10, 5), (10, 1)])
def test_default_ladder_shape(n, b):
    ladder = default_bucket_sizes(n, b / n)
    assert 1 <= len(ladder) <= 9
    assert list(ladder) == sorted(set(ladder))
    assert all(x % 8 == 0 or x == n for x in ladder)
    assert max(ladder) <= n
    q = b / n
    top = n * q + 5 * math.sqrt(n * q * (1 - q))
    assert max(ladder) >= min(n, top)


def test_default_ladder_values():
    assert default_bucket_sizes(1797, 256 / 1797) == (248, 256, 264, 272, 280, 288, 304, 336)
    assert default_bucket_sizes(60000, 256 / 60000) == (248, 256, 264, 272, 280, 288, 304, 336)
    assert default_bucket_sizes(51200, 1024 / 51200) == (1000, 1016, 1024, 1040, 1056, 1072, 1088, 1120, 1184)
    s = PoissonSampler(1797, expected_batch_size=256, seed=0)
    assert s.bucket_sizes == (248, 256, 264, 272, 280, 288, 304, 336)


def test_default_ladder_pads_large_batches_by_about_one_percent():
    """Mean padded size over many draws: within 1.2% of E[B] at E[B] = 1024."""
    s = PoissonSampler(51200, expected_batch_size=1024, seed=3)
    padded = [s.sample().bucket_size for _ in range(3000)]
    assert 1.0 < np.mean(padded) / 1024 < 1.012


def test_shapes_stay_in_initial_ladder():
    s = PoissonSampler(1797, expected_batch_size=256, seed=7)
    ladder = s.bucket_sizes
    with warnings.catch_warnings():
        warnings.simplefilter("error", BucketOverflowWarning)
        lengths = {s.sample().bucket_size for _ in range(2000)}
    assert lengths <= set(ladder)
    assert len(lengths) <= len(ladder)
    assert s.bucket_sizes == ladder


def test_jitted_step_compiles_at_most_once_per_bucket():
    n = 500
    data = {
        "x": np.arange(n * 3, dtype=np.float32).reshape(n, 3),
        "y": np.arange(n, dtype=np.int32),
    }
    traces = []

    @jax.jit
    def masked_sum(batch):
        traces.append(batch.data["x"].shape)  # runs only while tracing
        return jnp.sum(jnp.where(batch.mask[:, None], batch.data["x"], 0.0))

    s = PoissonSampler(n, expected_batch_size=50, seed=0)
    for _ in range(300):
        b = s.sample()
        got = masked_sum(b.take(data))  # the stamp changes every step without a recompile
        want = data["x"][b.indices[: b.size]].sum()
        np.testing.assert_allclose(float(got), want, rtol=1e-6)  # padding adds 0
    assert len(traces) <= len(s.bucket_sizes)
    assert {t[0] for t in traces} <= set(s.bucket_sizes)


def test_take_pytrees_numpy_and_jax():
    s = PoissonSampler(20, expected_batch_size=5, seed=4)
    b = s.sample()
    xs = np.arange(40, dtype=np.float32).reshape(20, 2)
    ys = jnp.arange(20)
    taken = b.take({"a": (xs, ys), "b": None})
    np.testing.assert_array_equal(taken.mask, b.mask)
    assert int(taken.provenance.step) == b.step
    out = taken.data
    a_x, a_y = out["a"]
    assert isinstance(a_x, np.ndarray) and isinstance(a_y, jax.Array)
    assert a_x.shape == (b.bucket_size, 2) and a_y.shape == (b.bucket_size,)
    np.testing.assert_array_equal(a_x, xs[b.indices])
    np.testing.assert_array_equal(np.asarray(a_y), np.asarray(ys)[b.indices])
    np.testing.assert_array_equal(a_x[b.size :], np.broadcast_to(xs[0], a_x[b.size :].shape))
    assert out["b"] is None


def test_take_refuses_short_leaf():
    b = PoissonSampler(20, sampling_rate=1.0, seed=0).sample()
    with pytest.raises(ValueError, match="exactly 20 rows"):
        b.take(jnp.arange(10))  # JAX would silently clamp
    with pytest.raises(ValueError, match="exactly 20 rows"):
        b.take(np.float32(1.0))


def test_batch_is_immutable_and_comparable():
    b = PoissonSampler(20, expected_batch_size=5, seed=4).sample()
    with pytest.raises(ValueError):
        b.indices[0] = 3
    with pytest.raises(Exception):
        b.size = 2
    assert b == PoissonSampler(20, expected_batch_size=5, seed=4).batch_at(0)
    with pytest.raises(ValueError, match="mask"):
        Batch(indices=np.zeros(4), mask=np.array([True, False, True, False]), size=2, step=0)


# --------------------------------------------------------------------------
# Reproducibility and resume
# --------------------------------------------------------------------------


def _same(a, b):
    return a == b  # Batch.__eq__ compares arrays


def test_resume_continues_exact_stream():
    a = PoissonSampler(1000, expected_batch_size=64, seed=99)
    for _ in range(37):
        a.sample()
    state = json.loads(json.dumps(a.state_dict()))  # plain Python, JSON-safe
    assert state["step"] == 37 and state["seed"] == 99
    b = PoissonSampler(1000, expected_batch_size=64, seed=12345)
    b.load_state_dict(state)
    assert b.step == 37
    for _ in range(20):
        assert _same(a.sample(), b.sample())


def test_resume_keeps_grown_buckets():
    a = PoissonSampler(200, expected_batch_size=8, seed=5, bucket_sizes=[8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BucketOverflowWarning)
        for _ in range(100):
            a.sample()
    b = PoissonSampler(200, expected_batch_size=8, seed=0)
    b.load_state_dict(a.state_dict())
    assert b.bucket_sizes == a.bucket_sizes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BucketOverflowWarning)
        for _ in range(20):
            assert _same(a.sample(), b.sample())


def test_same_seed_same_stream_different_seeds_differ():
    a = PoissonSampler(500, expected_batch_size=32, seed=1)
    b = PoissonSampler(500, expected_batch_size=32, seed=1)
    c = PoissonSampler(500, expected_batch_size=32, seed=2)
    xa = [a.sample() for _ in range(10)]
    xb = [b.sample() for _ in range(10)]
    xc = [c.sample() for _ in range(10)]
    assert all(_same(p, r) for p, r in zip(xa, xb))
    assert not any(_same(p, r) for p, r in zip(xa, xc))


def test_iter_matches_sample():
    a = PoissonSampler(100, expected_batch_size=10, seed=8)
    b = PoissonSampler(100, expected_batch_size=10, seed=8)
    it = iter(a)
    for t in range(5):
        x = next(it)
        assert x.step == t and _same(x, b.sample())
    assert a.step == 5


def test_batch_at_is_pure():
    s = PoissonSampler(100, expected_batch_size=10, seed=8)
    s.sample()
    before = s.state_dict()
    b7 = s.batch_at(7)
    assert s.step == 1 and s.state_dict() == before
    assert _same(b7, s.batch_at(7)) and b7.step == 7
    for _ in range(6):
        s.sample()
    assert _same(s.sample(), b7)


def test_seed_none_draws_fresh_secret_seed():
    a = PoissonSampler(100, expected_batch_size=10)
    b = PoissonSampler(100, expected_batch_size=10)
    sa, sb = a.state_dict()["seed"], b.state_dict()["seed"]
    assert isinstance(sa, int) and sa >= 0 and sa != sb
    c = PoissonSampler(100, expected_batch_size=10, seed=0)
    c.load_state_dict(a.state_dict())
    assert _same(c.sample(), a.sample())


def test_load_state_dict_rejects_mismatch():
    a = PoissonSampler(100, expected_batch_size=10, seed=0)
    with pytest.raises(ValueError, match="num_examples"):
        PoissonSampler(101, expected_batch_size=10, seed=0).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="sampling_rate"):
        PoissonSampler(100, expected_batch_size=11, seed=0).load_state_dict(a.state_dict())
    f = FixedSizeSampler(100, batch_size=10, seed=0)
    with pytest.raises(ValueError, match="poisson|fixed_size"):
        a.load_state_dict(f.state_dict())
    with pytest.raises(ValueError, match="poisson|fixed_size"):
        f.load_state_dict(a.state_dict())
    bad = dict(a.state_dict(), step=-1)
    with pytest.raises(ValueError, match="step"):
        a.load_state_dict(bad)
    with pytest.raises(ValueError, match="missing"):
        a.load_state_dict({"seed": 1})


def test_state_dict_is_plain_python():
    s = PoissonSampler(np.int64(100), expected_batch_size=np.float32(10), seed=np.int64(3))
    d = s.state_dict()
    assert type(d["seed"]) is int and type(d["step"]) is int
    assert type(d["num_examples"]) is int and type(d["sampling_rate"]) is float
    assert type(d["bucket_sizes"]) is list and all(type(x) is int for x in d["bucket_sizes"])


# --------------------------------------------------------------------------
# Properties and accounting hand-off
# --------------------------------------------------------------------------


def test_poisson_properties_and_accounting_kwargs():
    s = PoissonSampler(1797, expected_batch_size=256, seed=0)
    assert s.num_examples == 1797
    assert s.sampling_rate == 256 / 1797
    assert s.expected_batch_size == 256.0
    assert s.sampling == "poisson" and s.step == 0
    assert isinstance(s.bucket_sizes, tuple)
    assert s.accounting_kwargs() == dict(
        sampling="poisson", sampling_rate=256 / 1797, dataset_size=1797
    )
    r = PoissonSampler(1000, sampling_rate=0.01, seed=0)
    assert r.expected_batch_size == pytest.approx(10.0)


def test_no_shuffled_epoch_batching():
    assert not hasattr(sampling, "shuffled_batches")
    assert "shuffled" in sampling.__doc__.lower() and "refused" in sampling.__doc__


# --------------------------------------------------------------------------
# FixedSizeSampler
# --------------------------------------------------------------------------


def test_fixed_size_batches():
    s = FixedSizeSampler(40, batch_size=8, seed=3)
    assert s.bucket_sizes == (8,) and s.sampling == "fixed_size"
    x = np.zeros((3000, 40), dtype=bool)
    for t in range(3000):
        b = s.sample()
        _check_batch(b, 40)
        assert b.size == 8 and b.bucket_size == 8 and b.mask.all()
        x[t, b.indices] = True
    p = 8 / 40
    counts = x.sum(axis=0)
    assert np.all(np.abs(counts - 3000 * p) < 5 * math.sqrt(3000 * p * (1 - p)))
    # independent draws per step, not an epoch shuffle: repeats across steps occur
    assert (x[:-1] & x[1:]).any()


def test_fixed_size_accounting_and_state():
    s = FixedSizeSampler(60000, batch_size=256, seed=5)
    assert s.accounting_kwargs() == dict(
        sampling="fixed_size", sampling_rate=256 / 60000, dataset_size=60000, batch_size=256
    )
    assert s.expected_batch_size == 256.0 and s.batch_size == 256
    for _ in range(7):
        s.sample()
    t = FixedSizeSampler(60000, batch_size=256, seed=0)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    for _ in range(5):
        assert _same(s.sample(), t.sample())
    with pytest.raises(ValueError, match="sampling_rate|batch_size"):
        FixedSizeSampler(60000, batch_size=128, seed=0).load_state_dict(s.state_dict())


def test_fixed_size_full_dataset():
    b = FixedSizeSampler(5, batch_size=5, seed=0).sample()
    np.testing.assert_array_equal(b.indices, np.arange(5))


# --------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(num_examples=0, expected_batch_size=1), "num_examples"),
        (dict(num_examples=-5, sampling_rate=0.1), "num_examples"),
        (dict(num_examples=10.5, sampling_rate=0.1), "num_examples"),
        (dict(num_examples=100, sampling_rate=0.0), "sampling_rate"),
        (dict(num_examples=100, sampling_rate=1.5), "sampling_rate"),
        (dict(num_examples=100, sampling_rate=-0.1), "sampling_rate"),
        (dict(num_examples=100, sampling_rate=float("nan")), "sampling_rate"),
        (dict(num_examples=100, expected_batch_size=0), "expected_batch_size"),
        (dict(num_examples=100, expected_batch_size=-3), "expected_batch_size"),
        (dict(num_examples=100, expected_batch_size=101), "expected_batch_size"),
        (dict(num_examples=100), "expected_batch_size or sampling_rate"),
        (dict(num_examples=100, expected_batch_size=10, sampling_rate=0.1), "exactly one"),
        (dict(num_examples=100, sampling_rate=0.1, bucket_sizes=[8, 0]), "bucket_sizes"),
        (dict(num_examples=100, sampling_rate=0.1, bucket_sizes=[8, -8]), "bucket_sizes"),
        (dict(num_examples=100, sampling_rate=0.1, bucket_sizes=[8.5]), "bucket_sizes"),
        (dict(num_examples=100, sampling_rate=0.1, bucket_sizes=[True]), "bucket_sizes"),
        (dict(num_examples=100, sampling_rate=0.1, bucket_sizes=[]), "bucket_sizes"),
        (dict(num_examples=100, sampling_rate=0.1, bucket_sizes=8), "bucket_sizes"),
        (dict(num_examples=100, sampling_rate=0.1, seed=-1), "seed"),
    ],
)
def test_poisson_bad_inputs(kwargs, name):
    n = kwargs.pop("num_examples")
    with pytest.raises(ValueError, match=name):
        PoissonSampler(n, **kwargs)


def test_bad_input_messages_name_range():
    with pytest.raises(ValueError, match=r"\(0, num_examples=100\].*101"):
        PoissonSampler(100, expected_batch_size=101)
    with pytest.raises(ValueError, match=r"\(0, 1\].*1\.5"):
        PoissonSampler(100, sampling_rate=1.5)


@pytest.mark.parametrize(
    "n,b,name",
    [(0, 1, "num_examples"), (10, 0, "batch_size"), (10, 11, "batch_size"), (10, 2.5, "batch_size")],
)
def test_fixed_size_bad_inputs(n, b, name):
    with pytest.raises(ValueError, match=name):
        FixedSizeSampler(n, batch_size=b)


def test_batch_at_bad_step():
    s = PoissonSampler(10, sampling_rate=0.5, seed=0)
    with pytest.raises(ValueError, match="step"):
        s.batch_at(-1)


# --------------------------------------------------------------------------
# Property test
# --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    q=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**63 - 1),
    start=st.integers(0, 10**9),
)
def test_property_batches_well_formed(n, q, seed, start):
    s = PoissonSampler(n, sampling_rate=q, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BucketOverflowWarning)
        for t in range(start, start + 5):
            b = s.batch_at(t)
            _check_batch(b, n)
            assert b.step == t
            assert b.bucket_size in s.bucket_sizes
    assert max(s.bucket_sizes) <= max(n, max(default_bucket_sizes(n, q)))


def test_large_seed_round_trips_exactly():
    seed = 2**63 - 5  # above 2**53: must not pass through float
    a = PoissonSampler(100, expected_batch_size=10, seed=seed)
    assert a.state_dict()["seed"] == seed
    b = PoissonSampler(100, expected_batch_size=10, seed=seed - 1)
    b.load_state_dict(a.state_dict())
    assert _same(a.sample(), b.sample())
    with pytest.raises(ValueError, match="seed"):
        PoissonSampler(100, expected_batch_size=10, seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        PoissonSampler(100, expected_batch_size=10, seed="7")
