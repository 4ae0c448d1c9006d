"""`serve`'s side of the one page: model.json, and what answering in the browser needs.

The page (static/index.html) asks `model.json` what it may do. Served, it may answer from
the server (`api/predict`) and, where the cache holds onnxruntime-web and the `export`
extra is installed, in the browser too: then `model.onnx` (the run exported with its stage
outputs, made on the first request and checked against PyTorch like any export) and the
runtime's two files under `ort/` are served as well. A folder written by
`export --format web` has the same paths, so the page cannot tell the two apart.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import tempfile
import threading
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from torch import nn

from mnist_cnn import web
from mnist_cnn.errors import UserError

API = "api/predict"
EXPORT_MODULES = ("onnx", "onnxscript", "onnxruntime")
MEDIA_TYPES = {".js": "text/javascript", ".wasm": "application/wasm"}


def browser_unavailable() -> str | None:
    """Why the page cannot answer in the browser here, or None if it can."""
    missing = [m for m in EXPORT_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"answering in the browser needs the model as ONNX ({', '.join(missing)} not "
            "installed): pip install 'mnist-cnn[export]'"
        )
    if web.cached_runtime() is None:
        return f"{web.ORT.label} is not in the cache: {web.how_to_provide()}"
    return None


class BrowserModel:
    """The run as ONNX with its stage outputs, exported once, on first use, to a temp folder."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._error: str | None = None

    def path(self) -> Path:
        with self._lock:
            if self._path is None and self._error is None:
                from mnist_cnn.export import export_onnx

                folder = Path(tempfile.mkdtemp(prefix="mnist-cnn-serve-"))
                atexit.register(shutil.rmtree, folder, ignore_errors=True)
                try:
                    self._path, _ = export_onnx(self.run_dir, folder / web.MODEL, stages=True)
                except UserError as exc:
                    self._error = str(exc)
            if self._error is not None:
                raise UserError(self._error)
            return self._path


def add_browser_routes(app: FastAPI, predictor) -> None:
    """GET /model.json, /model.onnx and /ort/NAME for the page of `predictor`'s run."""
    note = browser_unavailable()
    runtime_folder = None if note else web.cached_runtime()
    stages = sum(isinstance(m, nn.MaxPool2d) for m in predictor.model.modules())
    info = {k: v for k, v in predictor.info.items() if k != "style"}
    config = web.page_config(
        info, predictor.style, api=API, stages=None if note else stages, runtime_note=note
    )
    model = BrowserModel(predictor.run_dir)
    runtime_files = {exported for exported, _ in web.ORT.files.values()}

    @app.get(f"/{web.CONFIG}", include_in_schema=False)
    async def page_config() -> JSONResponse:
        return JSONResponse(config, headers={"Cache-Control": "no-cache"})

    @app.get(f"/{web.MODEL}", include_in_schema=False, response_model=None)
    async def onnx_model() -> FileResponse | JSONResponse:
        if note:
            return JSONResponse({"error": note}, status_code=404)
        try:
            path = await run_in_threadpool(model.path)
        except UserError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        return FileResponse(path, media_type="application/octet-stream")

    @app.get(f"/{web.RUNTIME_FOLDER}/{{name}}", include_in_schema=False, response_model=None)
    async def runtime(name: str) -> FileResponse | JSONResponse:
        if runtime_folder is None or name not in runtime_files:
            return JSONResponse({"error": f"no such file: {name}"}, status_code=404)
        return FileResponse(runtime_folder / name, media_type=MEDIA_TYPES[Path(name).suffix])
