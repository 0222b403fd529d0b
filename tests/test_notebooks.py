"""Execute every notebook in notebooks/ and check what it prints.

Each notebook runs in a fresh Jupyter kernel started with *this* interpreter
(``sys.executable``), through a throw-away kernelspec in a temporary directory:
nothing is installed or registered globally, and a ``python3`` kernel found
elsewhere on the machine can never be picked up by mistake.

The notebooks are stored without outputs; executing them here changes only the
in-memory copy, never the files.
"""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from ipykernel.kernelspec import get_kernel_dict  # noqa: E402  (after importorskip)
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "python3"

# What a notebook's printed results must satisfy. Notebooks not listed here only
# have to run without errors.
EXPECTED = {
    "quickstart.ipynb": {"min_private_accuracy": 0.75, "max_epsilon": 3.0},
    "nnx_loop.ipynb": {"min_private_accuracy": 0.75, "max_epsilon": 3.0},
    "fast_clipping.ipynb": {"max_relative_difference": 1e-5, "max_scratch_ratio": 1.25},
}

# Inserted as the first cell of the in-memory copy: reports which Python runs the kernel.
_PROBE = "import json, sys\nprint('KERNEL-PYTHON ' + json.dumps([sys.executable, sys.prefix]))"


def _kernel_manager(tmp_path):
    """A kernel manager whose only ``python3`` kernelspec runs ``sys.executable``."""
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = get_kernel_dict()  # ipykernel's own spec for this interpreter
    spec["argv"] = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec["display_name"] = f"Python ({sys.executable})"
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    assert ksm.get_kernel_spec(KERNEL_NAME).argv[0] == sys.executable
    return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def _text(cell) -> str:
    """Everything a code cell printed (stdout/stderr streams and text/plain results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _last_float(pattern: str, text: str, name: str) -> float:
    found = re.findall(pattern, text, flags=re.MULTILINE)
    assert found, f"the notebook printed no line matching {pattern!r} ({name})"
    return float(found[-1])


def test_notebooks_found():
    assert "quickstart.ipynb" in [p.name for p in NOTEBOOKS], f"no quickstart notebook in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} carry outputs or execution counts; store the notebook "
        "cleared (e.g. jupyter nbconvert --clear-output --inplace)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(_PROBE))

    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name=KERNEL_NAME,
        km=_kernel_manager(tmp_path),
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # run from notebooks/
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails

    errors = [
        (i, out.get("ename"), out.get("evalue"))
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.outputs
        if out["output_type"] == "error"
    ]
    assert not errors, errors

    # The kernel really ran this interpreter (the project's virtual environment).
    probe = re.search(r"^KERNEL-PYTHON (.*)$", _text(nb.cells[0]), flags=re.MULTILINE)
    assert probe, _text(nb.cells[0])
    assert json.loads(probe.group(1)) == [sys.executable, sys.prefix]

    expected = EXPECTED.get(path.name)
    if expected is None:
        return
    text = "\n".join(_text(cell) for cell in nb.cells[1:] if cell.cell_type == "code")
    if "max_relative_difference" in expected:
        diff = _last_float(r"^max relative difference fast vs vmap: ([0-9.eE+-]+)\s*$", text, "fast vs vmap")
        ratio = _last_float(r"^scratch ratio fast default: ([0-9.eE+-]+)\s*$", text, "scratch ratio")
        assert diff <= expected["max_relative_difference"], text
        assert 0 < ratio <= expected["max_scratch_ratio"], text
        return
    accuracy = _last_float(r"^private test accuracy: ([0-9.eE+-]+)\s*$", text, "private accuracy")
    epsilon = _last_float(r"^epsilon: ([0-9.eE+-]+)\s*$", text, "epsilon")
    assert accuracy > expected["min_private_accuracy"], text
    assert 0.0 < epsilon <= expected["max_epsilon"] + 1e-6, text
