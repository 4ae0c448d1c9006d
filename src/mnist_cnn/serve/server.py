"""`mnist-cnn serve`: bind the address first (a clear error if it is taken), then uvicorn.

uvicorn as configured here adds what the app cannot do itself: a deadline for a request's
headers, a cap on open connections, and logging that never makes the server wait for
whoever reads its stderr (a full pipe once froze the whole server: each client that went
away logged a traceback there, and writing the forty-first blocked the event loop).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import logging.handlers
import queue
import resource
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import h11
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mnist_cnn.errors import UserError
from mnist_cnn.serve.app import create_app

# Connections waiting to be accepted: a burst of a few thousand clients is queued, not refused.
BACKLOG = 4096
HEADER_TIMEOUT_S = 10  # from a connection's start (or its previous answer) to a request's headers
KEEP_ALIVE_S = 5  # an idle connection is closed after this
MAX_HEADER_BYTES = 16 * 1024  # a request line and headers over this get 400
# Open connections; one more is answered 503 and closed. Each holds at most a few hundred
# kilobytes of buffers, so this bounds their memory as the app's budgets bound the rest.
MAX_CONNECTIONS = 1024
LOG_QUEUE = 1000  # log records waiting for stderr; more are dropped, never waited for


def _raw_json(status: int, reason: str, message: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for when h11 has no request."""
    body = json.dumps({"error": message}).encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


TOO_MANY = _raw_json(503, "Service Unavailable", "too many open connections: try again shortly", 1)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers and a cap on
    open connections. (uvicorn's keep-alive timeout is cancelled by any byte, so a client
    sending one byte a second could otherwise hold a connection forever.)"""

    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            transport.write(TOO_MANY)
            transport.close()
            return
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self._headers_too_long(data):
            self.send_400_response("")
            return
        super().data_received(data)
        self._watch_headers()

    def _headers_too_long(self, data: bytes) -> bool:
        """Whether the request line and headers that `data` adds to, or ends, are over
        MAX_HEADER_BYTES (h11 itself counts only what is still incomplete, so a long
        header block that arrives in one read would pass)."""
        pending = self.conn.trailing_data[0]
        tail = pending[-3:]
        end = (tail + data).find(b"\r\n\r\n")
        size = len(pending) + (len(data) if end < 0 else end + 4 - len(tail))
        return size > MAX_HEADER_BYTES

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()

    def connection_lost(self, exc) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        """A timer runs while the connection waits for a request's headers, from the moment
        it started waiting; bytes arriving do not restart it."""
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_late)
        else:
            self._stop_header_timer()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why it is dropped
            message = f"the request headers did not arrive within {HEADER_TIMEOUT_S:g} s"
            self.transport.write(_raw_json(408, "Request Timeout", message))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP/1.1, in JSON like every other error."""
        message = (
            "not a valid HTTP/1.1 request, or its request line and headers are over "
            f"{MAX_HEADER_BYTES // 1024} KB"
        )
        self.transport.write(_raw_json(400, "Bad Request", message))
        self.transport.close()


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    def enqueue(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(record)


def _log_without_waiting() -> logging.handlers.QueueListener:
    """Route the server's log (uvicorn's, the app's, warnings) through a bounded queue to a
    thread that writes stderr: if nobody reads stderr, records are dropped, and no request
    ever waits for a write."""
    records: queue.Queue = queue.Queue(LOG_QUEUE)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    listener = logging.handlers.QueueListener(records, to_stderr)
    root = logging.getLogger()
    root.handlers = [_DroppingQueueHandler(records)]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    listener.start()
    return listener


def _return_large_blocks_at_once() -> None:
    """Have glibc map every block of a megabyte or more on its own, and unmap it when freed.

    A decoded photo is tens of megabytes in 16 MB blocks; by default glibc soon serves
    blocks that size from its heaps, which keep them after they are freed, so the server's
    memory grew with each mix of concurrent decodes. Measured: 24 concurrent 40-megapixel
    uploads peaked at 1.4 GB before, 0.9 GB after. No effect where malloc is not glibc's.
    """
    m_mmap_threshold = -3
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(m_mmap_threshold, 1 << 20)


def uvicorn_config(app) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=GuardedH11Protocol,
        log_config=None,  # _log_without_waiting does it
        log_level="warning",
        access_log=False,
        backlog=BACKLOG,
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_graceful_shutdown=5,
    )


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
    _return_large_blocks_at_once()
    sock = bind_socket(host, port)
    _raise_open_file_limit()
    info = app.state.predictor.info
    accuracy = info.get("test_accuracy")
    about = f"{info.get('dataset')}, recipe {info.get('recipe')}"
    if accuracy is not None:
        about += f", test accuracy {accuracy:.4f}"
    announce(f"serving {run_dir} ({about}) at {url_of(sock)}  (Ctrl-C to stop)")
    listener = _log_without_waiting()
    server = uvicorn.Server(uvicorn_config(app))
    try:
        with sock:
            server.run(sockets=[sock])
    finally:
        listener.stop()
    if server.should_exit:
        # Stopped by Ctrl-C. uvicorn raises the signal again once it has shut down, but
        # asyncio's runner turns that into a cancellation of a task that may already have
        # finished, and then returns normally (exit 0, seen once in a full test run under
        # load): a stop by signal is an interruption either way.
        raise KeyboardInterrupt
