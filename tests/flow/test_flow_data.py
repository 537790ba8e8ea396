"""Flow-app loaders on tiny fabricated files in the real formats (idx-ubyte.gz, CIFAR pickles, images)."""

from __future__ import annotations

import collections
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pgraft.apps.flow.data import (
    FASHION_MNIST_INSTALL,
    infinite_batches,
    load_cifar10,
    load_fashion_mnist,
    load_image_folder,
    load_images,
    pad_to,
    read_idx,
    unit_to_uint8,
)


def write_idx(path: Path, array: np.ndarray) -> None:
    """idx format: 0, 0, type 0x08 (uint8), ndim, big-endian sizes, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    for split, stem in (("train", "train"), ("test", "t10k")):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", labels)
    return tmp_path, images, labels


def test_fashion_mnist_reads_idx_and_maps_to_unit_range(fake_fashion):
    root, images, labels = fake_fashion
    x, y = load_fashion_mnist("train", root=root)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert x[0, 0, 0, 0] == -1.0 and x[0, 0, 0, 1] == 1.0  # 0 -> -1, 255 -> 1
    assert torch.equal(unit_to_uint8(x)[:, 0], torch.from_numpy(images))  # exact round trip
    assert y.tolist() == labels.tolist() and y.dtype == torch.int64


def test_fashion_mnist_limit_and_pad(fake_fashion):
    root, _, _ = fake_fashion
    x, y = load_fashion_mnist("test", root=root, limit=3, pad=32)
    assert x.shape == (3, 1, 32, 32) and len(y) == 3
    assert (x[:, :, :2] == -1).all() and (x[:, :, -2:] == -1).all()  # black border
    unpadded, _ = load_fashion_mnist("test", root=root, limit=3)
    assert torch.equal(x[:, :, 2:30, 2:30], unpadded)


def test_fashion_mnist_missing_says_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist(root=tmp_path / "nowhere")
    assert FASHION_MNIST_INSTALL in str(err.value) and "nowhere" in str(err.value)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x12\x34\x56\x78" + b"\0" * 8)
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(bad)
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\0" * 3)
    with pytest.raises(ValueError, match="10"):
        read_idx(truncated)


def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    # the original batches are Python-2 pickles of dicts with bytes keys
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}


@pytest.fixture
def fake_cifar(tmp_path: Path) -> Path:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        (root / name).write_bytes(pickle.dumps(_cifar_batch(3, i), protocol=2))
    return root


def test_cifar10_loader_layout_and_range(fake_cifar):
    x, y = load_cifar10(fake_cifar.parent, "train")  # parent folder works too
    assert x.shape == (15, 3, 32, 32) and y.shape == (15,)
    first = _cifar_batch(3, 0)
    # row layout: 1024 red, then green, then blue values, each row-major 32x32
    assert torch.equal(unit_to_uint8(x[0, 1]).flatten(), torch.from_numpy(first[b"data"][0, 1024:2048]))
    assert y[:3].tolist() == first[b"labels"]
    xt, _ = load_cifar10(fake_cifar, "test", limit=2)
    assert xt.shape == (2, 3, 32, 32) and -1 <= xt.min() and xt.max() <= 1


def test_cifar10_refuses_arbitrary_pickles(fake_cifar):
    (fake_cifar / "test_batch").write_bytes(pickle.dumps(collections.OrderedDict(data=1)))
    with pytest.raises(ValueError, match="refusing to unpickle collections.OrderedDict"):
        load_cifar10(fake_cifar, "test")


def test_cifar10_missing_paths_named(tmp_path, fake_cifar):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_cifar10(tmp_path / "nothing-here")
    (fake_cifar / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(fake_cifar, "train")


def test_image_folder_resizes_and_crops(tmp_path):
    from PIL import Image

    (tmp_path / "sub").mkdir()
    wide = np.zeros((10, 20, 3), dtype=np.uint8)
    wide[:, 5:15] = 255  # white centre square survives the centre crop, black sides are cut
    Image.fromarray(wide).save(tmp_path / "a.png")
    Image.fromarray(np.full((16, 16), 128, dtype=np.uint8), mode="L").save(tmp_path / "sub" / "b.jpg")
    x = load_image_folder(tmp_path, size=8)
    assert x.shape == (2, 3, 8, 8)
    assert x[0].min() > 0.9  # all white after cropping 10x20 -> centre 10x10 -> 8x8
    assert torch.allclose(x[1], torch.full_like(x[1], 128 / 127.5 - 1), atol=0.02)
    assert torch.equal(load_images("folder", tmp_path, size=8), x)  # registry path
    assert load_image_folder(tmp_path, size=8, channels=1).shape == (2, 1, 8, 8)


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        load_image_folder(tmp_path / "missing-dir")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="empty.*contains no images"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path / "bad")


def test_load_images_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset 'mnist-typo'"):
        load_images("mnist-typo")


def test_pad_to_rejects_shrinking():
    with pytest.raises(ValueError, match="smaller"):
        pad_to(torch.zeros(1, 1, 28, 28), 16)


def test_infinite_batches_cover_each_epoch():
    images = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1)
    it = infinite_batches(images, batch_size=5, generator=torch.Generator().manual_seed(0))
    (a, ca), (b, _) = next(it), next(it)
    assert ca is None and a.shape == (5, 1, 1, 1)
    assert sorted(torch.cat([a, b]).flatten().tolist()) == list(range(10))
