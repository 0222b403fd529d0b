"""`dpjax train` refuses bad input before any work: a table of the mistakes users make
(bad data files, labels, output folders, the resume rules, bad values), each with
exit status 2, a message that names the parameter and what is allowed, and no
traceback. Then one real small run: seeds, δ ≥ 1/N, a damaged newest checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dpjax import audit, cli
from dpjax.cli import main


def _npz(tmp_path, name="data.npz", n=60, **change):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.normal(size=(n, 8)).astype(np.float32), "y_train": np.arange(n) % 3,
              "x_test": rng.normal(size=(12, 8)).astype(np.float32), "y_test": np.arange(12) % 3}
    arrays.update(change)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _text(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    return str(path)


def _checkpoint_folder(tmp_path, *, junk=False):
    folder = tmp_path / "ckpt"
    (folder / "7").mkdir(parents=True)
    if junk:
        (folder / "7" / "notes.txt").write_text("not a checkpoint")
    else:
        (folder / "privacy_log.jsonl").write_text('{"event": "checkpoint", "step": 7}\n')
    return str(folder)


def _junk_folder(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "readme.md").write_text("hello")
    return str(folder)


def _existing_file(tmp_path):
    return _text(tmp_path, "results.txt", "an earlier result")


# (case, extra arguments made from tmp_path, words the message must contain)
CASES = [
    ("data is a text file", lambda t: ["--data", _text(t, "d.npz", "hello\n")], ["--data", "not an .npz", "np.savez"]),
    ("data is a CSV", lambda t: ["--data", _text(t, "d.csv", "x,y\n1,2\n")], ["--data", "text or CSV", "np.savez"]),
    ("data is one .npy array", lambda t: ["--data", str(_npy(t))], ["--data", "single .npy", "np.savez"]),
    ("data is a folder", lambda t: ["--data", str(t)], ["--data", "is a folder", ".npz"]),
    ("data file missing", lambda t: ["--data", str(t / "nope.npz")], ["--data", "not found"]),
    ("data without y_test", lambda t: ["--data", _npz(t, y_test=None)], ["y_test", "missing"]),
    ("NaN features", lambda t: ["--data", _npz(t, x_train=np.full((60, 8), np.nan, np.float32))],
     ["x_train", "NaN"]),
    ("x and y lengths differ", lambda t: ["--data", _npz(t, y_train=np.arange(50) % 3)], ["x_train", "60", "50"]),
    ("float labels", lambda t: ["--data", _npz(t, y_train=np.linspace(0, 2, 60))], ["y_train", "integer"]),
    ("negative labels", lambda t: ["--data", _npz(t, y_train=np.arange(60) % 3 - 1)], ["y_train", "negative"]),
    ("test label outside the training classes", lambda t: ["--data", _npz(t, y_test=np.arange(12) % 4)],
     ["y_test", "label 3", "0..2", "--num-classes"]),
    ("a label of 1,000,000", lambda t: ["--data", _npz(t, y_train=np.where(np.arange(60) == 0, 10**6,
                                                                            np.arange(60) % 3))],
     ["1000000", "ids", "0..K-1", "--num-classes"]),
    ("--num-classes below the labels", lambda t: ["--data", _npz(t), "--num-classes", "2"],
     ["--num-classes 2", "label 2", "0..1"]),
    ("--num-classes 1", lambda t: ["--data", _npz(t), "--num-classes", "1"], ["--num-classes", "[2, 100000]"]),
    ("--out is an existing file", lambda t: ["--out", _existing_file(t)], ["--out", "not a folder"]),
    ("--checkpoint-dir is an existing file", lambda t: ["--checkpoint-dir", _existing_file(t)],
     ["--checkpoint-dir", "not a folder"]),
    ("--resume without --checkpoint-dir", lambda t: ["--resume"], ["--resume", "--checkpoint-dir"]),
    ("--overwrite without --checkpoint-dir", lambda t: ["--overwrite"], ["--overwrite", "--checkpoint-dir"]),
    ("--resume on a missing folder", lambda t: ["--resume", "--checkpoint-dir", str(t / "none")],
     ["--resume", "nothing to resume", "no such folder"]),
    ("--resume on an empty folder", lambda t: ["--resume", "--checkpoint-dir", str(t)],
     ["--resume", "nothing to resume", "empty folder"]),
    ("--resume on a folder of junk files", lambda t: ["--resume", "--checkpoint-dir", _junk_folder(t)],
     ["--resume", "nothing to resume"]),
    ("a folder holding a run, without --resume", lambda t: ["--checkpoint-dir", _checkpoint_folder(t)],
     ["--checkpoint-dir", "already holds a run", "--resume", "--overwrite"]),
    ("--resume and --overwrite", lambda t: ["--resume", "--overwrite", "--checkpoint-dir", str(t)],
     ["--resume", "--overwrite", "not both"]),
    ("--epsilon negative", lambda t: ["--epsilon", "-1"], ["--epsilon", "> 0"]),
    ("--delta 2", lambda t: ["--delta", "2"], ["--delta", "(0, 1)"]),
    ("--noise-multiplier 0", lambda t: ["--noise-multiplier", "0"], ["--noise-multiplier", "> 0"]),
    ("--clip-norm 0", lambda t: ["--clip-norm", "0"], ["--clip-norm", "> 0"]),
    ("--lr nan", lambda t: ["--lr", "nan"], ["--lr", "> 0"]),
    ("--epochs 0", lambda t: ["--epochs", "0"], ["--epochs", "> 0"]),
    ("--batch-size 0", lambda t: ["--batch-size", "0"], ["--batch-size", "positive integer"]),
    ("--microbatch-size -4", lambda t: ["--microbatch-size", "-4"], ["--microbatch-size", "positive integer"]),
    ("--checkpoint-every 0", lambda t: ["--checkpoint-every", "0"], ["--checkpoint-every", "positive integer"]),
    ("--keep-fraction -1", lambda t: ["--keep-fraction", "-1"], ["--keep-fraction", ">= 0"]),
    ("--seed -1", lambda t: ["--seed", "-1"], ["--seed", "non-negative"]),
    ("--noise bandmf without --bands", lambda t: ["--noise", "bandmf"], ["--noise bandmf", "--bands"]),
    ("--bands without bandmf", lambda t: ["--bands", "4"], ["--bands", "--noise bandmf"]),
    ("--bands 0", lambda t: ["--noise", "bandmf", "--bands", "0"], ["--bands", ">= 1"]),
    ("--partitions below --bands", lambda t: ["--noise", "bandmf", "--bands", "4", "--partitions", "2"],
     ["--partitions", "--bands", "one band"]),
    ("--partitions 0", lambda t: ["--noise", "tree", "--partitions", "0"], ["--partitions", ">= 1"]),
]


def _npy(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 4)))
    return path


@pytest.mark.parametrize("case,extra,words", CASES, ids=[c[0] for c in CASES])
def test_bad_train_input_is_refused_before_any_work(capsys, tmp_path, case, extra, words):
    out = tmp_path / "out-folder"
    args = ["train", "--quiet", *extra(tmp_path)]
    if "--out" not in args:
        args += ["--out", str(out)]
    assert main(args) == 2, case
    captured = capsys.readouterr()
    assert captured.err.startswith("error: "), captured.err
    for word in words:
        assert word in captured.err, (word, captured.err)
    assert "Traceback" not in captured.err
    assert "seeds:" not in captured.out  # refused before training began
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("args", [
    ["train", "--model", "resnet"], ["train", "--epsilon", "abc"], ["train", "--num-classes", "3.5"],
    ["train", "--frobnicate"],
])
def test_train_usage_errors_exit_2(capsys, args):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "usage: dpjax train" in captured.err


def test_a_checkpoint_folder_of_junk_with_a_step_name_is_named_bad(capsys, tmp_path):
    # It passes the early check (a step-named folder), so the verifier names it.
    assert main(["train", "--quiet", "--data", _npz(tmp_path), "--resume", "--checkpoint-dir",
                 _checkpoint_folder(tmp_path, junk=True), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "step 7: incomplete" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [
    ["epsilon", "--noise-multiplier", "1.1", "--dataset-size", "1000", "--batch-size", "100", "--epochs", "5"],
    ["calibrate", "--target-epsilon", "3", "--dataset-size", "1000", "--batch-size", "100", "--epochs", "5"],
])
def test_delta_not_below_one_over_n_is_warned_about(capsys, command):
    assert main([*command, "--delta", "0.002"]) == 0
    err = capsys.readouterr().err
    assert "warning: delta = 0.002 is not below 1/N = 0.001" in err
    assert main([*command, "--delta", "1e-5"]) == 0
    assert "warning: delta" not in capsys.readouterr().err  # (an RDP note may appear, once per setting)


def test_help_and_argument_errors_import_no_jax(tmp_path):
    code = ("import sys; from dpjax.cli import main; assert main(['--help']) == 0; "
            "assert main(['train', '--help']) == 0; assert main(['train', '--epsilon', '-1']) == 2; "
            "assert main(['epsilon', '--help']) == 0; assert main(['attack', '--help']) == 0; "
            "assert main(['attack', '--eps', '5']) == 2; "
            f"assert main(['train', '--checkpoint-dir', {str(tmp_path / 'none')!r}, '--resume']) == 2; "
            "bad = [m for m in ('jax', 'optax', 'flax', 'dp_accounting') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_cli_lists_the_audit_loop_forms_without_importing_audit():
    assert cli.AUDIT_LOOP_FORMS == audit.LOOP_FORMS


def test_a_small_run_os_seeds_delta_warning_and_a_damaged_newest_checkpoint(capsys, tmp_path):
    """OS-drawn seeds (stored with the checkpoints), the δ ≥ 1/N warning, and a resume
    past a damaged newest checkpoint that falls back and ends with the same result."""
    data = _npz(tmp_path, n=90)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    run = ["train", "--quiet", "--data", data, "--epochs", "2", "--batch-size", "45", "--delta", "0.02",
           "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--out", str(out)]
    assert main(run) == 0
    captured = capsys.readouterr()
    assert "seeds: drawn from the operating system" in captured.out
    assert "warning: delta = 0.02 is not below 1/N" in captured.err
    first = json.loads((out / "metrics.json").read_text())
    steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
    newest = ckpt / str(steps[-1])
    shutil.rmtree(newest / "state")
    assert main([*run, "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"checkpoint step {steps[-1]}" in captured.err and f"resumed from step {steps[-2]}" in captured.err
    again = json.loads((out / "metrics.json").read_text())
    assert again["history"] == first["history"] and again["epsilon"] == first["epsilon"]
    assert main(run) == 2  # the folder holds a run now
    assert "already holds a run" in capsys.readouterr().err
