"""The web app: draw a digit or drop a photo, see what the model sees and answers.

`create_app(run_dir)` is the ASGI app (FastAPI); `serve(run_dir, host, port)` runs it on
uvicorn. Both need the `serve` extra: `pip install 'mnist-cnn[serve]'`.
"""

from mnist_cnn.serve.app import MAX_BODY_BYTES, create_app
from mnist_cnn.serve.server import serve

__all__ = ["MAX_BODY_BYTES", "create_app", "serve"]
