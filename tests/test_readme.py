"""The README's loop diffs are true: the private loops run, and the line counts it states are the diffs'."""

import re
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dpjax.models import MLP, NnxMLP

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _diff(name):
    """The ```diff block after ``<!-- readme-test: name -->`` and the sentence after it."""
    m = re.search(rf"<!-- readme-test: {name} -->\n```diff\n(.*?)```\n\n(.*?)\n", README, flags=re.S)
    assert m, f"no diff block marked readme-test: {name}"
    return m.group(1).splitlines(), m.group(2)


def _private_code(lines):
    return "\n".join(line[2:] for line in lines if not line.startswith("-"))


@pytest.fixture(scope="module")
def data(digits):
    x, y = digits
    return {"x": x[:600], "y": y[:600]}


@pytest.mark.parametrize("name", ["linen", "nnx"])
def test_stated_line_counts_are_the_diffs(name):
    lines, sentence = _diff(name)
    added = sum(line.startswith("+") for line in lines)
    removed = sum(line.startswith("-") for line in lines)
    m = re.search(r"\*\*(\d+) lines\*\* differ.*?\((\d+) replaced, (\d+) added\)", sentence)
    assert m, sentence
    assert (int(m.group(1)), int(m.group(2)), int(m.group(3))) == (added, removed, added - removed)


def test_linen_loop_runs(data, capsys):
    model = MLP(num_classes=10, hidden=32)
    params = model.init(jax.random.PRNGKey(0), data["x"][:1])

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, batch["x"]), batch["y"]).mean()

    scope = {"data": data, "params": params, "loss_fn": loss_fn, "num_steps": 3}
    exec(_private_code(_diff("linen")[0]), scope)
    assert float(capsys.readouterr().out.split()[-1]) > 0
    assert int(scope["state"].ledger.steps) == 3


def test_nnx_loop_runs(data, capsys):
    model = NnxMLP(64, 10, 32, rngs=nnx.Rngs(0))

    def loss_fn(m, batch):
        return optax.softmax_cross_entropy_with_integer_labels(m(batch["x"]), batch["y"]).mean()

    before = np.asarray(model.out.kernel[...]).copy()
    scope = {"data": data, "model": model, "loss_fn": loss_fn, "num_steps": 3}
    exec(_private_code(_diff("nnx")[0]), scope)
    assert float(capsys.readouterr().out.split()[-1]) > 0
    assert not np.array_equal(before, np.asarray(model.out.kernel[...]))
