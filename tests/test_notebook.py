"""The walkthrough notebook: committed clean, and it runs end to end on a small budget."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from mnist_cnn.data.catalog import CATALOG
from mnist_cnn.data.fetch import cache_status

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "cnn_mnist.ipynb"

# Small enough to run in seconds on two cores, large enough that the first test digit
# (a 7) is recognised after one epoch.
SMALL_BUDGET = "EPOCHS = 1\nTRAIN_LIMIT = 10_000\nSEED = 0\n"
KERNEL_NAME = "mnist-cnn-test"


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_index(nb: nbformat.NotebookNode) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell should be tagged `parameters`"
    return tagged[0]


def test_committed_notebook_is_valid_and_has_no_outputs():
    nb = read_notebook()
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [], f"committed with outputs: {cell.source[:60]!r}"
        assert cell.execution_count is None, f"committed executed: {cell.source[:60]!r}"
    params = nb.cells[parameters_index(nb)]
    assert params.cell_type == "code"
    for name in ("EPOCHS", "TRAIN_LIMIT", "SEED"):
        assert re.search(rf"^{name} = ", params.source, re.M), f"{name} not in parameters"


def venv_kernelspec(root: Path) -> Path:
    """A kernelspec that launches this interpreter, whatever other `python3` specs exist."""
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "mnist-cnn test kernel",
                "language": "python",
            }
        )
    )
    return root


def stream_text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def output_matching(nb: nbformat.NotebookNode, pattern: str) -> re.Match:
    for cell in nb.cells:
        if cell.cell_type == "code" and (match := re.search(pattern, stream_text(cell), re.M)):
            return match
    raise AssertionError(f"no cell printed a line matching {pattern!r}")


@pytest.fixture
def data_cached() -> None:
    for name in ("mnist", "fashion-mnist"):
        if any(state != "verified" for state in cache_status(CATALOG[name]).values()):
            pytest.skip(f"{name} is not in the data cache: run `mnist-cnn data fetch`")


def test_notebook_runs_on_a_small_budget(data_cached, tmp_path, monkeypatch):
    nb = read_notebook()
    injected = nbformat.v4.new_code_cell(
        SMALL_BUDGET + "import sys\nprint('kernel prefix:', sys.prefix)",
        metadata={"tags": ["injected-parameters"]},
    )
    nb.cells.insert(parameters_index(nb) + 1, injected)

    monkeypatch.setenv("JUPYTER_PATH", str(venv_kernelspec(tmp_path / "jupyter")))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    assert output_matching(nb, r"kernel prefix: (.*)")[1] == sys.prefix
    before = float(output_matching(nb, r"^MNIST test accuracy before training: (\d\.\d+)")[1])
    after = float(output_matching(nb, r"^MNIST test accuracy after training: (\d\.\d+)")[1])
    assert 0.0 <= before < 0.3
    assert after > 0.9
    assert after > before
    assert output_matching(nb, r"predicted class: (\d)")[1] == "7"
    assert output_matching(nb, r"true label: (\d)")[1] == "7"
    fashion = float(output_matching(nb, r"Fashion-MNIST test accuracy after training: (\S+)")[1])
    assert fashion > 0.6
    assert output_matching(nb, r"true class: (.+)")[1] == "Ankle boot"
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 5, "the notebook's figures were not drawn"
