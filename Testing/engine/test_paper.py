"""The FashionMNIST experiment's pipeline on a tiny stand-in data set (IDX files written here)."""

import gzip
import json

import numpy as np

from anomaly_localizer.cli import main
from anomaly_localizer.tooling.evaluation.paper import read_idx


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_round_trip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)


def test_held_out_class_is_found_when_it_looks_different(tmp_path):
    rng = np.random.default_rng(0)

    def images(labels):
        x = rng.integers(0, 40, size=(len(labels), 28, 28))
        for i, c in enumerate(labels):  # each class a bright bar at its own row; class 5 everywhere
            if c == 5:
                x[i] = 255 - x[i]
            else:
                x[i, 2 * c:2 * c + 3] = 220
        return x

    y_train, y_test = rng.integers(0, 10, 600), rng.integers(0, 10, 200)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images(y_train))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y_train)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images(y_test))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y_test)
    assert main(["paper-fmnist", "--data", str(tmp_path), "--epochs", "3", "--json", str(tmp_path / "r.json"),
                 "-q"]) == 0
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["held_out"] for r in results] == [0, 5]
    five = results[1]["auroc"]
    assert five["elbo"] > 0.9 and five["rec"] > 0.9  # an inverted image is easy to tell apart


def test_missing_data_says_how_to_get_it(tmp_path, capsys):
    assert main(["paper-fmnist", "--data", str(tmp_path)]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
