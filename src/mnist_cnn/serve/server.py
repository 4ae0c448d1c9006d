"""`mnist-cnn serve`: bind the address first (a clear error if it is taken), then uvicorn."""

from __future__ import annotations

import contextlib
import resource
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import uvicorn

from mnist_cnn.errors import UserError
from mnist_cnn.serve.app import create_app

# Connections waiting to be accepted: a burst of a few thousand clients is queued, not refused.
BACKLOG = 4096


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); UserError if it can't be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"cannot serve on host '{host}' ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except (OSError, OverflowError) as exc:
        sock.close()
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UserError(
            f"cannot listen on {host}:{port} ({reason}): choose another --port"
        ) from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _raise_open_file_limit() -> None:
    """Each connection is a file descriptor: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _say(message: str) -> None:
    print(message, flush=True)


def serve(
    run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, announce: Callable = _say
) -> None:
    """Serve the run's page and API until interrupted (Ctrl-C or SIGTERM)."""
    app = create_app(run_dir)
    # One image's forward pass takes ~0.2 ms: splitting it across cores gains nothing, and
    # with anything else running (the server's own threads, other programs) each pass then
    # waits for a second core to be free, which made single requests ~70 ms instead of ~5.
    # Concurrency comes from serving many requests at once instead.
    torch.set_num_threads(1)
    sock = bind_socket(host, port)
    _raise_open_file_limit()
    info = app.state.predictor.info
    accuracy = info.get("test_accuracy")
    about = f"{info.get('dataset')}, recipe {info.get('recipe')}"
    if accuracy is not None:
        about += f", test accuracy {accuracy:.4f}"
    announce(f"serving {run_dir} ({about}) at {url_of(sock)}  (Ctrl-C to stop)")
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, backlog=BACKLOG, timeout_graceful_shutdown=5
    )
    with sock:
        uvicorn.Server(config).run(sockets=[sock])
