"""`train`, `evaluate` and `predict` through the command line, on a real trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mnist_cnn import load_dataset
from mnist_cnn.data import Dataset


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist")


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_train_on_a_folder_writes_a_run_directory(run_cli, tiny_idx_folder, tmp_path):
    folder = tiny_idx_folder(n_train=200, n_test=50)
    out_dir = tmp_path / "run"
    code, out, err = run_cli("train", "--dataset", str(folder), "--epochs", "2", "--out", out_dir)
    assert code == 0, err
    assert "initial test accuracy" in out
    assert "final test accuracy" in out.splitlines()[-1]
    assert "notebook" not in out.splitlines()[-1]  # no reference figure for a custom folder
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["dataset"] == str(folder) and summary["epochs"] == 2
    rows = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3  # untrained + two epoch ends (training takes far less than 60 s)
    assert json.loads((out_dir / "config.json").read_text())["threads"] >= 1


def test_train_threads_flag_sets_the_cpu_threads(run_cli, tiny_idx_folder, tmp_path):
    folder = tiny_idx_folder(n_train=200, n_test=50)
    code, _, err = run_cli("train", "--dataset", str(folder), "--epochs", "1", "--threads", "1",
                           "--out", tmp_path / "one")  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "one" / "config.json").read_text())["threads"] == 1
    code, _, err = run_cli("train", "--dataset", str(folder), "--threads", "0")
    assert code == 2 and "--threads" in one_error_line(err)


def test_train_refuses_bad_settings(run_cli_each, tiny_idx_folder, tmp_path):
    folder = tiny_idx_folder()
    cases = [
        (["train", "--dataset", "nope"], "unknown data set"),
        (["train", "--dataset", str(folder), "--epochs", "0"], "more than 0"),
        (["train", "--dataset", str(folder), "--lr", "-1"], "--lr: -1 must be more than 0"),
        (["train", "--dataset", str(folder), "--recipe", "nope"], "unknown recipe"),
        (["train", "--dataset", str(folder), "--device", "cuda"], "CUDA"),
        (["train", "--dataset", str(folder), "--out", str(tmp_path / "taken")], "--overwrite"),
    ]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    for (args, message), (code, _, err) in zip(cases, run_cli_each([a for a, _ in cases]),
                                               strict=True):  # fmt: skip
        assert code == 2, (args, err)
        assert message in one_error_line(err)
    assert (tmp_path / "taken" / "config.json").read_text() == "{}"


def test_predict_index_0_is_a_seven(run_cli, trained_run):
    code, out, err = run_cli("predict", str(trained_run), "--index", "0", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["input"] == "test[0]"
    assert record["class_index"] == 7 and record["class_name"] == "7"
    assert len(record["top_k"]) == 3
    assert record["top_k"][0]["probability"] == record["probability"] > 0.5
    probs = [t["probability"] for t in record["top_k"]]
    assert probs == sorted(probs, reverse=True)
    code, out, _ = run_cli("predict", str(trained_run), "--index", "0", "--top-k", "1")
    assert code == 0 and out.startswith("test[0]: 7")


def test_predict_reads_mnist_like_image_files(run_cli, trained_run, mnist, tmp_path):
    paths = []
    for i in range(5):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(mnist.test.images[i].numpy()).save(path)
        paths.append(str(path))
    code, out, err = run_cli("predict", str(trained_run), *paths, "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["input"] for r in records] == paths
    assert [r["class_index"] for r in records] == mnist.test.labels[:5].tolist()


def test_predict_refuses_bad_input(run_cli_each, trained_run, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((40, 40), 255, dtype=np.uint8)).save(blank)
    cases = [
        ([str(trained_run)], "one of the two"),
        ([str(trained_run), "--index", "10000"], "out of range"),
        ([str(trained_run), str(tmp_path / "missing.png")], "no such file"),
        ([str(trained_run), str(text)], "not an image"),
        ([str(trained_run), str(blank)], "no ink"),
        ([str(tmp_path), "--index", "0"], "config.json not found"),
        ([str(tmp_path / "nowhere"), "--index", "0"], "not a folder"),
    ]
    results = run_cli_each([["predict", *args] for args, _ in cases])
    for (args, message), (code, _, err) in zip(cases, results, strict=True):
        assert code == 2, (args, err)
        assert message in one_error_line(err), err


def test_evaluate_writes_table_figures_and_report(run_cli, trained_run):
    code, out, err = run_cli("evaluate", str(trained_run))
    assert code == 0, err
    assert "precision" in out and "recall" in out
    report = json.loads((trained_run / "report.json").read_text())
    confusion = np.array(report["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 10_000
    assert report["accuracy"] == pytest.approx(np.trace(confusion) / 10_000)
    assert sum(r["support"] for r in report["per_class"]) == 10_000
    assert report["mistakes"] == 10_000 - np.trace(confusion)
    for name in ("confusion.png", "mistakes.png"):
        image = np.asarray(Image.open(trained_run / name).convert("L"))
        assert image.shape[0] > 300 and image.shape[1] > 300
        assert image.std() > 10  # not blank


def test_evaluate_refuses_what_is_not_a_run(run_cli, tmp_path):
    code, _, err = run_cli("evaluate", str(tmp_path))
    assert code == 2 and "config.json not found" in one_error_line(err)
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run_cli("evaluate", str(tmp_path))
    assert code == 2 and "unreadable" in one_error_line(err)


def test_a_run_of_another_shape_is_refused_clearly(run_cli, trained_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((trained_run / "config.json").read_text())
    config["classes"] = [str(i) for i in range(5)]  # weights are for 10 classes
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((trained_run / "model.safetensors").read_bytes())
    code, _, err = run_cli("predict", str(other), "--index", "0")
    assert code == 2 and "does not fit" in one_error_line(err)
    (other / "model.safetensors").write_bytes(b"garbage")
    code, _, err = run_cli("predict", str(other), "--index", "0")
    assert code == 2 and "unreadable weights" in one_error_line(err)
