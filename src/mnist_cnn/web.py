"""The page as a static site that answers in the browser: `export --format web`, and the
browser runtime it needs.

The runtime is onnxruntime-web (its WebAssembly backend) at a pinned version, obtained as
the data sets are: the npm package's tarball, checked against the integrity hash the npm
registry publishes for it (sha512), kept in the cache (`cache_root()/web`), never fetched
by the page. Only the two files the page needs are taken out of it, each checked against
its own sha256, and copied into the exported folder.

The exported folder has the layout `serve` gives its URLs, so one page works in both:

    index.html           the page (the same file `serve` sends)
    static/              its script, the image preparation in JavaScript, its style
    model.json           the run (data set, recipe, accuracy), its classes, the preparation
                         contract and where the model and the runtime are
    model.onnx           the run's network: probabilities and each convolution stage's maps
    ort/                 onnxruntime-web's ES module and its WebAssembly binary

`python -m mnist_cnn.web fetch` provisions the runtime into the cache (`make setup` does).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

from mnist_cnn.cache import cache_root
from mnist_cnn.errors import UserError
from mnist_cnn.io import TEMP_SUFFIX, write_atomic

STATIC = Path(__file__).parent / "serve" / "static"
PAGE = "index.html"
PAGE_FILES = ("app.js", "prepare.js", "style.css")  # under static/
CONFIG = "model.json"
MODEL = "model.onnx"
RUNTIME_FOLDER = "ort"
FORMAT = "mnist-cnn web page 1"

REGISTRY = "https://registry.npmjs.org"
# Downloads are bounded (`mnist_cnn.data.fetch.download`): the pinned tarball is 33 MB;
# a stalled server is given up after 30 s without a byte, the whole after DOWNLOAD_DEADLINE_S.
MAX_TARBALL_BYTES = 64 * 1024 * 1024
MAX_MEMBER_BYTES = 32 * 1024 * 1024
MAX_MEMBERS = 10_000
DOWNLOAD_DEADLINE_S = 600


@dataclasses.dataclass(frozen=True)
class RuntimeSpec:
    """An npm package pinned by version and integrity, and the files the page takes from it.

    `files` maps each file's name in the package's `dist/` to (its name in the exported
    folder, its sha256). The ES module is renamed `.js`: every static server sends that
    as JavaScript, which a module script must be, while `.mjs` is unknown to some.
    """

    package: str
    version: str
    integrity: str
    files: dict[str, tuple[str, str]]
    module: str  # the exported name of the file the page imports

    @property
    def label(self) -> str:
        return f"{self.package} {self.version}"

    @property
    def tarball_name(self) -> str:
        return f"{self.package}-{self.version}.tgz"

    def tarball_url(self, registry: str) -> str:
        return f"{registry.rstrip('/')}/{self.package}/-/{self.tarball_name}"


ORT = RuntimeSpec(
    package="onnxruntime-web",
    version="1.30.0",
    integrity="sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ==",
    files={
        # The WebAssembly backend alone, with Emscripten's loader bundled in (one module).
        "ort.wasm.bundle.min.mjs": (
            "ort.wasm.bundle.min.js",
            "11e64bd8ffe11bd1a2a2f0d6275fdfbbba7262f0b76b99b53d228a8a22ef3d90",
        ),
        # The one binary it loads: SIMD, single-threaded unless the page is cross-origin
        # isolated (a static page is not, and the page asks for one thread).
        "ort-wasm-simd-threaded.wasm": (
            "ort-wasm-simd-threaded.wasm",
            "3398c10d07d229bd91b364548e130e0e51a8e5704b88c7c083ebbeb78842dee2",
        ),
    },
    module="ort.wasm.bundle.min.js",
)


# --- the runtime in the cache ----------------------------------------------------------------


def web_cache() -> Path:
    return cache_root() / "web"


def runtime_dir(spec: RuntimeSpec = ORT) -> Path:
    """Where the runtime's extracted files live: `cache_root()/web/PACKAGE-VERSION/`."""
    return web_cache() / f"{spec.package}-{spec.version}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified_file(path: Path, sha256: str) -> bool:
    try:
        return sha256_hex(path.read_bytes()) == sha256
    except OSError:
        return False


def cached_runtime(spec: RuntimeSpec = ORT) -> Path | None:
    """The folder holding the runtime's files, if every one is there and verified."""
    folder = runtime_dir(spec)
    ok = all(_verified_file(folder / name, sha) for name, sha in spec.files.values())
    return folder if ok else None


def check_integrity(data: bytes, integrity: str, name: str) -> None:
    """npm's Subresource-Integrity string (`sha512-<base64>`), checked before anything is
    read out of the tarball."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm not in ("sha512", "sha384", "sha256"):
        raise UserError(f"{name}: unsupported integrity algorithm '{algorithm}'")
    digest = base64.b64encode(hashlib.new(algorithm, data).digest()).decode("ascii")
    if digest != expected:
        raise UserError(
            f"{name} fails its integrity check ({algorithm} {digest[:16]}..., expected "
            f"{expected[:16]}...): the file is not the published package; delete it"
        )


def extract_runtime(
    data: bytes, spec: RuntimeSpec = ORT, name: str = "tarball"
) -> dict[str, bytes]:
    """The page's files out of a verified package tarball, by exact name.

    Nothing is extracted to disk by the tarball's own paths: each wanted member is read
    into memory (regular files only, size-bounded) and checked against its sha256, so a
    crafted archive can neither write outside the cache nor smuggle in other content.
    """
    wanted = {f"package/dist/{member}": member for member in spec.files}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for count, member in enumerate(tar):
                if count >= MAX_MEMBERS:
                    raise UserError(f"{name}: more than {MAX_MEMBERS} entries; not an npm package")
                key = wanted.get(member.name.removeprefix("./"))
                if key is None or key in found:
                    continue
                if not member.isreg() or member.size > MAX_MEMBER_BYTES:
                    raise UserError(f"{name}: {member.name} is not a regular file of sane size")
                handle = tar.extractfile(member)
                found[key] = handle.read(MAX_MEMBER_BYTES + 1) if handle else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{name}: not a readable package tarball ({exc})") from None
    missing = sorted(set(spec.files) - set(found))
    if missing:
        raise UserError(f"{name} lacks {', '.join(missing)}: not {spec.label}")
    for member, content in found.items():
        if sha256_hex(content) != spec.files[member][1]:
            raise UserError(f"{name}: {member} fails its sha256 check: not {spec.label}")
    return found


def download(url: str, max_bytes: int = MAX_TARBALL_BYTES) -> bytes:
    """GET `url`, bounded in size and time (the data sets' download); one-line UserError."""
    from mnist_cnn.data.fetch import download as bounded_download

    return bytes(bounded_download(url, max_bytes, DOWNLOAD_DEADLINE_S, retry="try again"))


def registry_url() -> str | None:
    """The npm registry to download from: `$MNIST_CNN_NPM_REGISTRY` (`none`: no download)."""
    value = os.environ.get("MNIST_CNN_NPM_REGISTRY", REGISTRY).strip()
    return None if value.lower() in ("", "none") else value


def how_to_provide(spec: RuntimeSpec = ORT) -> str:
    return (
        f"run `python -m mnist_cnn.web fetch` where the npm registry is reachable (or set "
        f"MNIST_CNN_NPM_REGISTRY to a mirror), or pass --runtime {spec.tarball_name} "
        f"(from `npm pack {spec.package}@{spec.version}`)"
    )


def provision_runtime(
    spec: RuntimeSpec = ORT, tarball: str | Path | None = None, log: Callable | None = None
) -> Path:
    """Make sure the cache holds the runtime's verified files; return their folder.

    Sources, in order: the cache; `tarball` (a package tarball already downloaded); the
    tarball kept in the cache by an earlier download; the npm registry. A tarball is used
    only once its integrity hash matches, and is kept in the cache once it does.
    """
    say = log or (lambda _msg: None)
    if tarball is None and (folder := cached_runtime(spec)) is not None:
        return folder
    kept = web_cache() / spec.tarball_name
    if tarball is not None:
        path = Path(tarball)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserError(f"--runtime {path}: cannot read it ({exc.strerror or exc})") from None
        check_integrity(data, spec.integrity, str(path))
    elif kept.is_file():
        data = kept.read_bytes()
        try:
            check_integrity(data, spec.integrity, str(kept))
        except UserError:
            data = None
    else:
        data = None
    if data is None:
        registry = registry_url()
        why = "MNIST_CNN_NPM_REGISTRY is none"
        if registry is not None:
            url = spec.tarball_url(registry)
            say(f"downloading {url}")
            try:
                data = download(url)
                check_integrity(data, spec.integrity, url)
            except UserError as exc:
                data, why = None, str(exc)
        if data is None:
            raise UserError(
                f"{spec.label}, the page's in-browser runtime, is not in the cache and could "
                f"not be downloaded ({why}): {how_to_provide(spec)}"
            )
    files = extract_runtime(data, spec, spec.tarball_name)
    folder = runtime_dir(spec)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not kept.is_file() or tarball is not None:
            write_atomic(kept, data)
        for member, content in files.items():
            write_atomic(folder / spec.files[member][0], content)
    except OSError as exc:
        raise UserError(
            f"cannot write the cache folder {folder} ({exc.strerror or exc}): "
            "set MNIST_CNN_CACHE to a writable folder"
        ) from None
    say(f"{spec.label}: verified, in {folder}")
    return folder


# --- what the page is told -------------------------------------------------------------------


def preparation_contract(style: str) -> dict:
    """What `mnist_cnn.images` does, as numbers the page's prepare.js follows."""
    import PIL

    from mnist_cnn import images

    return {
        "style": style,
        "steps": "grayscale; inverted if the border is light; shrunk to at most "
        f"{images.WORKING_SIZE} px and 3x3-median filtered; contrast normalised; cropped "
        "to the ink; "
        + (
            f"fit to fill {images.SIZE}x{images.SIZE}, centred"
            if style == "fashion"
            else f"fit in {images.DIGIT_BOX}x{images.DIGIT_BOX}, placed by its centre of mass "
            f"in {images.SIZE}x{images.SIZE}"
        ),
        "size": images.SIZE,
        "digit_box": images.DIGIT_BOX,
        "max_pixels": images.MAX_PIXELS,
        "formats": getattr(images, "FORMAT_NAMES", "PNG, JPEG, GIF, BMP or WebP"),
        "ink_floor": images.INK_FLOOR,
        "min_contrast": images.MIN_CONTRAST,
        "working_size": images.WORKING_SIZE,
        "pillow_major": int(PIL.__version__.split(".")[0]),
        "input": "float32 [N,1,28,28] = uint8 / 255, light ink on a dark background",
    }


def stage_names(count: int) -> list[str]:
    return [f"stage{i + 1}" for i in range(count)]


def onnx_stage_outputs(path: Path) -> list[str]:
    """The stage outputs an exported model has (`export_onnx(..., stages=True)`)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [o.name for o in graph.output if o.name.startswith("stage")]


def page_config(
    info: dict,
    style: str,
    *,
    api: str | None,
    stages: int | None,
    runtime_note: str | None = None,
) -> dict:
    """model.json: everything the page needs to know about the run and where things are.

    `api` is the server's prediction route (None for a static folder); `stages` is the
    number of convolution stages the ONNX model exposes, None when the page cannot answer
    in the browser (then `runtime_note` says why).
    """
    browser = None
    if stages is not None:
        browser = {
            "model": MODEL,
            "runtime": f"{RUNTIME_FOLDER}/{ORT.module}",
            "wasm": f"{RUNTIME_FOLDER}/{ORT.files['ort-wasm-simd-threaded.wasm'][0]}",
            "runtime_version": ORT.label,
            "input": "images",
            "output": "probabilities",
            "stages": stage_names(stages),
            "stage_titles": [f"conv {i + 1} + ReLU" for i in range(stages)],
        }
    config = {
        "format": FORMAT,
        **info,
        "style": style,
        "preparation": preparation_contract(style),
        "api": api,
        "browser": browser,
    }
    if runtime_note:
        config["browser_note"] = runtime_note
    return config


# --- export --format web ---------------------------------------------------------------------


def export_web(
    run_dir: str | Path,
    out: str | Path | None = None,
    runtime: str | Path | None = None,
    log: Callable | None = None,
):
    """Write the page for RUN_DIR into `out` (default RUN_DIR/web); return (folder, parity,
    bytes written).

    The runtime is provisioned first (it is what can fail for want of a network), then the
    ONNX model is exported with its stage outputs and checked against PyTorch.
    """
    from mnist_cnn.export import export_onnx
    from mnist_cnn.run import WEB, Run

    run = Run(run_dir)
    runtime_folder = provision_runtime(ORT, runtime, log)
    out = Path(out) if out is not None else run.output(WEB)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder: choose another --out")
    if out.is_dir() and not _holds_only_a_page(out):
        raise UserError(f"{out} is a folder with other files in it: choose an empty or new --out")
    try:
        for folder in (out, out / "static", out / RUNTIME_FOLDER):
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create {out} ({exc.strerror or exc}): choose another --out"
        ) from None
    _, parity = export_onnx(run.path, out / MODEL, stages=True)
    stages = len(onnx_stage_outputs(out / MODEL))
    files = {PAGE: (STATIC / PAGE).read_bytes()}
    files.update({f"static/{name}": (STATIC / name).read_bytes() for name in PAGE_FILES})
    for exported_name, _ in ORT.files.values():
        files[f"{RUNTIME_FOLDER}/{exported_name}"] = (runtime_folder / exported_name).read_bytes()
    config = page_config(run.info(), run.image_style, api=None, stages=stages)
    files[CONFIG] = (json.dumps(config, indent=1) + "\n").encode()
    try:
        for name, data in files.items():
            write_atomic(out / name, data)
    except OSError as exc:
        raise UserError(
            f"cannot write into {out} ({exc.strerror or exc}): choose another --out"
        ) from None
    total = sum(len(d) for d in files.values()) + (out / MODEL).stat().st_size
    return out, parity, total


def _holds_only_a_page(folder: Path) -> bool:
    """Empty, or what an earlier (maybe interrupted) export wrote: safe to write over."""
    ours = {PAGE, CONFIG, MODEL, "static", RUNTIME_FOLDER}
    return all(
        p.name in ours or (p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX))
        for p in folder.iterdir()
    )


# --- python -m mnist_cnn.web fetch -----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_cnn.web",
        description=f"Provision {ORT.label} (the exported page's runtime) into the cache.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download and verify it (once), or check it")
    fetch.add_argument("--runtime", type=Path, metavar="FILE.tgz",
                       help=f"take it from this {ORT.tarball_name} (from `npm pack`)")  # fmt: skip
    fetch.add_argument("--quiet", action="store_true", help="print nothing on success")
    commands.add_parser("where", help="print the cache folder if the runtime is there")
    args = parser.parse_args(argv)
    try:
        if args.command == "where":
            folder = cached_runtime()
            if folder is None:
                raise UserError(f"{ORT.label} is not in the cache: {how_to_provide()}")
            print(folder)
            return 0
        log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
        folder = provision_runtime(ORT, args.runtime, log)
        if not args.quiet:
            print(folder)
        return 0
    except UserError as exc:
        print(f"mnist-cnn: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
