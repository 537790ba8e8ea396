"""Image data for the flow app: Fashion-MNIST (default), CIFAR-10 batches, any folder of images.

Every loader returns float32 images in [-1, 1] with shape [N, C, H, W] (uint8 pixel p maps to
p / 127.5 - 1), the range the flow is trained in (x_s = (1-s) x_0 + s eps, s = 1 noise) and the
range :mod:`pgraft.apps.flow.metrics` expects. Labels, where the format has them, come back as
int64 [N]; the unconditional flow ignores them but the feature-FID classifier needs them.

Nothing here downloads: Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``,
CIFAR-10 / CelebA from folders the user already has. Errors name the path and what to do.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")

Split = Literal["train", "test"]

# idx type codes (http://yann.lecun.com/exdb/mnist/): code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------- conversions
def uint8_to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels [N, C, H, W] in {0..255} -> float32 in [-1, 1] via p / 127.5 - 1."""
    t = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    return t.to(torch.float32).div_(127.5).sub_(1.0)


def unit_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`uint8_to_unit` with clamping and rounding: [-1, 1] -> uint8 {0..255}."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pad_to(images: torch.Tensor, size: int, value: float = -1.0) -> torch.Tensor:
    """Pad [N, C, H, W] symmetrically to [N, C, size, size] with ``value`` (-1 = black background).

    28x28 Fashion-MNIST padded to 32x32 lets a UNet halve the resolution three times
    (32 -> 16 -> 8 -> 4) instead of stopping at 7x7.
    """
    h, w = images.shape[-2:]
    if size < h or size < w:
        raise ValueError(f"pad_to size {size} is smaller than the images ({h}x{w})")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top), value=value)


# ----------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (``.gz`` or raw) into a numpy array with the header's shape and dtype.

    Format: 2 zero bytes, a type code, the number of dims d, d big-endian uint32 sizes, data.
    """
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read idx file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def load_fashion_mnist(
    split: Split = "train",
    root: str | Path | None = None,
    limit: int | None = None,
    pad: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as (images [N, 1, 28, 28] in [-1, 1], labels int64 [N]).

    ``root`` defaults to the Debian package's folder /usr/share/datasets/fashion-mnist;
    ``limit`` keeps the first N images; ``pad=32`` pads to 32x32 with black (see :func:`pad_to`).
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    image_path, label_path = _find_idx(root, image_stem), _find_idx(root, label_stem)
    if image_path is None or label_path is None:
        missing = image_stem if image_path is None else label_stem
        raise FileNotFoundError(
            f"Fashion-MNIST file {root / (missing + '.gz')} not found. Install the dataset with "
            f"`{FASHION_MNIST_INSTALL}` (Debian/Ubuntu, as root), or pass a folder holding "
            f"{image_stem}.gz and {label_stem}.gz."
        )
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: unexpected idx shapes images {images.shape}, labels {labels.shape}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = uint8_to_unit(images[:, None])
    if pad is not None:
        x = pad_to(x, pad)
    return x, torch.as_tensor(labels.astype(np.int64))


# ----------------------------------------------------------------------------- CIFAR-10
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and builtin containers and refuses everything else.

    The CIFAR-10 python batches are pickled dicts of bytes keys, lists and numpy arrays; a
    plain ``pickle.load`` would run any callable a tampered file names.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "bytes"),
        ("builtins", "str"), ("builtins", "int"), ("builtins", "float"), ("_codecs", "encode"),
    }  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def safe_unpickle(path: str | Path) -> Any:
    """Load a pickle that may only contain numpy arrays and builtin containers (latin1 strings)."""
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()


CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def load_cifar10(root: str | Path, split: Split = "train", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 python batches -> (images [N, 3, 32, 32] in [-1, 1], labels int64 [N]).

    ``root`` is the extracted ``cifar-10-batches-py`` folder (or its parent). Each batch is a
    pickled dict with ``data`` uint8 [n, 3072] (R, G, B planes, row-major) and ``labels``.
    """
    if split not in CIFAR10_BATCHES:
        raise ValueError(f"split must be one of {sorted(CIFAR10_BATCHES)}, got {split!r}")
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder {root} does not exist (expected the extracted cifar-10-batches-py)")
    paths = [root / name for name in CIFAR10_BATCHES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 {split} batches missing in {root}: {', '.join(missing)}")
    images, labels = [], []
    for p in paths:
        try:
            batch = safe_unpickle(p)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"cannot read CIFAR-10 batch {p}: {err}") from err
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()} if isinstance(batch, dict) else batch
        if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
            raise ValueError(f"CIFAR-10 batch {p} has no 'data'/'labels' entries")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch["labels"]):
            raise ValueError(f"CIFAR-10 batch {p}: data shape {data.shape} with {len(batch['labels'])} labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
        if limit is not None and sum(len(a) for a in images) >= limit:
            break
    x, y = np.concatenate(images), np.concatenate(labels)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return uint8_to_unit(x), torch.as_tensor(y)


# ----------------------------------------------------------------------------- image folders
def list_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, sorted for reproducibility)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"image folder {root} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def resize_center_crop(image: Any, size: int) -> Any:
    """PIL image -> ``size`` x ``size``: scale the short side to ``size`` (bicubic), crop the centre."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image_folder(
    root: str | Path,
    size: int = 64,
    channels: Literal[1, 3] = 3,
    limit: int | None = None,
) -> torch.Tensor:
    """A folder of images (CelebA, CelebA-HQ, LSUN exports, ...) -> [N, channels, size, size] in [-1, 1].

    Images are converted to RGB (or L for ``channels=1``), short side resized to ``size`` and
    centre-cropped. Unreadable files raise ``ValueError`` naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    files = list_images(root)
    if limit is not None:
        files = files[:limit]
    out = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                im = resize_center_crop(im.convert("RGB" if channels == 3 else "L"), size)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {p}: {err}") from err
        out[i] = arr.reshape(size, size, channels)
    return uint8_to_unit(out.transpose(0, 3, 1, 2))


# ----------------------------------------------------------------------------- registry + batches
def _fashion(path: str | None, split: Split, limit: int | None, size: int | None) -> torch.Tensor:
    return load_fashion_mnist(split, root=path, limit=limit, pad=size if size not in (None, 28) else None)[0]


def _cifar(path: str | None, split: Split, limit: int | None, size: int | None) -> torch.Tensor:
    if path is None:
        raise ValueError("CIFAR-10 needs --data-path pointing at the extracted cifar-10-batches-py folder")
    x = load_cifar10(path, split, limit)[0]
    return x if size in (None, 32) else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)


def _folder(path: str | None, split: Split, limit: int | None, size: int | None) -> torch.Tensor:
    if path is None:
        raise ValueError("an image-folder dataset needs --data-path")
    return load_image_folder(path, size=size or 64, limit=limit)


DATASETS: dict[str, Callable[[str | None, Split, int | None, int | None], torch.Tensor]] = {
    "fashion-mnist": _fashion,
    "cifar10": _cifar,
    "folder": _folder,
    "celeba": _folder,
}
"""name -> loader(path, split, limit, size) returning images [N, C, size, size] in [-1, 1]."""


def load_images(
    name: str, path: str | Path | None = None, split: Split = "train", limit: int | None = None, size: int | None = None
) -> torch.Tensor:
    """Load dataset ``name`` (a key of :data:`DATASETS`) as images [N, C, H, W] in [-1, 1]."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](None if path is None else str(path), split, limit, size)


def infinite_batches(
    images: torch.Tensor, batch_size: int, generator: torch.Generator | None = None, hflip: bool = False
) -> Iterator[tuple[torch.Tensor, None]]:
    """Endless ``(x0 [batch_size, C, H, W], None)`` batches, reshuffled every epoch.

    The ``(state, cond)`` pair is what ``pgraft.core.pretrain`` consumes; cond is None because the
    image flow is unconditional. ``hflip`` flips half of each batch (CIFAR/CelebA augmentation;
    leave off for Fashion-MNIST, whose classes are not all mirror-symmetric).
    """
    n = len(images)
    if n == 0 or batch_size < 1:
        raise ValueError(f"need images and batch_size >= 1, got {n} images and batch_size {batch_size}")
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            x = images[order[start : start + batch_size]]
            if hflip:
                flip = torch.rand(len(x), generator=generator) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            yield x, None
