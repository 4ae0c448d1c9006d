"""The web app: a drawing page and a JSON API over one trained run.

Routes: `GET /` (the page; its script and style under `/static/`), `POST /api/predict`,
`GET /api/model`, `GET /healthz`. Every error is JSON, `{"error": "..."}`, and nothing
a client sends takes the server down.

What a prediction may cost is bounded at each step (the README's "Limits you can rely
on"): the body is read whole first, within a size limit and a deadline, holding nothing but
its bytes (`limits.RequestGuard`); then the image's header says what decoding it will hold
at peak, and the decode waits for that much of a fixed memory budget (`DECODE_MEMORY`)
before it takes a thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import os
from pathlib import Path

import anyio.to_thread
import python_multipart  # noqa: F401  (forms need it: fail at start, not at the first upload)
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from mnist_cnn.predict import NonFiniteOutput
from mnist_cnn.serve.browser import add_browser_routes
from mnist_cnn.serve.limits import MemoryBudget, RequestGuard, ServerBusy
from mnist_cnn.serve.predictor import ImageRejected, Predictor, decode_cost

MAX_BODY_BYTES = 2 * 1024 * 1024
# Upload bytes all requests together may hold, each byte counted twice (as received, and the
# image taken out of it): 64 full-size uploads. Past it: 503 with Retry-After.
BODY_MEMORY = 256 * 2**20
BODY_TIMEOUT_S = 30  # for a whole body, once the headers are in
BODY_IDLE_S = 10  # the longest pause within a body
# Bytes the images being decoded may hold at once, as `images.decode_cost` counts them (a
# 40-megapixel JPEG: about 240 MB). An image waits up to DECODE_WAIT_S for its share, then
# gets 503 with Retry-After.
DECODE_MEMORY = 2**30
DECODE_WAIT_S = 10
# Threads that decode and predict at once: the work is CPU-bound, more would only share cores.
DECODE_THREADS = min(32, 2 * len(os.sched_getaffinity(0)))
MAX_NAME_CHARS = 200  # a file name longer than this is cut short in answers
STATIC = Path(__file__).parent / "static"
# The page loads nothing from anywhere but this server; images also come as data: URLs.
# WebAssembly may be compiled: the page can answer in the browser (serve/browser.py).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "script-src 'self' 'wasm-unsafe-eval'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}
HOW_TO_SEND = (
    "send the image as a multipart file (-F file=@digit.png), as JSON "
    '{"image": "<base64 PNG>"}, or as a raw image/* body'
)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class PerLoop:
    """The decode budget and thread limiter of whichever event loop runs the app: asyncio
    and anyio objects belong to one loop."""

    def __init__(self):
        self._loop = None

    def __call__(self) -> PerLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self.budget = MemoryBudget(DECODE_MEMORY)
            self.threads = anyio.CapacityLimiter(DECODE_THREADS)
        return self


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(run_dir: str | Path) -> FastAPI:
    """The app for one run directory; its model is loaded here, once (UserError if bad)."""
    predictor = Predictor(run_dir)
    app = FastAPI(title="mnist-cnn", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.predictor = predictor
    app.add_middleware(
        RequestGuard,
        max_bytes=MAX_BODY_BYTES,
        body_memory=BODY_MEMORY,
        body_timeout_s=BODY_TIMEOUT_S,
        idle_timeout_s=BODY_IDLE_S,
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_browser_routes(app, predictor)  # model.json, and the model for the browser

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:])
        return error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/api/model")
    async def model_summary() -> dict:
        return predictor.info

    per_loop = PerLoop()

    @app.post("/api/predict")
    async def predict(request: Request, top_k: int = Query(3, ge=1)) -> JSONResponse:
        data, name = await image_from(request)  # all of it, before anything else is held
        limits = per_loop()
        try:
            cost = await run_in_threadpool(decode_cost, data, name)
            held = await hold_decode_memory(request, limits.budget, cost)
            try:
                record = await anyio.to_thread.run_sync(
                    predictor.answer, data, name, top_k, limiter=limits.threads
                )
            finally:
                limits.budget.release(held)
        except ImageRejected as exc:
            raise ApiError(exc.status, str(exc)) from None
        except NonFiniteOutput:  # predict_records refuses to make a record of NaN
            record = None
        if record is None or not all(math.isfinite(t["probability"]) for t in record["top_k"]):
            raise ApiError(
                500,
                "the model answers NaN (not a number): the run's weights "
                f"({predictor.run_dir / 'model.safetensors'}) hold NaN or infinite values; "
                "train the run again, or serve another run",
            )
        return JSONResponse(record)

    return app


async def hold_decode_memory(request: Request, budget: MemoryBudget, cost: int) -> int:
    """Wait for `cost` bytes of the decode budget (ServerBusy after DECODE_WAIT_S); a client
    that goes away meanwhile leaves the queue at once (ClientDisconnect)."""
    wanted = asyncio.ensure_future(budget.acquire(cost, DECODE_WAIT_S))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({wanted, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not wanted.done():
        wanted.cancel()
        await asyncio.gather(wanted, return_exceptions=True)
        raise ClientDisconnect
    try:
        return wanted.result()
    except asyncio.TimeoutError:
        raise ServerBusy(
            "the server is decoding as many images as its memory allows: try again shortly",
            retry_after=2,
        ) from None


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body has been read: nothing else can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def image_from(request: Request) -> tuple[bytes, str]:
    """The uploaded image's bytes and name, from a multipart form, JSON or a raw body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        await request.body()  # the whole body first; the form is then parsed from memory
        data, name = await _from_form(request)
    elif kind == "application/json":
        data, name = _from_json(await request.body())
    elif kind.startswith("image/") or kind == "application/octet-stream":
        data, name = await request.body(), "upload"
    else:
        raise ApiError(415, f"unsupported content type '{kind[:80] or 'none'}': {HOW_TO_SEND}")
    if not data:
        raise ApiError(400, f"the image is empty: {HOW_TO_SEND}")
    return data, name[:MAX_NAME_CHARS]


async def _from_form(request: Request) -> tuple[bytes, str]:
    async with request.form(max_files=1, max_fields=8) as form:
        upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
        if upload is None:
            raise ApiError(400, f"the form holds no file: {HOW_TO_SEND}")
        return await upload.read(), upload.filename or "upload"


def _from_json(body: bytes) -> tuple[bytes, str]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python recurses
        raise ApiError(400, f"the body is not valid JSON: {HOW_TO_SEND}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
        raise ApiError(400, 'the JSON body needs "image": a base64 PNG (or a data: URL)')
    text = payload["image"]
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, '"image" is not valid base64') from None
    name = payload.get("name")
    return data, name if isinstance(name, str) and name else "upload"
