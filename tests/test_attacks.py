"""dpjax.attacks on real small models trained on digits: FGSM, the oracle, the
black-box substitute attack, transferability, and `dpjax attack`'s bad inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dpjax import attacks, cli, datasets
from dpjax.attacks import targets
from dpjax.cli import main


@pytest.fixture(scope="module")
def data():
    return datasets.load_digits()


@pytest.fixture(scope="module")
def dnn(data):
    return attacks.train_target("dnn", data["x_train"], data["y_train"])


def _loss(target, x, y):
    return float(optax.softmax_cross_entropy_with_integer_labels(target.logits(jnp.asarray(x)), y).mean())


@pytest.mark.parametrize("steps", [1, 5])
def test_fgsm_raises_the_loss_and_beats_random_signs_of_the_same_size(data, dnn, steps):
    x, y = data["x_test"], data["y_test"]
    adv = attacks.fgsm(dnn.logits, x, y, 0.1, steps=steps)
    noise = attacks.random_sign(x, 0.1)
    assert _loss(dnn, adv, y) > 3 * _loss(dnn, noise, y) > 0
    clean, fooled, random = (attacks.misclassification_rate(dnn.predict, v, y) for v in (x, adv, noise))
    assert fooled > random + 0.3 and random < clean + 0.1
    # the size and the range hold, for one step and for the projected iterations
    assert float(jnp.max(jnp.abs(adv - x))) <= 0.1 + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_iterative_fgsm_is_at_least_as_strong_as_one_step(data, dnn):
    x, y = data["x_test"], data["y_test"]
    one, five = (attacks.misclassification_rate(dnn.predict, attacks.fgsm(dnn.logits, x, y, 0.05, steps=k), y)
                 for k in (1, 5))
    assert five >= one


def test_fgsm_takes_an_nnx_module():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    x = jnp.full((2, 4), 0.5)
    adv = attacks.fgsm(attacks.logits_fn(model), x, jnp.array([0, 1]), 0.2)
    assert adv.shape == x.shape and float(jnp.max(jnp.abs(adv - x))) == pytest.approx(0.2, abs=1e-6)


@pytest.mark.parametrize("bad,match", [(dict(eps=-0.1), "eps must be"), (dict(eps=float("nan")), "eps must be"),
                                       (dict(steps=0), "steps must be"), (dict(lo=1.0, hi=0.0), "lo < hi")])
def test_fgsm_refuses_bad_arguments(dnn, bad, match):
    kw = dict(eps=0.1)
    kw.update(bad)
    eps = kw.pop("eps")
    with pytest.raises(ValueError, match=match):
        attacks.fgsm(dnn.logits, jnp.zeros((2, 8, 8, 1)), jnp.array([0, 1]), eps, **kw)


def test_the_oracle_answers_labels_only_and_refuses_past_its_budget(data, dnn):
    oracle = attacks.Oracle(dnn.predict, budget=10)
    labels = oracle.label(data["x_test"][:8])
    assert labels.dtype == np.int64 and labels.shape == (8,)
    np.testing.assert_array_equal(labels, dnn.predict(data["x_test"][:8]))
    assert (oracle.queries, oracle.remaining) == (8, 2)
    with pytest.raises(attacks.QueryBudgetExceeded, match="3 queries asked, 2 left of the budget of 10"):
        oracle.label(data["x_test"][:3])
    assert oracle.queries == 8  # a refused request costs nothing and answers nothing
    public = {n for n in dir(oracle) if not n.startswith("_")}
    assert public == {"label", "queries", "budget", "remaining"}
    with pytest.raises(AttributeError):
        oracle.params = None  # nothing can be attached either (__slots__)
    with pytest.raises(ValueError, match="budget"):
        attacks.Oracle(dnn.predict, budget=0)


def test_substitute_agreement_grows_and_the_attack_beats_random_noise(data, dnn):
    # 60 starting points, 6 rounds (λ flips sign after 3): 60 -> 1,920 queries. On digits the
    # gain comes from the flipped rounds (points pushed toward the boundary): 0.85-0.87 -> 0.91-0.92
    # agreement over seeds 0-2.
    x, y = data["x_test"], data["y_test"]
    oracle = attacks.Oracle(dnn.predict, budget=2000)
    result = attacks.blackbox_attack(oracle, x[:60], evaluate=dnn.predict, x_eval=x[150:], y_eval=y[150:],
                                     settings=attacks.BlackBoxSettings(rounds=6, eps=0.1))
    agreement = [r.agreement for r in result.rounds]
    assert [r.queries for r in result.rounds] == [60 * 2 ** k for k in range(6)]
    assert [r.substitute_size for r in result.rounds] == [60 * 2 ** k for k in range(6)]
    assert agreement[-1] > agreement[0] + 0.03, agreement
    random = attacks.misclassification_rate(dnn.predict, attacks.random_sign(x[150:], 0.1), y[150:])
    assert result.rounds[-1].misclassification > random + 0.1
    assert oracle.queries == result.queries == 1920


def test_the_attack_stays_within_the_query_budget(data, dnn):
    x, y = data["x_test"], data["y_test"]
    settings = attacks.BlackBoxSettings(rounds=5, training=attacks.PlainTraining(epochs=2))
    oracle = attacks.Oracle(dnn.predict, budget=100)
    result = attacks.blackbox_attack(oracle, x[:40], evaluate=dnn.predict, x_eval=x[150:], y_eval=y[150:],
                                     settings=settings)
    assert oracle.queries == 100 and [r.queries for r in result.rounds] == [40, 80, 100]
    with pytest.raises(attacks.QueryBudgetExceeded):
        attacks.blackbox_attack(attacks.Oracle(dnn.predict, budget=10), x[:40], evaluate=dnn.predict,
                                x_eval=x[150:], y_eval=y[150:], settings=settings)


def test_jacobian_augmentation_moves_each_point_by_lambda_along_the_label_gradient(dnn, data):
    x = data["x_test"][:20]
    labels = jnp.asarray(dnn.predict(x))

    def prob(v):
        return np.asarray(jnp.take_along_axis(jax.nn.softmax(dnn.logits(jnp.asarray(v))), labels[:, None], 1))[:, 0]

    up = attacks.jacobian_augmentation(dnn.logits, x, labels, 0.02)
    down = attacks.jacobian_augmentation(dnn.logits, x, labels, -0.02)
    assert np.all(prob(up) >= prob(x) - 1e-6) and np.all(prob(down) <= prob(x) + 1e-6)
    assert np.mean(prob(down) < prob(x)) > 0.9  # the points really move (probabilities saturate near 1)
    moved = np.abs(up - x)
    inside = (x >= 0.02) & (x <= 0.98)  # not clipped by the range
    assert np.mean(np.isclose(moved[inside], 0.02, atol=1e-6)) > 0.95 and moved.max() <= 0.02 + 1e-6
    assert up.min() >= 0 and up.max() <= 1


def test_reservoir_sampling_bounds_the_queries():
    s = attacks.BlackBoxSettings(rounds=6, reservoir=50, reservoir_after=3)
    from dpjax.attacks.blackbox import queries_needed

    assert queries_needed(150, attacks.BlackBoxSettings(rounds=6)) == 150 * 2 ** 5
    assert queries_needed(150, s) == 150 * 2 ** 3 + 50 * 2


def test_transferability_matrix_on_digits(data):
    report = attacks.transferability(data, eps=0.1, sources=("lr",), targets=("lr", "dt", "knn"))
    row = report["matrix"]["lr"]
    assert set(row) == {"lr", "dt", "knn"} and all(0.0 <= v <= 1.0 for v in row.values())
    assert row["lr"] > report["clean_error"]["lr"] + 0.2  # transfers between two logistic regressions
    assert row["knn"] < row["lr"]  # kNN resists small L-infinity steps, as published


def test_targets_match_the_cli_choices():
    assert set(cli.ATTACK_TARGETS) == set(targets.KINDS) | {"dp"}


@pytest.mark.parametrize("args,words", [
    (["--eps", "-0.1"], ["--eps", ">= 0"]),
    (["--eps", "2"], ["--eps", "[0, 1]"]),
    (["--steps", "0"], ["--steps", "positive integer"]),
    (["--attack", "fgsm", "--target", "knn"], ["--target knn", "no gradients", "--attack blackbox"]),
    (["--attack", "blackbox", "--query-budget", "100"], ["--query-budget 100", "--initial 150"]),
    (["--initial", "0"], ["--initial", "[1, 300]"]),
    (["--rounds", "0"], ["--rounds", "positive integer"]),
    (["--lam", "0"], ["--lam", "> 0"]),
    (["--reservoir", "-1"], ["--reservoir", "positive integer"]),
    (["--privacy-epsilon", "0"], ["--privacy-epsilon", "> 0"]),
])
def test_attack_cli_bad_inputs(capsys, tmp_path, args, words):
    assert main(["attack", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def test_attack_cli_usage_errors(capsys):
    assert main(["attack", "--attack", "pgd"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_attack_cli_fgsm_writes_json_and_png(capsys, tmp_path):
    import json

    assert main(["attack", "--attack", "fgsm", "--target", "lr", "--quiet", "--out", str(tmp_path)]) == 0
    assert "FGSM eps=0.1" in capsys.readouterr().out
    report = json.loads((tmp_path / "attack_fgsm.json").read_text())
    by_eps = {c["eps"]: c for c in report["curve"]}
    assert by_eps[0.0]["fgsm"] == by_eps[0.0]["random_sign"] < 0.1
    assert by_eps[0.1]["fgsm"] > by_eps[0.1]["random_sign"]
    assert (tmp_path / "attack_fgsm.png").read_bytes()[:4] == b"\x89PNG"


def test_fgsm_on_a_private_model_runs(data):
    small = {k: v[:300] if k.endswith("train") else v[:100] for k, v in data.items()}
    import dpjax

    target = targets.private_target(3.0, small)
    adv = attacks.fgsm(target.logits, small["x_test"], small["y_test"], 0.1)
    assert attacks.misclassification_rate(target.predict, adv, small["y_test"]) > \
        attacks.misclassification_rate(target.predict, small["x_test"], small["y_test"])
    assert jax.tree_util.tree_leaves(adv) and dpjax.attacks is attacks


def test_docstring_examples_run():
    import doctest

    from dpjax.attacks import gradient_sign, oracle

    for module in (gradient_sign, oracle, datasets):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


@pytest.mark.parametrize("attack,extra,key", [
    ("blackbox", ["--target", "knn", "--rounds", "2", "--initial", "20", "--query-budget", "100"], "rounds"),
    ("transfer", [], "matrix"),
])
def test_attack_cli_blackbox_and_transfer_write_json_and_png(capsys, tmp_path, attack, extra, key):
    import json

    assert main(["attack", "--attack", attack, "--quiet", "--out", str(tmp_path), *extra]) == 0
    report = json.loads((tmp_path / f"attack_{attack}.json").read_text())
    assert report[key] and report["attack"] == attack
    assert (tmp_path / f"attack_{attack}.png").read_bytes()[:4] == b"\x89PNG"
    if attack == "blackbox":
        assert [r["queries"] for r in report["rounds"]] == [20, 40] and "spent 40 of 100" in capsys.readouterr().out
