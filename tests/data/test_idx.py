from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from lightning_nfk.data import read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _write(path: Path, array: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_round_trip(tmp_path, name):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write(tmp_path / name, images, 0x08)
    assert np.array_equal(read_idx(tmp_path / name), images)
    floats = np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)
    _write(tmp_path / "f.idx", floats, 0x0D)
    assert np.array_equal(read_idx(tmp_path / "f.idx"), floats)


def test_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match=r"is not an IDX file"):
        read_idx(tmp_path / "bad")
    _write(tmp_path / "t.idx", np.zeros((4, 4), np.uint8), 0x08)
    (tmp_path / "t.idx").write_bytes((tmp_path / "t.idx").read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"truncated or corrupt: 13 data bytes, 16 expected"):
        read_idx(tmp_path / "t.idx")


@pytest.mark.skipif(not FASHION.exists(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_labels():
    labels = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10
