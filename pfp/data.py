"""Data sets and loaders for the pruning pipeline.

Fashion-MNIST and CIFAR-10 are read straight from their on-disk formats into uint8
tensors held in memory, and augmented on tensors: a whole epoch of 28x28 images costs
less than a second of loader time, so training is never waiting on PIL.
ImageNet-style folders go through torchvision's ImageFolder and the usual transforms.
"""
from __future__ import annotations

import gzip
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from pfp.config import BUILTIN_DATA, ConfigError, DataConfig
from pfp.errors import CoreError
from pfp.imports import call

log = logging.getLogger(__name__)

__all__ = [
    "DataNotFoundError",
    "DataFormatError",
    "DataBundle",
    "InMemoryImageDataset",
    "build_data",
    "infer_num_classes",
    "make_loader",
    "split_calibration",
    "read_idx",
    "FASHION_MNIST_SEARCH_PATHS",
    "CIFAR10_SEARCH_PATHS",
    "IMAGENET_SEARCH_PATHS",
]

FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Places tried after cfg.root. Module-level lists so tests (and site setups) can change them.
FASHION_MNIST_SEARCH_PATHS: list[Path] = [
    Path("/usr/share/datasets/fashion-mnist"),  # Debian package dataset-fashion-mnist
    Path("data/FashionMNIST/raw"),  # torchvision's download layout under ./data
]
CIFAR10_SEARCH_PATHS: list[Path] = [Path("data")]  # each holds cifar-10-batches-py/
IMAGENET_SEARCH_PATHS: list[Path] = [Path("data/imagenet")]  # each holds train/ and val/

_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = ["test_batch"]


class DataNotFoundError(CoreError, FileNotFoundError):
    """A data set is not on disk in any of the places searched."""


class DataFormatError(CoreError, ValueError):
    """A data file exists but is corrupt, truncated or not in the expected format."""


@dataclass
class DataBundle:
    """Train and test sets plus what a model needs to know about their images."""

    train: Dataset
    test: Dataset
    num_classes: int | None  # None: a user's data set, counted only where classification needs it
    in_channels: int
    input_size: int  # side of the (square) images the model sees; a user's data: the last dimension
    name: str
    classes: list[str] = field(default_factory=list)
    input_shape: tuple[int, ...] | None = None  # one input without the batch dimension, when not square images

    @property
    def example_shape(self) -> tuple[int, ...]:
        """The shape of one input, without the batch dimension (what the example input is made of)."""
        return self.input_shape or (self.in_channels, self.input_size, self.input_size)


# --------------------------------------------------------------------------- in-memory sets


class InMemoryImageDataset(Dataset):
    """Images held as one [N, C, H, W] tensor; returns (normalised float CxHxW, int label).

    uint8 images are scaled to [0, 1] then normalised with mean/std; float images are
    returned as stored (mean/std still applied when given). When augment is set, each
    sample gets a random crop after zero-padding by `pad` pixels and a random horizontal
    flip, drawn from torch's global RNG (DataLoader seeds it per worker).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: bool = False,
        pad: int = 0,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.targets = labels.to(torch.int64)
        c = images.shape[1]
        self._mean = torch.tensor(mean if mean is not None else [0.0] * c, dtype=torch.float32).view(1, c, 1, 1)
        self._std = torch.tensor(std if std is not None else [1.0] * c, dtype=torch.float32).view(1, c, 1, 1)
        self.augment = augment
        self.pad = pad
        self.classes = list(classes) if classes is not None else []

    def __len__(self) -> int:
        return len(self.images)

    def _batch(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.images[idx]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.augment:
            x = _random_crop_flip(x, self.pad)
        return (x - self._mean) / self._std

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self._batch(torch.tensor([int(i)]))
        return x[0], int(self.targets[i])

    # DataLoader (and Subset) fetch a whole batch through this when present: one
    # vectorised augmentation per batch instead of one per image.
    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        x = self._batch(idx)
        return list(zip(x.unbind(0), self.targets[idx].tolist()))


def _random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop of each image after zero-padding by pad, then a random horizontal flip."""
    n, c, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,))
        ox = torch.randint(0, 2 * pad + 1, (n,))
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # [n,1,h,1]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # [n,1,1,w]
        b = torch.arange(n)[:, None, None, None]
        ch = torch.arange(c)[None, :, None, None]
        x = padded[b, ch, rows, cols]
    flip = (torch.rand(n) < 0.5).view(n, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """Resize a uint8 [N,C,H,W] tensor to size x size once, in chunks to bound memory."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


# --------------------------------------------------------------------------- Fashion-MNIST


def _open_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataFormatError(f"{path}: cannot read ({type(e).__name__}: {e}); the file is corrupt or truncated") from None


def read_idx(path: str | Path, expect_dims: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or not) into a numpy array.

    Checks the magic number (type 0x08, expect_dims dimensions) and that the payload
    has exactly the size the header announces.
    """
    path = Path(path)
    raw = _open_maybe_gz(path)
    if len(raw) < 4:
        raise DataFormatError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08 or ndim != expect_dims:
        magic = int.from_bytes(raw[0:4], "big")
        want = 0x0800 + expect_dims
        raise DataFormatError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{want:08x} (unsigned bytes, {expect_dims}-d)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    want = int(np.prod(dims))
    got = len(raw) - header
    if got != want:
        raise DataFormatError(f"{path}: IDX header says {dims} ({want} bytes of data) but the file holds {got}; truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


def _fashion_mnist_candidates(root: str | None) -> list[Path]:
    places: list[Path] = []
    if root is not None:
        places += [Path(root), Path(root) / "FashionMNIST" / "raw"]
    places += [Path(p) for p in FASHION_MNIST_SEARCH_PATHS]
    return places


def _locate_fashion_mnist(root: str | None) -> tuple[dict[str, Path] | None, list[Path]]:
    places = _fashion_mnist_candidates(root)
    for folder in places:
        found = {k: _find_idx_file(folder, stem) for k, stem in _FMNIST_FILES.items()}
        if all(found.values()):
            return found, places  # type: ignore[return-value]
    return None, places


def _load_fashion_mnist(cfg: DataConfig) -> DataBundle:
    files, places = _locate_fashion_mnist(cfg.root)
    if files is None and cfg.download:
        import torchvision

        dl_root = Path(cfg.root or "data")
        log.info("downloading Fashion-MNIST into %s", dl_root)
        for train in (True, False):
            torchvision.datasets.FashionMNIST(str(dl_root), train=train, download=True)
        files = {k: _find_idx_file(dl_root / "FashionMNIST" / "raw", s) for k, s in _FMNIST_FILES.items()}  # type: ignore[misc]
        if not all(files.values()):
            files = None
    if files is None:
        looked = ", ".join(str(p) for p in places)
        raise DataNotFoundError(
            f"Fashion-MNIST not found (need {', '.join(_FMNIST_FILES.values())}, optionally .gz); looked in: {looked}. "
            "Get it with 'apt-get install dataset-fashion-mnist', or set data.root to a folder holding the IDX files, "
            "or set data.download: true on a machine that is online"
        )
    log.info("Fashion-MNIST from %s", files["train_images"].parent)

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, lab_path = files[f"{split}_images"], files[f"{split}_labels"]
        imgs = read_idx(img_path, 3)
        labs = read_idx(lab_path, 1)
        if len(imgs) != len(labs):
            raise DataFormatError(f"{img_path} holds {len(imgs)} images but {lab_path} holds {len(labs)} labels")
        if labs.size and labs.max() > 9:
            raise DataFormatError(f"{lab_path}: label {int(labs.max())} out of range 0..9")
        return torch.from_numpy(imgs.copy()).unsqueeze(1), torch.from_numpy(labs.astype(np.int64))

    (xtr, ytr), (xte, yte) = load("train"), load("test")
    return _in_memory_bundle(
        cfg, "fashion_mnist", xtr, ytr, xte, yte, FASHION_MNIST_MEAN, FASHION_MNIST_STD, pad=2,
        num_classes=10, classes=FASHION_MNIST_CLASSES,
    )  # fmt: skip


def _in_memory_bundle(
    cfg: DataConfig,
    name: str,
    xtr: torch.Tensor,
    ytr: torch.Tensor,
    xte: torch.Tensor,
    yte: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    pad: int,
    num_classes: int,
    classes: Sequence[str],
) -> DataBundle:
    # Limits slice the tensors (same first-N images as a Subset) before resizing,
    # so quick runs neither resize nor keep the rest.
    if cfg.limit_train is not None:
        xtr, ytr = xtr[: cfg.limit_train], ytr[: cfg.limit_train]
    if cfg.limit_test is not None:
        xte, yte = xte[: cfg.limit_test], yte[: cfg.limit_test]
    size = cfg.input_size or int(xtr.shape[-1])
    xtr, xte = _resize_uint8(xtr, size), _resize_uint8(xte, size)
    train = InMemoryImageDataset(xtr, ytr, mean, std, augment=cfg.augment, pad=pad, classes=classes)
    test = InMemoryImageDataset(xte, yte, mean, std, augment=False, classes=classes)
    return DataBundle(train, test, num_classes, int(xtr.shape[1]), size, name, list(classes))


# --------------------------------------------------------------------------- CIFAR-10


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataFormatError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(entry, dict) or "data" not in entry or not ("labels" in entry or "fine_labels" in entry):
        raise DataFormatError(f"{path}: not a CIFAR batch (expected a dict with 'data' and 'labels')")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = list(entry["labels"] if "labels" in entry else entry["fine_labels"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataFormatError(f"{path}: data of shape {data.shape} with {len(labels)} labels, expected [N, 3072] and N labels")
    return data, labels


def _load_cifar10(cfg: DataConfig) -> DataBundle:
    # Read torchvision's cifar-10-batches-py pickles directly rather than through
    # torchvision.datasets.CIFAR10: that class re-hashes every file on each load and
    # yields PIL images; here the set lands in one uint8 tensor like Fashion-MNIST.
    places = ([Path(cfg.root)] if cfg.root is not None else []) + [Path(p) for p in CIFAR10_SEARCH_PATHS]

    def complete(base: Path) -> bool:
        folder = base / _CIFAR_FOLDER
        return all((folder / f).is_file() for f in _CIFAR_TRAIN + _CIFAR_TEST)

    base = next((p for p in places if complete(p)), None)
    if base is None and cfg.download:
        import torchvision

        base = Path(cfg.root or "data")
        log.info("downloading CIFAR-10 into %s", base)
        torchvision.datasets.CIFAR10(str(base), train=True, download=True)
    if base is None or not complete(base):
        looked = ", ".join(str(p / _CIFAR_FOLDER) for p in places)
        raise DataNotFoundError(
            f"CIFAR-10 not found (need {_CIFAR_FOLDER}/data_batch_1..5 and test_batch); looked in: {looked}. "
            "Set data.root to the folder that holds cifar-10-batches-py, or set data.download: true on a machine that is online"
        )
    folder = base / _CIFAR_FOLDER
    log.info("CIFAR-10 from %s", folder)

    def load(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_cifar_batch(folder / n) for n in names]
        data = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(lab, dtype=np.int64) for _, lab in parts])
        return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels)

    xtr, ytr = load(_CIFAR_TRAIN)
    xte, yte = load(_CIFAR_TEST)
    classes = [str(i) for i in range(10)]
    meta = folder / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as f:
                classes = list(pickle.load(f, encoding="latin1")["label_names"])
        except Exception as e:  # noqa: BLE001
            raise DataFormatError(f"{meta}: not a readable CIFAR meta file ({type(e).__name__}: {e})") from None
    for path, y in ((folder / "data_batch_*", ytr), (folder / "test_batch", yte)):
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataFormatError(f"{path}: labels outside 0..{len(classes) - 1}")
    return _in_memory_bundle(cfg, "cifar10", xtr, ytr, xte, yte, CIFAR10_MEAN, CIFAR10_STD, pad=4, num_classes=len(classes), classes=classes)


# --------------------------------------------------------------------------- ImageFolder / ImageNet


def _load_imagefolder(cfg: DataConfig) -> DataBundle:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    places = [Path(cfg.root)] if cfg.root is not None else []
    if cfg.name == "imagenet":
        places += [Path(p) for p in IMAGENET_SEARCH_PATHS]
    base = next((p for p in places if (p / "train").is_dir() and (p / "val").is_dir()), None)
    if base is None:
        looked = ", ".join(str(p) for p in places) or "nowhere (data.root is not set)"
        raise DataNotFoundError(
            f"{cfg.name}: no folder with train/ and val/ class sub-folders; looked in: {looked}. "
            "Set data.root to a folder laid out as root/train/<class>/*.jpg and root/val/<class>/*.jpg"
        )
    size = cfg.input_size or 224
    resize = int(round(size / 0.875))  # 256 for 224, the usual ratio
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    eval_tf = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), normalize])
    train_tf = (
        T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        if cfg.augment
        else eval_tf
    )
    sets = {}
    for split, tf in (("train", train_tf), ("val", eval_tf)):
        try:
            sets[split] = ImageFolder(str(base / split), transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataNotFoundError(f"{cfg.name}: {base / split}: {e} (expected one sub-folder of images per class)") from None
    if sets["train"].classes != sets["val"].classes:
        only_t = sorted(set(sets["train"].classes) - set(sets["val"].classes))[:5]
        only_v = sorted(set(sets["val"].classes) - set(sets["train"].classes))[:5]
        raise DataFormatError(
            f"{cfg.name}: {base}/train and {base}/val have different classes "
            f"(only in train: {only_t}, only in val: {only_v}); a flat val/ must first be sorted into class folders"
        )
    train, test = _limit(sets["train"], cfg.limit_train), _limit(sets["val"], cfg.limit_test)
    classes = list(sets["train"].classes)
    return DataBundle(train, test, len(classes), 3, size, cfg.name, classes)


def _limit(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):  # type: ignore[arg-type]
        return ds
    return Subset(ds, range(n))


# --------------------------------------------------------------------------- synthetic


def _load_synthetic(cfg: DataConfig, seed: int = 0) -> DataBundle:
    # Class-dependent smooth pattern + unit noise: a small CNN separates the classes
    # within a few epochs, and the same config always yields the same tensors.
    g = torch.Generator().manual_seed(seed)
    k, c, s = cfg.synthetic_classes, cfg.synthetic_channels, cfg.input_size or cfg.synthetic_size
    coarse = torch.randn(k, c, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    protos = protos / protos.flatten(1).std(dim=1).clamp_min(1e-6).view(k, 1, 1, 1)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        x = protos[y] + torch.randn(n, c, s, s, generator=g)
        return x, y

    xtr, ytr = make(cfg.synthetic_train)
    xte, yte = make(cfg.synthetic_test)
    if cfg.limit_train is not None:
        xtr, ytr = xtr[: cfg.limit_train], ytr[: cfg.limit_train]
    if cfg.limit_test is not None:
        xte, yte = xte[: cfg.limit_test], yte[: cfg.limit_test]
    classes = [f"class{i}" for i in range(k)]
    train = InMemoryImageDataset(xtr, ytr, classes=classes)
    test = InMemoryImageDataset(xte, yte, classes=classes)
    return DataBundle(train, test, k, c, s, "synthetic", classes)


# --------------------------------------------------------------------------- a user's data


def _as_dataset(obj: object, which: str, path: str) -> Dataset:
    if isinstance(obj, DataLoader):
        return obj.dataset  # the pipeline makes its own loaders (data.batch_size, seeded shuffling)
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        return obj  # type: ignore[return-value]
    raise DataFormatError(f"data.name: {path} returned a {type(obj).__name__} as the {which} set, "
                          "not a Dataset or DataLoader")


def _load_custom(cfg: DataConfig) -> DataBundle:
    """(train, test) from the user's callable; the input shape from the first training sample."""
    out = call(cfg.name, "data.name", **cfg.kwargs)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise DataFormatError(f"data.name: {cfg.name} returned a {type(out).__name__}, not a (train, test) pair")
    train, test = (_as_dataset(obj, which, cfg.name) for obj, which in zip(out, ("train", "test")))
    train, test = _limit(train, cfg.limit_train), _limit(test, cfg.limit_test)
    if len(train) == 0 or len(test) == 0:  # type: ignore[arg-type]
        raise DataFormatError(f"data.name: {cfg.name} returned an empty {'train' if len(train) == 0 else 'test'} set")  # type: ignore[arg-type]
    sample = train[0]
    if not isinstance(sample, (tuple, list)) or len(sample) < 2 or not isinstance(sample[0], torch.Tensor):
        raise DataFormatError(f"data.name: a training sample of {cfg.name} is a {type(sample).__name__}, "
                              "not an (input tensor, target) pair")
    shape = tuple(int(d) for d in sample[0].shape)
    if not shape:
        raise DataFormatError(f"data.name: the inputs of {cfg.name} are scalars; a model needs at least [features]")
    inner = train
    while isinstance(inner, Subset):
        inner = inner.dataset
    classes = [str(c) for c in getattr(inner, "classes", None) or []]
    return DataBundle(train, test, None, shape[0], shape[-1], cfg.name, classes, input_shape=shape)


def infer_num_classes(data: DataBundle) -> int:
    """The number of classes of a classification data set: its `classes`, else 1 + the largest label."""
    if data.num_classes is not None:
        return data.num_classes
    if data.classes:
        return len(data.classes)
    top = -1
    for ds in (data.train, data.test):
        for i in range(len(ds)):  # type: ignore[arg-type]
            y = ds[i][1]
            if isinstance(y, torch.Tensor) and y.numel() == 1 and not y.is_floating_point():
                y = int(y)
            if not isinstance(y, int) or isinstance(y, bool):
                raise DataFormatError(
                    f"data.name: {data.name}: sample {i} has target {type(y).__name__}, not an integer class label; "
                    "classification needs one, or name your task in the config's `task` field")
            top = max(top, y)
    return top + 1


# --------------------------------------------------------------------------- public


def build_data(cfg: DataConfig) -> DataBundle:
    """Load the train and test sets that cfg names, with transforms and limits applied.

    Raises DataNotFoundError (naming every place searched) when the data is not on disk,
    DataFormatError when a file is there but unreadable.
    """
    if cfg.name == "fashion_mnist":
        return _load_fashion_mnist(cfg)
    if cfg.name == "cifar10":
        return _load_cifar10(cfg)
    if cfg.name in ("imagefolder", "imagenet"):
        return _load_imagefolder(cfg)
    if cfg.name == "synthetic":
        return _load_synthetic(cfg)
    if cfg.name not in BUILTIN_DATA:
        return _load_custom(cfg)
    raise ValueError(f"unknown data set {cfg.name!r}")  # pydantic rejects these first


def make_loader(
    ds: Dataset,
    batch_size: int,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over ds whose order depends only on seed.

    With distributed=True and torch.distributed initialised, each rank gets its shard
    through a DistributedSampler; call loader.sampler.set_epoch(epoch) every epoch so
    shuffling changes between epochs. Otherwise a seeded generator drives the shuffle.
    """
    import torch.distributed as dist

    common = dict(
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        drop_last=drop_last,
    )
    if distributed and dist.is_available() and dist.is_initialized():
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, shuffle=shuffle, seed=seed, drop_last=drop_last)
        return DataLoader(ds, sampler=sampler, **common)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, shuffle=shuffle, generator=g, **common)


def split_calibration(ds: Dataset, n_calib: int, n_holdout: int, seed: int) -> tuple[Subset, Subset]:
    """Two disjoint random subsets of ds: (calibration set S, held-out set), fixed by seed."""
    n = len(ds)  # type: ignore[arg-type]
    if n_calib < 1 or n_holdout < 0:
        raise ValueError(f"need n_calib >= 1 and n_holdout >= 0, got {n_calib} and {n_holdout}")
    if n_calib + n_holdout > n:
        raise ConfigError(f"data set has {n} points, fewer than the {n_calib} calibration + {n_holdout} held-out points asked for")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(ds, perm[:n_calib]), Subset(ds, perm[n_calib : n_calib + n_holdout])


def data_fingerprint(ds: Dataset) -> str:
    """A short sha256 identifying a data set's content: image bytes and labels for in-memory
    sets, the sorted (path, label) list for folder sets. Subsets hash their indices too."""
    import hashlib

    h = hashlib.sha256()
    while isinstance(ds, Subset):
        h.update(np.asarray(ds.indices, dtype=np.int64).tobytes())
        ds = ds.dataset
    if isinstance(ds, InMemoryImageDataset):
        h.update(str(tuple(ds.images.shape)).encode())
        h.update(ds.images.contiguous().numpy().tobytes())
        h.update(ds.targets.numpy().tobytes())
    elif isinstance(getattr(ds, "tensors", None), tuple):  # TensorDataset: a user's generated data
        for t in ds.tensors:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    elif hasattr(ds, "samples"):
        for path, label in sorted(ds.samples):
            h.update(f"{path}\t{label}\n".encode())
    else:
        h.update(f"{type(ds).__name__}:{len(ds)}".encode())  # type: ignore[arg-type]
    return h.hexdigest()[:16]
