"""Load test of `mnist-cnn serve`: N requests from C concurrent clients on 127.0.0.1.

    python benchmarks/serve_load.py --run-dir runs/mnist-seed --requests 2000 --concurrency 32

It draws photo-like digits (pen strokes on tinted, noisy paper, PNG and JPEG), asks
`mnist-cnn predict --json` for their answers, starts `mnist-cnn serve` on a free port (or
uses --url), then posts the pictures as multipart uploads from C threads, each on its own
keep-alive connection, until N requests are answered or --timeout-s passes. It reports
throughput, latency percentiles, errors, and answers that differ from `predict`'s; the
exit status is 1 if any request failed, differed, or did not finish in time.

    python benchmarks/serve_load.py --run-dir runs/mnist-seed --requests 2000 --hostile 0.1

With --hostile F, the same N good requests are sent twice to one server: once alone (the
clean run), then mixed with hostile ones making up the fraction F of all requests, in turn
stalled (headers and half a body, then silence), dropped (headers and one byte, then
hang up), oversized (a 3 MB body) and garbage (random bytes as an image, JSON nested a
million deep, bytes that are not HTTP). It reports for both runs the good requests'
answers, errors, differences from `predict --json` and latencies, what each hostile kind
got back, and the server's peak memory (VmHWM; its own server only). --big-photos N then
posts N concurrent 40-megapixel photos and reports their answers and the peak memory.
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
from concurrent.futures import ThreadPoolExecutor
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


HOSTILE_KINDS = ("stalled", "dropped", "oversized", "garbage")
GARBAGE = (
    ("image/png", os.urandom(5000)),  # not an image: 415
    ("application/json", b"[" * 1_000_000),  # nested deeper than any parser recurses: 400
    (None, os.urandom(3000).replace(b"\r\n", b"..") + b"\r\n\r\n"),  # not HTTP: 400
)


class Hostile:
    """What the hostile requests got back, and the stalled connections, open until the
    server gives up on them."""

    def __init__(self):
        self.outcomes: Counter = Counter()
        self.stalled: list[socket.socket] = []
        self.lock = threading.Lock()

    def note(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.outcomes[f"{kind}: {outcome}"] += 1

    def collect_stalled(self, timeout: float) -> None:
        """Wait for each stalled upload's answer from the server (its body deadline)."""
        deadline = time.monotonic() + timeout
        for sock in self.stalled:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            self.note("stalled", status_of(read_until_closed(sock)))
            sock.close()
        self.stalled.clear()


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except OSError:
        pass
    return received


def status_of(answer: bytes) -> str:
    parts = answer.split(b" ", 2)
    return f"HTTP {int(parts[1])}" if len(parts) > 1 and parts[1].isdigit() else "no answer"


def hostile_request(url: str, kind: str, index: int, good: bytes, hostile: Hostile) -> None:
    """One hostile request, on a connection of its own."""
    parts = urlsplit(url)

    def head(content_type: str, length: int) -> bytes:
        lines = ["POST /api/predict HTTP/1.1", f"Host: {parts.netloc}",
                 f"Content-Type: {content_type}", f"Content-Length: {length}",
                 "Connection: close", "", ""]  # fmt: skip
        return "\r\n".join(lines).encode()

    try:
        sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    except OSError as exc:
        hostile.note(kind, type(exc).__name__)
        return
    if kind == "stalled":
        sock.sendall(head("image/png", len(good)) + good[: len(good) // 2])
        with hostile.lock:
            hostile.stalled.append(sock)
        return
    try:
        if kind == "dropped":
            sock.sendall(head("image/png", 100_000) + good[:1])
            hostile.note(kind, "sent")
        elif kind == "oversized":
            body = os.urandom(3 * 2**20)
            sock.sendall(head("image/png", len(body)) + body)
            hostile.note(kind, status_of(read_until_closed(sock)))
        else:
            content_type, body = GARBAGE[index % len(GARBAGE)]
            sock.sendall(body if content_type is None else head(content_type, len(body)) + body)
            hostile.note(kind, status_of(read_until_closed(sock)))
    except OSError as exc:
        hostile.note(kind, type(exc).__name__)
    finally:
        sock.close()


def client(url, jobs, bodies, expected, deadline, timeout, tally: Tally, hostile=None) -> None:
    """One client: its own keep-alive connection, taking the next job until none are left.
    A hostile job (`hostile` maps its index to a kind) goes on a connection of its own."""
    parts = urlsplit(url)
    connection = None
    for index in jobs:
        if hostile is not None and index in hostile.kinds:
            good = bodies[index % len(bodies)][1]
            hostile_request(url, hostile.kinds[index], index, good, hostile.tally)
            continue
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


class HostileMix:
    """Which job indexes are hostile, and of which kind; what they got back."""

    def __init__(self, good: int, fraction: float):
        count = round(good * fraction / (1 - fraction)) if fraction > 0 else 0
        total = good + count
        # Spread evenly over the run, the kinds in turn.
        spots = sorted({int((i + 0.5) * total / count) for i in range(count)}) if count else []
        self.kinds = {spot: HOSTILE_KINDS[i % len(HOSTILE_KINDS)] for i, spot in enumerate(spots)}
        self.total = good + len(self.kinds)
        self.tally = Hostile()


def run_load(url, bodies, expected, requests, concurrency, timeout_s, hostile=None) -> dict:
    """`requests` good requests (and, with `hostile`, its hostile ones among them)."""
    counter = itertools.count()
    lock = threading.Lock()
    total = hostile.total if hostile is not None else requests

    def jobs():
        while True:
            with lock:
                index = next(counter)
            if index >= total:
                return
            yield index

    tally = Tally()
    deadline = time.monotonic() + timeout_s
    threads = [
        threading.Thread(
            target=client,
            args=(url, jobs(), bodies, expected, deadline, timeout_s, tally, hostile),
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


def peak_memory_mb(process: subprocess.Popen | None) -> float | None:
    """The server's peak resident memory since the last reset (VmHWM), in MB."""
    if process is None:
        return None
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def reset_peak_memory(process: subprocess.Popen | None) -> None:
    if process is not None:
        Path(f"/proc/{process.pid}/clear_refs").write_text("5")


def big_photo() -> bytes:
    """A 40-megapixel JPEG of a stroke on paper (about 0.7 MB): the pixel limit exactly."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (7300, 5470), (235, 230, 220))
    ImageDraw.Draw(image).line([(3000, 1000), (3600, 4500)], fill=(20, 20, 20), width=300)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def run_big_photos(url: str, count: int, timeout_s: float) -> dict:
    """`count` concurrent uploads of one 40-megapixel photo: statuses and seconds."""
    body, content_type = multipart("photo.jpg", big_photo())
    parts = urlsplit(url)

    def ask(_) -> tuple[str, float]:
        start = time.perf_counter()
        try:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
            connection.request("POST", "/api/predict", body, {"Content-Type": content_type})
            status = f"HTTP {connection.getresponse().status}"
            connection.close()
        except (OSError, http.client.HTTPException) as exc:
            status = type(exc).__name__
        return status, time.perf_counter() - start

    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(ask, range(count)))
    return {
        "photos": count,
        "answers": dict(Counter(status for status, _ in answers)),
        "max_s": round(max(seconds for _, seconds in answers), 1),
    }


def run_hostile(args, url, bodies, expected, process) -> tuple[dict, bool]:
    """The clean run, the hostile mix, and the big photos, on one server."""
    clean = run_load(url, bodies, expected, args.requests, args.concurrency, args.timeout_s)
    clean["peak_mb"] = peak_memory_mb(process)
    reset_peak_memory(process)
    mix = HostileMix(args.requests, args.hostile)
    mixed = run_load(url, bodies, expected, args.requests, args.concurrency, args.timeout_s, mix)
    mix.tally.collect_stalled(timeout=40)
    mixed["hostile"] = dict(sorted(mix.tally.outcomes.items()))
    mixed["hostile_requests"] = len(mix.kinds)
    mixed["peak_mb"] = peak_memory_mb(process)
    result = {"clean": clean, "hostile": mixed, "fraction": args.hostile}
    if args.big_photos:
        reset_peak_memory(process)
        big = run_big_photos(url, args.big_photos, args.timeout_s)
        big["peak_mb"] = peak_memory_mb(process)
        result["big_photos"] = big
    failed = any(
        run["errors"] or run["mismatches"] or run["ok"] < args.requests for run in (clean, mixed)
    )
    return result, bool(failed)


def print_hostile(result: dict) -> None:
    clean, mixed = result["clean"], result["hostile"]
    print("| run | good requests answered | errors | differing from predict --json | "
          "requests/s | p50 ms | p99 ms | max ms | server peak MB |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, run in (("clean", clean), (f"{result['fraction']:.0%} hostile", mixed)):
        print(f"| {label} | {run['ok']}/{run['requests']} | {run['errors']} | "
              f"{run['mismatches']} | {run['throughput_rps']} | {run['p50_ms']} | "
              f"{run['p99_ms']} | {run['max_ms']} | {run['peak_mb']} |")  # fmt: skip
    ratio = mixed["p99_ms"] / clean["p99_ms"] if clean["p99_ms"] else float("nan")
    print(f"good requests' p99 with hostile ones / without: {ratio:.2f}")
    print(f"hostile requests ({mixed['hostile_requests']}): "
          + ", ".join(f"{k} x{n}" for k, n in mixed["hostile"].items()))  # fmt: skip
    if "big_photos" in result:
        big = result["big_photos"]
        print(f"{big['photos']} concurrent 40-megapixel photos: "
              + ", ".join(f"{k} x{n}" for k, n in big["answers"].items())
              + f"; slowest {big['max_s']} s; server peak {big['peak_mb']} MB")  # fmt: skip


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
    parser.add_argument("--hostile", type=float, default=0.0, metavar="F",
                        help="also send them mixed with this fraction of hostile ones")  # fmt: skip
    parser.add_argument("--big-photos", type=int, default=0, metavar="N",
                        help="with --hostile: then N concurrent 40-megapixel photos")  # fmt: skip
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.images < 1:
        parser.error("--requests, --concurrency and --images must be at least 1")
    if not 0 <= args.hostile < 1 or args.big_photos < 0:
        parser.error("--hostile must lie in [0, 1) and --big-photos be at least 0")

    with tempfile.TemporaryDirectory() as tmp:
        pictures = photo_like_digits(args.images, args.seed)
        for name, data in pictures:
            (Path(tmp) / name).write_bytes(data)
        expected = expected_records(args.run_dir, Path(tmp), [name for name, _ in pictures])
    bodies = [(name, *multipart(name, data)) for name, data in pictures]

    process, url = (None, args.url) if args.url else start_server(args.run_dir)
    try:
        if args.hostile:
            result, failed = run_hostile(args, url, bodies, expected, process)
        else:
            result = run_load(
                url, bodies, expected, args.requests, args.concurrency, args.timeout_s
            )
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    result["cpus"] = len(os.sched_getaffinity(0))
    if args.hostile:
        if args.json:
            print(json.dumps(result))
        else:
            print_hostile(result)
        return 1 if failed else 0
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
