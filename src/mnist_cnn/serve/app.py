"""The web app: a drawing page and a JSON API over one trained run.

Routes: `GET /` (the page; its script and style under `/static/`), `POST /api/predict`,
`GET /api/model`, `GET /healthz`. Every error is JSON, `{"error": "..."}`, and nothing
a client sends takes the server down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from pathlib import Path

import python_multipart  # noqa: F401  (forms need it: fail at start, not at the first upload)
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from mnist_cnn.serve.browser import add_browser_routes
from mnist_cnn.serve.limits import BodyLimit
from mnist_cnn.serve.predictor import ImageRejected, Predictor

MAX_BODY_BYTES = 2 * 1024 * 1024
# Predictions whose bodies are read and processed at once; more requests wait their turn, so
# a burst of thousands of uploads holds at most this many bodies in memory.
MAX_IN_FLIGHT = 64
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


class Slots:
    """A semaphore of `n` slots for whichever event loop runs the app (one per loop)."""

    def __init__(self, n: int):
        self.n = n
        self._loop = None
        self._semaphore = None

    def __call__(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._semaphore = loop, asyncio.Semaphore(self.n)
        return self._semaphore


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(run_dir: str | Path) -> FastAPI:
    """The app for one run directory; its model is loaded here, once (UserError if bad)."""
    predictor = Predictor(run_dir)
    app = FastAPI(title="mnist-cnn", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.predictor = predictor
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
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

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error ({type(exc).__name__})")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/api/model")
    async def model_summary() -> dict:
        return predictor.info

    slots = Slots(MAX_IN_FLIGHT)

    @app.post("/api/predict")
    async def predict(request: Request, top_k: int = Query(3, ge=1)) -> JSONResponse:
        async with slots():
            data, name = await image_from(request)
            try:
                record = await run_in_threadpool(predictor.answer, data, name, top_k)
            except ImageRejected as exc:
                raise ApiError(exc.status, str(exc)) from None
        return JSONResponse(record)

    return app


async def image_from(request: Request) -> tuple[bytes, str]:
    """The uploaded image's bytes and name, from a multipart form, JSON or a raw body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        data, name = await _from_form(request)
    elif kind == "application/json":
        data, name = _from_json(await request.body())
    elif kind.startswith("image/") or kind == "application/octet-stream":
        data, name = await request.body(), "upload"
    else:
        raise ApiError(415, f"unsupported content type '{kind or 'none'}': {HOW_TO_SEND}")
    if not data:
        raise ApiError(400, f"the image is empty: {HOW_TO_SEND}")
    return data, name


async def _from_form(request: Request) -> tuple[bytes, str]:
    async with request.form(max_files=1, max_fields=8) as form:
        upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
        if upload is None:
            raise ApiError(400, f"the form holds no file: {HOW_TO_SEND}")
        return await upload.read(), upload.filename or "upload"


def _from_json(body: bytes) -> tuple[bytes, str]:
    try:
        payload = json.loads(body)
    except ValueError:
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
