"""The benchmark suite (``python -m benchmarks.run``): its smoke mode and its report.

The smoke run compiles every available method on tiny models, on the CPU, in
a subprocess (so its fast-compile XLA flag applies and nothing leaks into this
process). It checks the outputs exist and are complete, not any speed.
"""

import json
import os
import subprocess
import sys
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import jax_methods, protocol, report, torch_peers  # noqa: E402

ALL_METHODS = set(jax_methods.METHODS) | set(torch_peers.METHODS)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out),
                           "--device-label", "smoke"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = out / "smoke"
    with open(folder / "results.json") as f:
        results = json.load(f)
    return folder, results, wall, proc.stdout


def test_smoke_writes_json_markdown_and_plots(smoke):
    folder, results, wall, _ = smoke
    for name in ("results.json", "results.md", "throughput.png", "memory.png"):
        assert (folder / name).is_file(), name
        assert (folder / name).stat().st_size > 0, name
    for name in ("throughput.png", "memory.png"):
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC
    meta = results["meta"]
    assert meta["device_label"] == "smoke"
    assert meta["device"]["platform"] == "cpu"
    assert meta["versions"]["jax"] and meta["versions"]["jaxlib"] and meta["versions"]["dpjax"]
    assert meta["size"] == "tiny"
    md = (folder / "results.md").read_text()
    assert "÷ JAX NP" in md and "Poisson" in md and "Accountant" in md
    assert wall < 600


def test_smoke_every_available_method_has_throughput_and_ratio(smoke):
    _, results, _, _ = smoke
    skipped = {s["what"]: s["reason"] for s in results["skipped"]}
    for method in ALL_METHODS & set(skipped):
        assert skipped[method], f"{method} skipped without a reason"
    available = ALL_METHODS - set(skipped)
    assert {"jax-nonprivate", "dpjax-vmap", "dpjax-fast", "optax-dpsgd"} <= available
    rows = results["throughput"]
    models = {"cnn", "transformer", "mlp"}
    for method in available:
        mrows = [r for r in rows if r["method"] == method]
        assert {r["model"] for r in mrows} == models, f"{method}: models {sorted(r['model'] for r in mrows)}"
        for r in mrows:
            assert r["status"] == "ok", f"{method} on {r['model']}: {r.get('error')}"
            assert r["examples_per_s"] > 0
            assert r["ratio_examples_per_s"] is not None and r["ratio_examples_per_s"] > 0
            if r["framework"] == "jax":
                assert r["compile_s"] >= 0 and r["scratch_bytes"] is not None
    assert not results["errors"], results["errors"]


def test_smoke_poisson_accountant_and_gpu_only_parts(smoke):
    _, results, _, _ = smoke
    (p,) = results["poisson"]
    assert p["status"] == "ok", p.get("error")
    assert p["fixed_examples_per_s"] > 0 and p["poisson_examples_per_s"] > 0
    assert isinstance(p["recompiles_after_warmup"], int) and p["recompiles_after_warmup"] >= 0
    assert p["mean_padded_over_expected"] >= p["mean_batch_over_expected"]
    acc = {r["accountant"]: r for r in results["accountant"]}
    assert set(acc) == {"rdp", "pld"}
    for r in acc.values():
        assert r["status"] == "ok" and r["steps"] == 100_000
        assert r["epsilon"] > 0 and r["first_call_s"] > 0
    skipped = {s["what"]: s["reason"] for s in results["skipped"]}
    assert "GPU only" in skipped["max batch search"]
    assert results["max_batch"] == []


def test_ratios_and_markdown_from_synthetic_rows(tmp_path):
    def row(method, eps, scratch, framework="jax", status="ok"):
        return {"kind": "throughput", "framework": framework, "model": "cnn", "size": "tiny", "batch": 8,
                "method": method, "label": method, "status": status, "examples_per_s": eps,
                "scratch_bytes": scratch, "peak_bytes": None, "compile_s": 1.0}

    results = {
        "meta": {"device_label": "x", "versions": {"jax": "0"}, "device": {"platform": "cpu"}},
        "throughput": [row("jax-nonprivate", 1000.0, 100), row("dpjax-fast", 500.0, 125),
                       row("torch-nonprivate", 400.0, None, "torch"), row("opacus-hooks", 100.0, None, "torch"),
                       {**row("dpjax-vmap", None, None), "status": "error", "error": "boom | bad"}],
        "skipped": [{"what": "jax_privacy", "reason": "not installed"}],
        "max_batch": [{"kind": "max_batch", "model": "cnn", "method": "jax-nonprivate", "max_batch": 1000,
                       "status": "ok", "complete": True, "probes": []},
                      {"kind": "max_batch", "model": "cnn", "method": "dpjax-fast", "max_batch": 250,
                       "status": "ok", "complete": False, "probes": []}],
    }
    paths = report.write(results, str(tmp_path), with_plots=True)
    by = {r["method"]: r for r in results["throughput"]}
    assert by["dpjax-fast"]["ratio_examples_per_s"] == pytest.approx(0.5)
    assert by["dpjax-fast"]["ratio_scratch"] == pytest.approx(1.25)
    assert by["opacus-hooks"]["ratio_examples_per_s"] == pytest.approx(0.1)
    assert by["opacus-hooks"]["ratio_vs_torch_nonprivate"] == pytest.approx(0.25)
    assert by["dpjax-vmap"]["ratio_examples_per_s"] is None
    assert results["max_batch"][1]["ratio_max_batch"] == pytest.approx(0.25)
    md = open(paths["md"]).read()
    assert "| 8 | dpjax-fast | 500 | 0.500 | 0.0 | 1.25 |" in md
    assert "error: boom / bad" in md and "jax_privacy: not installed" in md
    assert os.path.isfile(paths["throughput"]) and os.path.isfile(paths["memory"])


def test_protocol_keeps_only_marked_lines_and_nonfinite_becomes_null(capsys):
    protocol.emit({"a": float("nan"), "b": [1.0, float("inf")]})
    printed = capsys.readouterr().out
    parsed = protocol.parse(["noise", printed.strip(), protocol.MARKER + "{broken"])
    assert parsed == [{"a": None, "b": [1.0, None]}]


def test_torch_peer_availability_names_a_reason():
    for method in torch_peers.METHODS:
        ok, why = torch_peers.availability(method)
        assert ok or why
    assert torch_peers.availability("nope") == (False, "unknown method 'nope'")


def test_torch_peer_availability_asks_another_interpreter(tmp_path):
    """``--torch-python``: the check runs in that interpreter, and a broken one is named."""
    here = torch_peers.availability("opacus-hooks")
    there = torch_peers.availability("opacus-hooks", python=sys.executable)
    assert here[0] == there[0]
    assert there[0] or sys.executable in there[1]
    ok, why = torch_peers.availability("torch-nonprivate", python=str(tmp_path / "no-such-python"))
    assert not ok and "cannot run" in why


def test_compile_memory_reports_scratch_without_running(tmp_path, capsys):
    from benchmarks import compile_memory

    assert compile_memory.main(["--size", "tiny", "--cells", "cnn:8", "--methods", "jax-nonprivate,dpjax-fast",
                                "--out", str(tmp_path)]) == 0
    with open(tmp_path / "compile_memory.json") as f:
        rows = json.load(f)["rows"]
    assert [r["method"] for r in rows] == ["jax-nonprivate", "dpjax-fast"]
    assert all(r["scratch_bytes"] > 0 for r in rows) and rows[0]["scratch_vs_first"] == 1.0
    with pytest.raises(SystemExit):
        compile_memory.main(["--cells", "cnn"])


def test_fast_variants_sweeps_keep_fraction(tmp_path):
    from benchmarks import fast_variants

    assert fast_variants.main(["--size", "tiny", "--batches", "8", "--steps", "2", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "fast_variants.json") as f:
        rows = json.load(f)["rows"]
    assert [r["keep_fraction"] for r in rows] == [None, 0.0, 0.25, "inf"]
    assert all(r["status"] == "ok" for r in rows) and all("vs_nonprivate" in r for r in rows[1:])


def test_precision_check_compares_fast_and_vmap(tmp_path):
    from benchmarks import precision_check

    assert precision_check.main(["--size", "tiny", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "precision_check.json") as f:
        rows = json.load(f)["rows"]
    assert {(r["model"], r["precision"]) for r in rows} == {
        (m, p) for m in ("cnn", "transformer") for p in ("default", "highest")}
    assert all(r["max_rel_norm_diff"] < 1e-4 for r in rows)  # float32 on the CPU
