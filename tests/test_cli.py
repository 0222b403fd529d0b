"""Tests for the ``dpjax`` command line (real dp_accounting, no mocks)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from dpjax import accounting, cli
from dpjax.cli import main

MNIST = ["--dataset-size", "60000", "--batch-size", "256", "--epochs", "60",
         "--delta", "1e-5"]


def _number(label, text):
    match = re.search(re.escape(label) + r"\s*=\s*([0-9]+(?:\.[0-9]+)?)", text)
    assert match, text
    return float(match.group(1))


def test_epsilon_mnist(capsys):
    assert main(["epsilon", "--noise-multiplier", "1.1", *MNIST]) == 0
    out = capsys.readouterr().out
    assert _number("epsilon", out) == pytest.approx(2.597, abs=1e-3)
    assert "q = 256/60000 = 0.00426667" in out
    assert "steps = 14063" in out
    assert "ceil(60 epochs * 60000 / 256)" in out


def test_epsilon_mnist_pld_and_statement(capsys):
    assert main(["epsilon", "--noise-multiplier", "1.1", *MNIST, "--accountant", "pld",
                 "--statement", "--l2-clip-norm", "1.0"]) == 0
    out = capsys.readouterr().out
    assert _number("epsilon", out) == pytest.approx(2.382, abs=1e-3)
    assert "Differential privacy statement" in out
    assert "epsilon (RDP accountant): 2.597" in out
    assert "epsilon (PLD accountant): 2.382" in out
    assert "C = 1" in out


def test_steps_instead_of_epochs(capsys):
    args = ["epsilon", "--noise-multiplier", "1.1", "--dataset-size", "60000",
            "--batch-size", "256", "--delta", "1e-5"]
    assert main([*args, "--steps", "14063"]) == 0
    by_steps = capsys.readouterr().out
    assert main([*args, "--epochs", "60"]) == 0
    by_epochs = capsys.readouterr().out
    assert _number("epsilon", by_steps) == _number("epsilon", by_epochs)


def test_fixed_size_sampling(capsys):
    assert main(["epsilon", "--noise-multiplier", "2.0", "--dataset-size", "1000",
                 "--batch-size", "10", "--steps", "100", "--delta", "1e-5",
                 "--sampling", "fixed_size"]) == 0
    out = capsys.readouterr().out
    want = accounting.epsilon(noise_multiplier=2.0, steps=100, delta=1e-5,
                              sampling="fixed_size", dataset_size=1000, batch_size=10)
    assert want <= _number("epsilon", out) <= want + 1e-3


def test_calibrate_round_trips_with_epsilon(capsys):
    assert main(["calibrate", "--target-epsilon", "3", *MNIST]) == 0
    out = capsys.readouterr().out
    sigma = _number("noise multiplier", out)
    assert 1.0 < sigma < 1.1
    assert main(["epsilon", "--noise-multiplier", repr(sigma), *MNIST]) == 0
    eps = _number("epsilon", capsys.readouterr().out)
    # The printed sigma is rounded up, so it still meets the target.
    assert 2.99 <= eps <= 3.0
    assert accounting.epsilon(noise_multiplier=sigma, dataset_size=60000, batch_size=256,
                              steps=14063, delta=1e-5) <= 3.0


@pytest.mark.parametrize("args,needle", [
    (["epsilon", "--noise-multiplier", "1.1", "--dataset-size", "60000",
      "--batch-size", "256", "--epochs", "60", "--delta", "2"], "delta"),
    (["epsilon", "--noise-multiplier", "-1", *MNIST], "noise_multiplier"),
    (["epsilon", "--noise-multiplier", "0", *MNIST], "noise_multiplier"),
    (["epsilon", "--noise-multiplier", "nan", *MNIST], "noise_multiplier"),
    (["epsilon", "--noise-multiplier", "1.1", "--dataset-size", "100", "--batch-size",
      "256", "--epochs", "1", "--delta", "1e-5"], "batch_size"),
    (["epsilon", "--noise-multiplier", "1.1", *MNIST, "--sampling", "fixed_size",
      "--accountant", "pld"], "accountant='rdp'"),
    (["epsilon", "--noise-multiplier", "1.1", "--dataset-size", "60000",
      "--batch-size", "256", "--steps", "-3", "--delta", "1e-5"], "steps"),
    (["epsilon", "--noise-multiplier", "1.1", "--dataset-size", "60000",
      "--batch-size", "256", "--epochs", "0", "--delta", "1e-5"], "epochs"),
    (["calibrate", "--target-epsilon", "-1", *MNIST], "target_epsilon"),
    (["calibrate", "--target-epsilon", "1e-4", "--dataset-size", "100", "--batch-size",
      "100", "--steps", "1000000", "--delta", "1e-5"], "cannot be met"),
])
def test_bad_input_exits_2_with_a_message(capsys, args, needle):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert needle in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def _bad_noise_cases():
    return [
        (["epsilon", "--noise-multiplier", "1.1", *MNIST, "--noise", "bandmf"], "--bands"),
        (["epsilon", "--noise-multiplier", "1.1", *MNIST, "--noise", "bandmf", "--bands", "8", "--partitions", "4"],
         "--partitions (4) must be >= --bands (8)"),
        (["epsilon", "--noise-multiplier", "1.1", *MNIST, "--noise", "tree", "--sampling", "fixed_size"],
         "--sampling poisson"),
        (["calibrate", "--target-epsilon", "3", *MNIST, "--noise", "tree", "--partitions", "1000"],
         "--batch-size * --partitions"),
    ]


@pytest.mark.parametrize("args, needle", _bad_noise_cases())
def test_bad_noise_options_exit_2_with_a_message(capsys, args, needle):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and needle in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_correlated_noise_is_accounted_as_its_dp_sgd_compositions(capsys):
    # BandMF over 16 parts: 1172 steps of 5 epochs are 74 passes, each a Poisson step at q = B * P / N.
    five = ["--dataset-size", "60000", "--batch-size", "256", "--epochs", "5", "--delta", "1e-5"]
    assert main(["epsilon", "--noise-multiplier", "1.1", *five, "--noise", "bandmf", "--bands", "4",
                 "--partitions", "16"]) == 0
    out = capsys.readouterr().out
    expected = accounting.epsilon(noise_multiplier=1.1, steps=74, sampling_rate=256 * 16 / 60000, delta=1e-5)
    assert _number("epsilon", out) == pytest.approx(expected, rel=1e-3)
    assert "accounted as 74 DP-SGD steps" in out
    # A tree per pass over 9 parts: 23 passes of height 4, 92 Gaussian compositions without sampling.
    assert main(["calibrate", "--target-epsilon", "3", "--dataset-size", "1437", "--batch-size", "144",
                 "--epochs", "20", "--delta", "1e-5", "--noise", "tree", "--partitions", "9"]) == 0
    out = capsys.readouterr().out
    sigma = accounting.calibrate_noise_multiplier(target_epsilon=3, delta=1e-5, steps=92, sampling_rate=1.0)
    assert _number("noise multiplier", out) == pytest.approx(sigma, rel=1e-3)


@pytest.mark.parametrize("args", [
    ["epsilon", "--noise-multiplier", "1.1", *MNIST, "--sampling", "shuffle"],
    ["epsilon", "--noise-multiplier", "abc", *MNIST],
    ["epsilon", *MNIST],  # missing --noise-multiplier
    ["epsilon", "--noise-multiplier", "1", *MNIST, "--steps", "10"],  # both
    ["frobnicate"],
    [],
])
def test_usage_errors_exit_2(capsys, args):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.strip()


@pytest.mark.parametrize("args", [["--help"], ["epsilon", "--help"],
                                  ["calibrate", "--help"]])
def test_help_exits_0(capsys, args):
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "usage: dpjax" in out
    assert "epsilon" in out and "delta" in out
    assert "example" in out


def test_epsilon_help_explains_flags(capsys):
    main(["epsilon", "--help"])
    out = capsys.readouterr().out
    for flag in ("--dataset-size", "--batch-size", "--noise-multiplier", "--epochs",
                 "--steps", "--delta", "--accountant", "--sampling", "--statement"):
        assert flag in out
    assert "ceil(E * N / B)" in out
    assert "TensorFlow" in out


def test_python_dash_m_dpjax_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "dpjax", "epsilon", "--noise-multiplier", "1.1", *MNIST],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _number("epsilon", result.stdout) == pytest.approx(2.597, abs=1e-3)
    assert result.stderr == ""

    bad = subprocess.run(
        [sys.executable, "-m", "dpjax", "epsilon", "--noise-multiplier", "1.1",
         "--dataset-size", "60000", "--batch-size", "256", "--epochs", "60",
         "--delta", "2"],
        capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_a_new_subcommand_can_be_registered(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", list(cli.COMMANDS))

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--name", required=True)

    def run(args: argparse.Namespace) -> int:
        if args.name == "bad":
            raise ValueError("name must not be 'bad'")
        print(f"hello {args.name}")
        return 0

    cli.register_command(cli.Command("hello", "say hello", add_arguments, run))
    assert main(["hello", "--name", "dp"]) == 0
    assert capsys.readouterr().out == "hello dp\n"
    assert main(["hello", "--name", "bad"]) == 2
    assert capsys.readouterr().err == "error: name must not be 'bad'\n"
    assert main(["epsilon", "--noise-multiplier", "1.1", *MNIST]) == 0
