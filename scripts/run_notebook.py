"""Execute a notebook top to bottom and store its outputs, stamped with each cell's code.

    python scripts/run_notebook.py notebooks/cnn_mnist.ipynb            # in place (`make notebook`)
    python scripts/run_notebook.py notebooks/cnn_mnist.ipynb --out X.ipynb

The kernel runs this interpreter (whatever other `python3` kernels the machine knows) and
inherits the environment, so settings the notebook reads from environment variables
(MNIST_CNN_NOTEBOOK_EPOCHS, MNIST_CNN_NOTEBOOK_TRAIN_LIMIT) reach it. Each code cell's
metadata records the SHA-256 of the source that produced its outputs: `stale_cells` lists
the cells edited since, which the tests refuse in the committed notebook.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from jupyter_client import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from mnist_cnn.io import write_atomic

KERNEL_NAME = "mnist-cnn-notebook"
STAMP = "source_sha256"  # the key in each code cell's metadata


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def stale_cells(nb: nbformat.NotebookNode) -> list[str]:
    """The code cells whose stored outputs did not come from their present source, or that
    ran out of order: one line each, naming the cell by its position and first line."""
    problems = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    for number, cell in enumerate(code, start=1):
        first = cell.source.strip().splitlines()[0][:60] if cell.source.strip() else "(empty)"
        where = f"code cell {number} ({first!r})"
        if cell.metadata.get(STAMP) != source_hash(cell.source):
            problems.append(f"{where}: edited since it was executed")
        if cell.execution_count != number:
            problems.append(f"{where}: execution count {cell.execution_count}, expected {number}")
        if any(o.get("output_type") == "error" for o in cell.outputs):
            problems.append(f"{where}: its stored output is an error")
    return problems


def kernelspec_dir(root: Path) -> Path:
    """A Jupyter data folder holding one kernelspec that launches this interpreter."""
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3",
                "language": "python",
            }
        )
    )
    return root


def execute(path: Path, out: Path, timeout: int) -> None:
    nb = nbformat.read(path, as_version=4)
    kernelspec = dict(nb.metadata.get("kernelspec", {}))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JUPYTER_PATH"] = str(kernelspec_dir(Path(tmp)))
        # Figures inline, whatever backend the calling shell asks for.
        os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        # Local sockets in the temporary folder, not TCP on localhost.
        km = AsyncKernelManager(
            kernel_name=KERNEL_NAME, transport="ipc", ip=str(Path(tmp) / "kernel")
        )
        client = NotebookClient(
            nb,
            km=km,
            kernel_name=KERNEL_NAME,
            timeout=timeout,
            record_timing=False,
            resources={"metadata": {"path": str(path.resolve().parent)}},
        )
        client.execute(cleanup_kc=True)  # shut the kernel down: it is ours
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.metadata[STAMP] = source_hash(cell.source)
    if kernelspec:  # keep the notebook's own kernel name, not the temporary one
        nb.metadata["kernelspec"] = kernelspec
    text = nbformat.writes(nb)
    write_atomic(out, (text if text.endswith("\n") else text + "\n").encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, help="where to write it (default: in place)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell at most")
    args = parser.parse_args(argv)
    if not args.notebook.is_file():
        print(f"run_notebook: error: no notebook at {args.notebook}", file=sys.stderr)
        return 2
    try:
        execute(args.notebook, args.out or args.notebook, args.timeout)
    except CellExecutionError as exc:  # the notebook on disk is left as it was
        print(f"run_notebook: a cell failed, nothing written:\n{exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
