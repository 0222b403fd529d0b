"""benchmarks/accuracy_vs_epsilon.py in a tiny mode: it runs and writes parseable outputs."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    path = os.path.join(ROOT, "benchmarks", "accuracy_vs_epsilon.py")
    spec = importlib.util.spec_from_file_location("accuracy_vs_epsilon", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_script_writes_json_markdown_and_plot(tmp_path):
    script = _load_script()
    assert script.main(["--epsilons", "3", "--epochs", "2", "--model", "mlp", "--seeds", "0", "1",
                        "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "accuracy_vs_epsilon.json").read_text())
    eps = [r["epsilon"] for r in report["rows"]]
    assert eps == [3.0, "inf", 3.0, "inf"] and [r["seed"] for r in report["rows"]] == [0, 0, 1, 1]
    summary = report["summary"][0]
    accs = summary["test_accuracy"]
    assert summary["median_test_accuracy"] == sum(accs) / 2 and len(accs) == 2
    private = report["rows"][0]
    assert private["epsilon_spent"] <= 3.0 and private["steps"] >= 1 and private["noise_multiplier"] > 0
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in report["rows"])
    assert report["jax_version"] and report["cpu"] and report["command"].startswith("python benchmarks/")
    md = (tmp_path / "accuracy_vs_epsilon.md").read_text()
    assert "| ε | σ | steps | test accuracy: median | worst – best | per seed |" in md
    assert f"{100 * min(accs):.2f} – {100 * max(accs):.2f}" in md
    assert "| 3 |" in md and "∞ (non-private)" in md and "jax" in md
    png = (tmp_path / "accuracy_vs_epsilon.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
