"""Shared fixtures. Each section is independent; add new fixtures under their own heading."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from tiny_data import tiny_arrays

from mnist_cnn.data.catalog import FILE_NAMES
from mnist_cnn.data.idx import write_idx

# --- data: synthetic MNIST-format folders and an isolated cache ----------------------------


@pytest.fixture
def tiny_idx_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `tiny_idx_folder(name="tiny", n_train=50, n_test=20, gz=False, seed=0)`.

    Writes the four IDX files (named as in MNIST, with `.gz` when `gz`) into
    `tmp_path / name` and returns that folder. Different seeds give different images.
    """

    def make(
        name: str = "tiny", *, n_train: int = 50, n_test: int = 20, gz: bool = False, seed: int = 0
    ) -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".gz" if gz else ""
        for file_name, array in tiny_arrays(n_train, n_test, seed).items():
            write_idx(folder / f"{file_name}{suffix}", array)
        return folder

    return make


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data cache: MNIST_CNN_CACHE points at a fresh tmp folder (also for `run_cli`)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MNIST_CNN_CACHE", str(cache))
    return cache


@pytest.fixture
def closed_port_url() -> str:
    """`http://127.0.0.1:PORT/` where nothing listens: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="session")
def real_digits(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], Path]:
    """Factory: `real_digits(n_train, n_test)`: an MNIST-format folder of the first real
    MNIST digits (made once per size), for tests that must train and learn something."""
    made: dict[tuple[int, int], Path] = {}

    def make(n_train: int, n_test: int) -> Path:
        if (n_train, n_test) not in made:
            from mnist_cnn import load_dataset

            mnist = load_dataset("mnist")
            folder = tmp_path_factory.mktemp(f"digits-{n_train}-{n_test}")
            arrays = [mnist.train.images[:n_train], mnist.train.labels[:n_train],
                      mnist.test.images[:n_test], mnist.test.labels[:n_test]]  # fmt: skip
            for name, array in zip(FILE_NAMES, arrays, strict=True):
                write_idx(folder / name, array.numpy().astype(np.uint8))
            made[n_train, n_test] = folder
        return made[n_train, n_test]

    return make


# --- command line ----------------------------------------------------------------------------

CliResult = tuple[int, str, str]


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., CliResult]:
    """Run `python -m mnist_cnn ARGS` in a subprocess; return (returncode, stdout, stderr).

    `env` entries are laid over the current environment (a value of None removes the
    variable), so fixtures that monkeypatch os.environ, like `isolated_cache`, apply too.
    The command runs in `cwd` (default: tmp_path), so default output files land there.
    """

    def run(
        *args: str,
        env: Mapping[str, str | None] | None = None,
        cwd: Path | None = None,
        timeout: float = 120,
    ) -> CliResult:
        full_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        done = subprocess.run(
            [sys.executable, "-m", "mnist_cnn", *map(str, args)],
            env=full_env,
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.returncode, done.stdout, done.stderr

    return run


# Runs commands one after another through `mnist_cnn.cli.main`, as `python -m mnist_cnn`
# does, in one fresh interpreter, each with its own stdout and stderr, and prints their
# (code, stdout, stderr) as JSON. What a refused command prints is the same; the commands
# share the one `import torch` (1.6 s each otherwise).
_RUN_EACH = r"""
import contextlib, io, json, sys, traceback
from mnist_cnn.cli import main
results = []
for argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # what a process would die of, with its traceback
            traceback.print_exc()
            code = 1
    results.append([code, out.getvalue(), err.getvalue()])
sys.__stdout__.write(json.dumps(results))
"""


@pytest.fixture
def run_cli_each(tmp_path: Path) -> Callable[..., list[CliResult]]:
    """`run_cli_each(COMMANDS, cwd=None)`: each command (a list of arguments) run as
    `python -m mnist_cnn ARGS` would run it, all in one subprocess (in `cwd`, default
    tmp_path), for tests that try many refusals; a list of (returncode, stdout, stderr).
    Output past Python's own streams (from a library's C code) fails the test."""

    def run(commands: list[list], cwd: Path | None = None) -> list[CliResult]:
        argvs = [[str(arg) for arg in command] for command in commands]
        done = subprocess.run(
            [sys.executable, "-c", _RUN_EACH], input=json.dumps(argvs), cwd=cwd or tmp_path,
            capture_output=True, text=True, timeout=60 + 30 * len(argvs),
        )  # fmt: skip
        assert done.returncode == 0 and done.stderr == "", done.stderr
        return [tuple(result) for result in json.loads(done.stdout)]

    return run


# --- a trained run, shared by the tests of evaluate, predict, explain, export ---------------


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory: the seed recipe, one epoch on all of MNIST (about 0.97 accuracy)."""
    import torch

    from mnist_cnn import build_model, fit, load_dataset

    out = tmp_path_factory.mktemp("runs") / "mnist-seed"
    torch.manual_seed(0)
    fit(build_model("seed"), load_dataset("mnist"), "seed", epochs=1, out=out,
        progress=False, log=None)  # fmt: skip
    return out


# --- web app: the trained run served on 127.0.0.1 -------------------------------------------


@pytest.fixture(scope="session")
def live_server(trained_run: Path):
    """`trained_run` served by uvicorn in a background thread; yields the base URL."""
    import threading
    import time

    uvicorn = pytest.importorskip("uvicorn", reason="needs the serve extra")
    from mnist_cnn.serve import create_app
    from mnist_cnn.serve.server import bind_socket, url_of

    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(create_app(trained_run), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the web app did not start")
        time.sleep(0.02)
    yield url_of(sock)
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


# --- web page: `trained_run` exported with --format web --------------------------------------


@pytest.fixture(scope="session")
def web_export(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder `mnist-cnn export trained_run --format web` writes, made once.

    It needs onnxruntime-web in the cache (`make setup` puts it there); without it the
    tests that use this fixture skip, saying how to provide it.
    """
    pytest.importorskip("onnx", reason="export needs the export extra")
    from mnist_cnn.web import ORT, cached_runtime, how_to_provide

    if cached_runtime() is None:
        pytest.skip(f"{ORT.label} is not in the cache: {how_to_provide()}")
    out = tmp_path_factory.mktemp("web") / "page"
    done = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "export", str(trained_run), "--format", "web",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out
