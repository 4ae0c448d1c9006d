"""Figures, real-world image preparation and ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from digit_strokes import draw_digit, photo_like
from mnist_cnn.errors import UserError
from mnist_cnn.images import MAX_PIXELS, load_image, prepare_array, read_grayscale
from mnist_cnn.predict import predict_records
from mnist_cnn.run import load_model

DIGITS = [str(i) for i in range(10)]


def png_content(path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32)


def assert_not_blank(image: np.ndarray, min_size: int = 200) -> None:
    assert image.shape[0] >= min_size and image.shape[1] >= min_size
    assert image.std() > 10
    assert len(np.unique(image)) > 20


# --- figures --------------------------------------------------------------------------------


def test_training_curves_are_drawn(trained_run):
    assert_not_blank(png_content(trained_run / "curves.png"), 300)


def test_explain_writes_filters_and_feature_maps(run_cli, trained_run, tmp_path):
    code, _, err = run_cli("explain", str(trained_run), "--index", "0", "--out", tmp_path)
    assert code == 0, err
    filters = png_content(tmp_path / "filters.png")
    maps = png_content(tmp_path / "feature_maps.png")
    assert_not_blank(filters)
    assert_not_blank(maps, 400)
    assert maps.shape[0] > filters.shape[0]  # three stages of maps, one row of filters
    code, _, err = run_cli("explain", str(trained_run), "--index", "-1")
    assert code == 2 and "0..2147483648" in err


def test_stage_outputs_show_each_stage_once_for_every_model():
    from mnist_cnn.explain import stage_outputs
    from mnist_cnn.models import MODELS, build_model

    image = torch.randint(0, 256, (28, 28), dtype=torch.uint8)
    for name in MODELS:
        stages = stage_outputs(build_model(name).eval(), image)
        # The cropped networks see the middle of the image only.
        h, w = {"fast-28x24": (28, 24)}.get(name, (24, 24) if "24x24" in name else (28, 28))
        sizes = [(h, w), (h // 2, w // 2), (h // 4, w // 4)]
        assert [tuple(out.shape[-2:]) for _, out in stages] == sizes, name
        assert all(out.min() >= 0 for _, out in stages)  # after ReLU


def test_predict_plot_and_show_input(run_cli, trained_run, tmp_path):
    photo = tmp_path / "photo.png"
    draw_digit(3, 300).save(photo)
    code, out, err = run_cli("predict", str(trained_run), str(photo), "--plot", "plot.png",
                             "--show-input", "seen.png", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["class_index"] == 3
    assert_not_blank(png_content(tmp_path / "plot.png"))
    seen = np.asarray(Image.open(tmp_path / "seen.png"))
    assert seen.shape == (28, 28) and seen.dtype == np.uint8
    assert seen[0].max() == 0 and seen[:, 0].max() == 0  # MNIST's empty margin, dark
    assert seen.max() == 255


# --- preparing real-world images --------------------------------------------------------------


def photo_like_digits(n: int, seed: int = 0):
    """(digit, grayscale array) pairs of photo-like pictures of digits 0..9 in turn."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield i % 10, np.asarray(photo_like(i % 10, rng).convert("L"), dtype=np.float32)


def test_photo_like_digits_are_prepared_as_mnist_was(trained_run):
    model = load_model(trained_run)
    labels, images = zip(*[(d, prepare_array(a)) for d, a in photo_like_digits(200)], strict=True)
    batch = torch.stack(images)
    records = predict_records(model, batch, [""] * len(batch), DIGITS, top_k=1)
    predicted = np.array([r["class_index"] for r in records])
    accuracy = (predicted == np.array(labels)).mean()
    assert accuracy >= 0.9, accuracy
    # Each prepared image is MNIST-shaped: ink fits 20x20 and is centred by mass.
    for image in images[:20]:
        a = image.float()
        rows = torch.nonzero(a.sum(1)).flatten()
        cols = torch.nonzero(a.sum(0)).flatten()
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 21
        ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
        cy, cx = (a * ys).sum() / a.sum(), (a * xs).sum() / a.sum()
        assert abs(cy - 13.5) <= 1.5 and abs(cx - 13.5) <= 1.5


def test_an_inverted_light_on_dark_photo_gives_the_same_28x28(tmp_path):
    dark_on_light = np.asarray(draw_digit(7, 200).convert("L"), dtype=np.float32)
    light_on_dark = 255 - dark_on_light
    assert torch.equal(prepare_array(dark_on_light), prepare_array(light_on_dark))


def test_mnist_like_28x28_images_pass_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    image = np.zeros((28, 28), np.uint8)
    image[6:22, 10:18] = rng.integers(100, 256, (16, 8))
    path = tmp_path / "mnist-like.png"
    Image.fromarray(image).save(path)
    assert torch.equal(load_image(path), torch.from_numpy(image))


def test_fashion_items_fill_the_frame():
    picture = np.full((120, 90), 250, np.float32)
    picture[20:100, 25:65] = 40  # a dark item on a light background
    prepared = prepare_array(picture, style="fashion").numpy()
    rows = np.flatnonzero(prepared.max(1))
    assert rows[0] == 0 and rows[-1] == 27  # the long side spans the frame
    assert prepared.max() == 255


def test_bad_pictures_are_refused_clearly(tmp_path):
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (300, 200), (240, 240, 240)).save(blank)
    with pytest.raises(UserError, match="no ink"):
        load_image(blank)
    text = tmp_path / "digit.png"
    text.write_text("this is not a picture")
    with pytest.raises(UserError, match="not an image"):
        load_image(text)
    truncated = tmp_path / "cut.png"
    draw_digit(1, 100).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(UserError):
        load_image(truncated)
    with pytest.raises(UserError, match="is a folder"):
        read_grayscale(tmp_path)


def test_huge_pictures_are_refused_before_decoding(run_cli, trained_run, tmp_path):
    side = int(MAX_PIXELS**0.5) + 100
    huge = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(huge)  # 1-bit: small on disk, huge when decoded
    code, _, err = run_cli("predict", str(trained_run), str(huge))
    assert code == 2 and "pixel limit" in err and len(err.strip().splitlines()) == 1


# --- ONNX export ------------------------------------------------------------------------------


def test_a_fast_run_on_mnist_trains_the_centre_and_exports_and_explains(tmp_path):
    """`fast` trains `fast-24x24-shifts` on MNIST: every path that loads a run takes 28x28
    images still, and the ONNX graph crops and averages the shifted windows as the network
    does."""
    ort = pytest.importorskip("onnxruntime")
    from mnist_cnn import build_model, fit, load_dataset, resolve_recipe
    from mnist_cnn.explain import stage_outputs
    from mnist_cnn.export import export_onnx
    from mnist_cnn.metrics import to_input

    ds = load_dataset("mnist")
    assert resolve_recipe("fast", dataset="mnist").model == "fast-24x24-shifts"
    run = tmp_path / "fast"
    torch.manual_seed(0)
    net = build_model("fast-24x24-shifts")
    fit(net, ds, "fast", epochs=0.05, out=run, progress=False, log=None)
    assert json.loads((run / "config.json").read_text())["recipe"]["model"] == "fast-24x24-shifts"
    path, parity = export_onnx(run)
    assert parity.ok and parity.classes_agree == parity.images
    model = load_model(run)
    x = to_input(ds.test.images[:64])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.inference_mode():
        averaged, plain = torch.softmax(model(x), 1), torch.softmax(model.net(x), 1)
    assert (got - averaged).abs().max() < 1e-4 < (got - plain).abs().max()
    stages = stage_outputs(model, ds.test.images[0])
    assert [tuple(out.shape[-2:]) for _, out in stages] == [(24, 24), (12, 12), (6, 6)]
    records = predict_records(model, ds.test.images[:1], ["test[0]"], ds.classes)
    assert records[0]["class_index"] == 7  # the first test image, a 7


def test_onnx_export_matches_pytorch_on_1000_test_images(run_cli, trained_run, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "digits.onnx"
    code, stdout, err = run_cli("export", str(trained_run), "--out", out)
    assert code == 0, err
    assert "1000 classes agree" in stdout
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["class_names"]) == DIGITS
    assert json.loads(meta["input_shape"]) == ["N", 1, 28, 28]
    assert "255" in meta["input_scale"]

    from mnist_cnn import load_dataset
    from mnist_cnn.metrics import to_input

    test = load_dataset("mnist").test
    x = to_input(test.images[:1000])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.inference_mode():
        expected = torch.softmax(load_model(trained_run)(x), 1).numpy()
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert np.abs(got - expected).max() < 1e-4
    single = session.run(None, {"images": x[:1].numpy()})[0]  # the batch size is dynamic
    assert single.shape == (1, 10)
