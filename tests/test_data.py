"""Data loading: the bundled sets, and clear errors for missing, truncated or corrupted IDX files."""

import numpy as np
import pytest
import torch

import forwardlearn as fl
from forwardlearn.data import DataError
from forwardlearn.data.idx import FILES, SIZES


def test_digits_split_shapes_and_range():
    X, y = fl.data.load("digits", "train")
    Xt, yt = fl.data.load("digits", "test")
    assert X.shape == (1437, 1, 8, 8) and Xt.shape == (360, 1, 8, 8)
    assert X.dtype == torch.float32 and y.dtype == torch.long
    assert 0.0 <= float(X.min()) and float(X.max()) <= 1.0
    assert set(y.tolist()) == set(range(10))
    X2, _ = fl.data.load("digits", "train")
    assert torch.equal(X, X2)  # the split is fixed


@pytest.mark.parametrize("name,features,classes", [("breast_cancer", 30, 2), ("wine", 13, 3), ("iris", 4, 3)])
def test_tabular_sets(name, features, classes):
    X, y = fl.data.load(name, "train")
    Xt, _ = fl.data.load(name, "test")
    assert X.shape[1] == features and int(y.max()) == classes - 1
    assert float(X.min()) >= 0.0 and float(X.max()) <= 1.0
    assert float(Xt.min()) >= 0.0 and float(Xt.max()) <= 1.0


def test_unknown_set_and_split():
    with pytest.raises(DataError, match="available: .*digits"):
        fl.data.load("imagenet")
    with pytest.raises(DataError, match="split"):
        fl.data.load("digits", "val")


def _write_idx(path, dims, n_total):
    header = (0x800 + len(dims)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    body = np.zeros(n_total - len(header), dtype=np.uint8)
    path.write_bytes(header + body.tobytes())


def _fake_fashion(root):
    d = root / "fashion-mnist"
    d.mkdir(parents=True)
    _write_idx(d / FILES["train_images"], [60000, 28, 28], SIZES[FILES["train_images"]])
    _write_idx(d / FILES["train_labels"], [60000], SIZES[FILES["train_labels"]])
    _write_idx(d / FILES["test_images"], [10000, 28, 28], SIZES[FILES["test_images"]])
    _write_idx(d / FILES["test_labels"], [10000], SIZES[FILES["test_labels"]])
    return d


def test_idx_reader_on_wellformed_files(tmp_path):
    _fake_fashion(tmp_path)
    X, y = fl.data.load("fashion-mnist", "test", root=tmp_path)
    assert X.shape == (10000, 1, 28, 28) and y.shape == (10000,)


def test_missing_file_names_it_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"missing file .*train-images-idx3-ubyte.*forwardlearn data fetch mnist"):
        fl.data.load("mnist", "train", root=tmp_path)


def test_truncated_file_is_named(tmp_path):
    d = _fake_fashion(tmp_path)
    p = d / FILES["test_images"]
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: 1000 bytes, expected 7840016"):
        fl.data.load("fashion-mnist", "test", root=tmp_path)


def test_corrupted_mnist_fails_checksum(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    _write_idx(d / FILES["test_images"], [10000, 28, 28], SIZES[FILES["test_images"]])
    _write_idx(d / FILES["test_labels"], [10000], SIZES[FILES["test_labels"]])
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        fl.data.load("mnist", "test", root=tmp_path)


def test_bad_magic_is_named(tmp_path):
    d = _fake_fashion(tmp_path)
    p = d / FILES["test_labels"]
    b = bytearray(p.read_bytes())
    b[3] = 0x99
    p.write_bytes(bytes(b))
    with pytest.raises(DataError, match="bad IDX magic"):
        fl.data.load("fashion-mnist", "test", root=tmp_path)


def test_cifar_missing_says_where(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        fl.data.load("cifar10", "train", root=tmp_path)


def test_cifar_reads_standard_batches(tmp_path):
    import pickle

    d = tmp_path / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in ["test_batch"]:
        batch = {b"data": np.full((10000, 3072), 255, dtype=np.uint8), b"labels": [3] * 10000}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    X, y = fl.data.load("cifar10", "test", root=tmp_path)
    assert X.shape == (10000, 3, 32, 32) and float(X.max()) == 1.0 and int(y[0]) == 3


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FORWARDLEARN_DATA", str(tmp_path))
    assert fl.data.data_dir() == tmp_path
