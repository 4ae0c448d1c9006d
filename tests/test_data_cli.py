"""The `mnist-cnn data` commands, run as a user runs them: bad data is one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_cnn.data.catalog import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from mnist_cnn.data.idx import write_idx

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_one_line_error(rc: int, stderr: str, *fragments: str) -> str:
    """Exit 2, a single `mnist-cnn: error: ...` line on stderr containing every fragment."""
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mnist-cnn: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# --- `data show` on a broken folder -----------------------------------------------------------


def _truncate(folder: Path) -> tuple[str, ...]:
    path = folder / TRAIN_IMAGES
    path.write_bytes(path.read_bytes()[:-100])
    return str(path), "truncated", "(50, 28, 28)"


def _bad_magic(folder: Path) -> tuple[str, ...]:
    path = folder / TEST_LABELS
    path.write_bytes(b"\x12\x34\x08\x01" + path.read_bytes()[4:])
    return str(path), "bad magic number 0x12340801", "not an IDX file"


def _mismatched_counts(folder: Path) -> tuple[str, ...]:
    write_idx(folder / TRAIN_LABELS, np.zeros(49, dtype=np.uint8))
    return str(folder / TRAIN_LABELS), "49 labels for 50 images", str(folder / TRAIN_IMAGES)


def _missing_file(folder: Path) -> tuple[str, ...]:
    (folder / TEST_IMAGES).unlink()
    return str(folder), f"missing {TEST_IMAGES}", "needs all four"


@pytest.mark.parametrize(
    "damage", [_truncate, _bad_magic, _mismatched_counts, _missing_file], ids=lambda f: f.__name__
)
def test_show_broken_folder_is_one_line_and_exit_2(tiny_idx_folder, run_cli, tmp_path, damage):
    folder = tiny_idx_folder()
    fragments = damage(folder)
    rc, out, err = run_cli("data", "show", folder)
    assert_one_line_error(rc, err, *fragments)
    assert out == ""
    assert list(tmp_path.glob("*.png")) == []


def test_show_writes_a_png_of_the_folder(tiny_idx_folder, run_cli, tmp_path):
    folder = tiny_idx_folder("tiny", gz=True)
    rc, out, err = run_cli("data", "show", folder, "--split", "test", "--n", "12")
    assert (rc, err) == (0, "")
    png = tmp_path / "tiny-test-samples.png"
    assert out == f"wrote {png.name}\n"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(png) as image:
        gray = np.asarray(image.convert("L"))
    assert gray.shape[0] > 100 and gray.shape[1] > 100
    # The random-noise samples cover a good part of the figure: it is not blank or title-only.
    assert (gray < 200).mean() > 0.2
    assert len(np.unique(gray)) > 100


# --- unknown names, unreachable sources, a corrupt cache --------------------------------------


def test_unknown_data_set_is_exit_2(run_cli, isolated_cache):
    rc, out, err = run_cli("data", "show", "no-such-set")
    assert_one_line_error(rc, err, "unknown data set 'no-such-set'", "mnist, fashion-mnist")
    assert out == ""


def test_fetch_with_no_reachable_source_is_one_line_and_exit_2(
    run_cli, isolated_cache, closed_port_url
):
    env = {"MNIST_CNN_SOURCES": "http", "MNIST_CNN_MIRRORS": closed_port_url}
    rc, out, err = run_cli("data", "fetch", "--quiet", "mnist", env=env)
    line = assert_one_line_error(
        rc, err, "mnist: could not provision", closed_port_url, "`mnist-cnn data fetch mnist`"
    )
    assert "Fix: " in line
    assert out == ""
    assert [p for p in isolated_cache.rglob("*") if p.is_file()] == []


def test_verify_corrupt_cache_is_one_line_naming_the_fix(run_cli, isolated_cache):
    folder = isolated_cache / "mnist"
    folder.mkdir()
    write_idx(folder / TRAIN_LABELS, np.arange(10, dtype=np.uint8))
    rc, out, err = run_cli("data", "verify", "mnist")
    assert_one_line_error(rc, err, "mnist failed verification", "`mnist-cnn data fetch mnist`")
    assert out.startswith("mnist: FAILED (")
    assert f"{TRAIN_LABELS} corrupt" in out
    assert f"{TRAIN_IMAGES} missing" in out


def test_list_shows_each_state_and_what_would_be_tried(run_cli, isolated_cache, closed_port_url):
    (isolated_cache / "fashion-mnist").mkdir()
    (isolated_cache / "fashion-mnist" / TRAIN_IMAGES).write_bytes(b"not the data set")
    env = {"MNIST_CNN_SOURCES": "http", "MNIST_CNN_MIRRORS": closed_port_url}
    rc, out, err = run_cli("data", "list", env=env)
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"cache: {isolated_cache}"
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in lines[2:]}
    assert rows == {
        "mnist": ["missing", f"will try: mirror {closed_port_url}"],
        "fashion-mnist": ["corrupt", f"will try: mirror {closed_port_url}"],
    }
