"""The course notebook: committed executed, every output from its present code, and it runs.

The committed copy is read as a student on a code host reads it: every code cell has run,
in order, with the full settings, and each cell's stored outputs were produced by its present
source (scripts/run_notebook.py stamps each cell with the SHA-256 of the source it ran).
Another test executes a copy with small settings, through the same script.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from mnist_cnn.data.catalog import CATALOG
from mnist_cnn.data.fetch import cache_status

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "cnn_mnist.ipynb"
RUNNER = ROOT / "scripts" / "run_notebook.py"


def runner():
    spec = importlib.util.spec_from_file_location("run_notebook", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(path: Path = NOTEBOOK) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """Everything the code cells printed or displayed as text, in order."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif "data" in output:
                data = output.data
                parts.append(data.get("text/markdown", data.get("text/plain", "")))
    return "\n".join(parts)


def figures(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def number(text: str, pattern: str) -> float:
    match = re.search(pattern, text, re.M)
    assert match, f"no output matches {pattern!r}"
    return float(match[1])


def test_committed_notebook_outputs_come_from_its_present_code():
    nb = read()
    assert nb.metadata.kernelspec.name == "python3"
    stale = runner().stale_cells(nb)
    assert not stale, "\n".join(stale) + "\nexecute it again: make notebook"
    text = text_of(nb)
    assert "settings: 10 epochs over all 60,000 training images, seed 0" in text, (
        "the committed notebook was not executed with the full settings: make notebook"
    )
    assert figures(nb) >= 7, "the committed notebook's figures are missing"
    warnings = [o.text for c in nb.cells for o in c.get("outputs", [])
                if o.output_type == "stream" and o.name == "stderr"]  # fmt: skip
    assert not warnings, warnings
    for name, label in (("mnist", "MNIST"), ("fashion-mnist", "Fashion-MNIST")):
        spread = CATALOG[name].seed_spread
        hand = number(text, rf"^{label} test accuracy after training, loop written out: (\S+)")
        fitted = number(text, rf"^{label} test accuracy after training, fit: (\S+)")
        for accuracy in (hand, fitted):  # each a plausible draw of the recipe
            assert abs(spread.sds_from_mean(accuracy)) <= 2.5, (name, accuracy, spread)


def test_a_code_cell_edited_after_execution_is_caught():
    check = runner().stale_cells
    nb = read()
    code = [c for c in nb.cells if c.cell_type == "code"]
    code[5].source += "\nprint('edited')"
    stale = check(nb)
    assert len(stale) == 1 and stale[0].startswith("code cell 6 ") and "edited" in stale[0]

    nb = read()
    code = [c for c in nb.cells if c.cell_type == "code"]
    code[2].execution_count, code[3].execution_count = 4, 3  # run out of order
    stale = check(nb)
    assert len(stale) == 2 and all("execution count" in line for line in stale)
    assert stale[0].startswith("code cell 3 ") and stale[1].startswith("code cell 4 ")


@pytest.fixture
def data_cached() -> None:
    for name in ("mnist", "fashion-mnist"):
        if any(state != "verified" for state in cache_status(CATALOG[name]).values()):
            pytest.skip(f"{name} is not in the data cache: run `mnist-cnn data fetch`")


def test_notebook_executes_on_a_small_budget(data_cached, tmp_path):
    copy = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, copy)
    env = os.environ | {
        "MNIST_CNN_NOTEBOOK_EPOCHS": "2",
        "MNIST_CNN_NOTEBOOK_TRAIN_LIMIT": "1500",
        "MPLBACKEND": "Agg",  # the script must still draw the figures inline
    }
    done = subprocess.run(
        [sys.executable, str(RUNNER), str(copy)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr == ""

    nb = read(copy)
    assert runner().stale_cells(nb) == []
    text = text_of(nb)
    assert "settings: 2 epochs over the first 1,500 training images, seed 0" in text
    assert "(1, 1, 28, 28) -> (1, 16, 28, 28)" in text  # padding 1 keeps the size
    assert "total: 16,938 parameters" in text
    assert number(text, r"largest difference between the two models' outputs .*: (\S+)") < 1e-5
    assert text.count("same initial weights as the loop written out: True") == 2
    for label in ("MNIST", "Fashion-MNIST"):
        before = number(text, rf"^{label} test accuracy before training: (\S+)")
        hand = number(text, rf"^{label} test accuracy after training, loop written out: (\S+)")
        fitted = number(text, rf"^{label} test accuracy after training, fit: (\S+)")
        assert before < 0.3 and hand > before + 0.2 and fitted > before + 0.2
    assert re.search(r"^true label: 7$", text, re.M)
    assert re.search(r"^true class: Ankle boot$", text, re.M)
    assert "| course (Flux, its CPU) | 0.9911 |" in text and "68.8 + 373.1 = 442" in text
    assert "42.8 + 368.5 = 411" in text
    assert figures(nb) >= 7
