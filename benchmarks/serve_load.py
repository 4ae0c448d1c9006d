"""Load test of `mnist-cnn serve`: N requests from C concurrent clients on 127.0.0.1.

    python benchmarks/serve_load.py --run-dir runs/mnist-seed --requests 2000 --concurrency 32

It draws photo-like digits (pen strokes on tinted, noisy paper, PNG and JPEG), asks
`mnist-cnn predict --json` for their answers, starts `mnist-cnn serve` on a free port (or
uses --url), then posts the pictures as multipart uploads from C threads, each on its own
keep-alive connection, until N requests are answered or --timeout-s passes. It reports
throughput, latency percentiles, errors, and answers that differ from `predict`'s; the
exit status is 1 if any request failed, differed, or did not finish in time.
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from digit_strokes import photo_like  # noqa: E402  (a helper of the tests, not a package)


def photo_like_digits(n: int, seed: int) -> list[tuple[str, bytes]]:
    """Handwriting-like digits as phone photos might show them, as (file name, bytes)."""
    rng = np.random.default_rng(seed)
    pictures = []
    for i in range(n):
        digit = i % 10
        picture = photo_like(digit, rng)
        fmt = "JPEG" if i % 2 else "PNG"
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt)
        pictures.append((f"photo-{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}", buffer.getvalue()))
    return pictures


def expected_records(run_dir: Path, folder: Path, names: list[str]) -> dict[str, dict]:
    """What `mnist-cnn predict --json` prints for each file, by file name."""
    done = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "predict", str(run_dir.resolve()), *names, "--json"],
        cwd=folder, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"predict failed: {done.stderr.strip()}")
    return {r["input"]: r for r in map(json.loads, done.stdout.splitlines())}


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def start_server(run_dir: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn", "serve", str(run_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = process.stdout.readline()
    if " at http://" not in line:
        process.kill()
        sys.exit(f"serve did not start: {line}{process.stderr.read()}")
    return process, line.split(" at ")[1].split()[0]


class Tally:
    """What the clients saw, added up under a lock."""

    def __init__(self):
        self.latencies: list[float] = []
        self.errors: Counter = Counter()
        self.mismatches = 0
        self.lock = threading.Lock()


def client(url, jobs, bodies, expected, deadline, timeout, tally: Tally) -> None:
    """One client: its own keep-alive connection, taking the next job until none are left."""
    parts = urlsplit(url)
    connection = None
    for index in jobs:
        if time.monotonic() > deadline:
            with tally.lock:
                tally.errors["not sent before --timeout-s"] += 1
            continue
        name, body, content_type = bodies[index % len(bodies)]
        start = time.perf_counter()
        try:
            if connection is None:
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
                connection.connect()
                # http.client sends headers and body in two writes: without this, Nagle's
                # algorithm holds the body back until the server's delayed ACK (~40 ms).
                connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.request("POST", "/api/predict", body, {"Content-Type": content_type})
            response = connection.getresponse()
            payload = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            if connection is not None:
                connection.close()
            connection = None
            with tally.lock:
                tally.errors[type(exc).__name__] += 1
            continue
        elapsed = time.perf_counter() - start
        with tally.lock:
            if status != 200:
                tally.errors[f"HTTP {status}"] += 1
                continue
            tally.latencies.append(elapsed)
            record = json.loads(payload)
            record.pop("seen", None)
            if record != expected[name]:
                tally.mismatches += 1
    if connection is not None:
        connection.close()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_load(url, bodies, expected, requests, concurrency, timeout_s) -> dict:
    counter = itertools.count()
    lock = threading.Lock()

    def jobs():
        while True:
            with lock:
                index = next(counter)
            if index >= requests:
                return
            yield index

    tally = Tally()
    deadline = time.monotonic() + timeout_s
    threads = [
        threading.Thread(
            target=client, args=(url, jobs(), bodies, expected, deadline, timeout_s, tally)
        )
        for _ in range(concurrency)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    ms = [t * 1000 for t in tally.latencies]
    return {
        "requests": requests,
        "concurrency": concurrency,
        "ok": len(ms),
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "mismatches": tally.mismatches,
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(ms) / seconds, 1),
        "p50_ms": round(percentile(ms, 50), 1),
        "p90_ms": round(percentile(ms, 90), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms, default=float("nan")), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a trained run directory")
    parser.add_argument("--url", help="an app already serving RUN_DIR (default: start one)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--timeout-s", type=float, default=60, help="for the whole run")
    parser.add_argument("--images", type=int, default=50, help="distinct pictures to send")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.images < 1:
        parser.error("--requests, --concurrency and --images must be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        pictures = photo_like_digits(args.images, args.seed)
        for name, data in pictures:
            (Path(tmp) / name).write_bytes(data)
        expected = expected_records(args.run_dir, Path(tmp), [name for name, _ in pictures])
    bodies = [(name, *multipart(name, data)) for name, data in pictures]

    process, url = (None, args.url) if args.url else start_server(args.run_dir)
    try:
        result = run_load(url, bodies, expected, args.requests, args.concurrency, args.timeout_s)
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    result["cpus"] = len(os.sched_getaffinity(0))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['ok']}/{args.requests} answered in {result['seconds']} s by "
              f"{args.concurrency} clients: {result['throughput_rps']} requests/s")  # fmt: skip
        print(f"latency p50 {result['p50_ms']} ms, p90 {result['p90_ms']} ms, "
              f"p99 {result['p99_ms']} ms, max {result['max_ms']} ms")  # fmt: skip
        print(f"errors {result['errors']} {result['error_kinds'] or ''}".rstrip()
              + f", answers differing from predict --json: {result['mismatches']}")  # fmt: skip
    failed = result["errors"] or result["mismatches"] or result["ok"] < args.requests
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
