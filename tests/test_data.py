"""Tests for pfp.data: real Fashion-MNIST, on-disk formats, errors, loaders, splits."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pfp import data as D
from pfp.config import DataConfig
from pfp.data import (
    DataBundle,
    DataFormatError,
    DataNotFoundError,
    build_data,
    make_loader,
    split_calibration,
)

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_fake_fmnist(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = False) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    return {name: write_idx(folder / name, arr, gz=gz) for name, arr in arrays.items()} | {"arrays": arrays}


@pytest.fixture
def no_default_paths(monkeypatch, tmp_path):
    """Point the default search paths at empty folders so only cfg.root counts."""
    monkeypatch.setattr(D, "FASHION_MNIST_SEARCH_PATHS", [tmp_path / "nowhere-fmnist"])
    monkeypatch.setattr(D, "CIFAR10_SEARCH_PATHS", [tmp_path / "nowhere-cifar"])
    monkeypatch.setattr(D, "IMAGENET_SEARCH_PATHS", [tmp_path / "nowhere-imagenet"])


# --------------------------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist() -> DataBundle:
    if not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    return build_data(DataConfig(name="fashion_mnist", augment=False))


def test_real_fashion_mnist_shapes_and_labels(fmnist):
    assert (len(fmnist.train), len(fmnist.test)) == (60000, 10000)
    assert (fmnist.num_classes, fmnist.in_channels, fmnist.input_size, fmnist.name) == (10, 1, 28, "fashion_mnist")
    x, y = fmnist.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert isinstance(y, int)
    # Fashion-MNIST is balanced: 6000 / 1000 of each class.
    assert torch.bincount(fmnist.train.targets, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(fmnist.test.targets, minlength=10).tolist() == [1000] * 10
    assert fmnist.train.images.dtype == torch.uint8


def test_real_fashion_mnist_is_normalised(fmnist):
    batch = next(iter(make_loader(fmnist.train, 4096, shuffle=True, seed=1)))[0]
    assert abs(batch.mean().item()) < 0.05
    assert abs(batch.std().item() - 1.0) < 0.05
    # Whole train set: the constants are the set's own statistics.
    raw = fmnist.train.images.float() / 255
    assert raw.mean().item() == pytest.approx(0.2860, abs=5e-4)
    assert raw.std().item() == pytest.approx(0.3530, abs=5e-4)


def test_real_fashion_mnist_resize_and_limits():
    if not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    b = build_data(DataConfig(name="fashion_mnist", input_size=32, limit_train=100, limit_test=50))
    assert (len(b.train), len(b.test), b.input_size) == (100, 50, 32)
    assert b.train[0][0].shape == (1, 32, 32)
    assert b.test[3][0].shape == (1, 32, 32)


# --------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip_from_root(tmp_path, no_default_paths, gz):
    files = write_fake_fmnist(tmp_path / "fm", gz=gz)
    b = build_data(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm"), augment=False))
    assert (len(b.train), len(b.test)) == (20, 10)
    arr = files["arrays"]
    assert torch.equal(b.train.images[:, 0], torch.from_numpy(arr["train-images-idx3-ubyte"].astype(np.uint8)))
    assert b.test.targets.tolist() == arr["t10k-labels-idx1-ubyte"].tolist()
    # Values are (x/255 - mean) / std.
    x, _ = b.train[5]
    want = (arr["train-images-idx3-ubyte"][5] / 255.0 - 0.2860) / 0.3530
    assert torch.allclose(x[0], torch.from_numpy(want).float(), atol=1e-5)


def test_idx_torchvision_layout_under_root(tmp_path, no_default_paths):
    write_fake_fmnist(tmp_path / "r" / "FashionMNIST" / "raw", gz=True)
    b = build_data(DataConfig(name="fashion_mnist", root=str(tmp_path / "r")))
    assert len(b.train) == 20


def test_missing_fashion_mnist_names_every_place(tmp_path, no_default_paths):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError) as ei:
        build_data(DataConfig(name="fashion_mnist", root=str(empty)))
    msg = str(ei.value)
    assert "\n" not in msg
    assert "Fashion-MNIST" in msg
    for place in (empty, empty / "FashionMNIST" / "raw", tmp_path / "nowhere-fmnist"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "data.root" in msg and "download" in msg
    assert isinstance(ei.value, FileNotFoundError)


def test_default_search_path_finds_debian_package(monkeypatch):
    if not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    files, places = D._locate_fashion_mnist(None)
    assert files is not None and files["train_images"].parent == DEBIAN_FMNIST
    assert places[0] == DEBIAN_FMNIST


def test_truncated_idx_names_file(tmp_path, no_default_paths):
    files = write_fake_fmnist(tmp_path / "fm")
    bad = files["train-images-idx3-ubyte"]
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DataFormatError, match="train-images-idx3-ubyte.*truncated"):
        build_data(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm")))


def test_truncated_gzip_names_file(tmp_path, no_default_paths):
    files = write_fake_fmnist(tmp_path / "fm", gz=True)
    bad = files["t10k-images-idx3-ubyte"]
    bad.write_bytes(bad.read_bytes()[:-30])
    with pytest.raises(DataFormatError) as ei:
        build_data(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm")))
    assert str(bad) in str(ei.value)


def test_bad_magic_names_file(tmp_path, no_default_paths):
    files = write_fake_fmnist(tmp_path / "fm")
    bad = files["train-labels-idx1-ubyte"]
    raw = bytearray(bad.read_bytes())
    raw[3] = 3  # claims 3 dimensions
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataFormatError, match="train-labels-idx1-ubyte.*magic"):
        build_data(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm")))


def test_image_label_count_mismatch(tmp_path, no_default_paths):
    files = write_fake_fmnist(tmp_path / "fm")
    write_idx(files["train-labels-idx1-ubyte"], np.arange(19) % 10)
    with pytest.raises(DataFormatError, match="20 images.*19 labels"):
        build_data(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm")))


# --------------------------------------------------------------------------- augmentation


def test_augmentation_crops_with_zero_padding_and_flips():
    # A constant white image: any crop that reaches the padding shows black columns/rows.
    imgs = torch.full((64, 1, 8, 8), 255, dtype=torch.uint8)
    ds = D.InMemoryImageDataset(imgs, torch.zeros(64), mean=[0.5], std=[0.5], augment=True, pad=2)
    torch.manual_seed(0)
    x = torch.stack([s[0] for s in ds.__getitems__(range(64))])
    assert x.shape == (64, 1, 8, 8)
    assert set(x.unique().tolist()) <= {-1.0, 1.0}
    assert (x == -1).any(), "no sample touched the padding"
    assert (x == 1).all(dim=(1, 2, 3)).any(), "no sample was an uncropped shift"
    # Flip: an image with a bright left column must sometimes appear mirrored.
    img = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    img[..., 0] = 255
    flipped = [D._random_crop_flip(img.float() / 255, pad=0)[0, 0, 0, -1].item() for _ in range(50)]
    assert 0 < sum(flipped) < 50


def test_augmentation_off_for_test_set_and_deterministic_when_seeded(tmp_path, no_default_paths):
    write_fake_fmnist(tmp_path / "fm")
    b = build_data(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm"), augment=True))
    assert b.train.augment and not b.test.augment
    assert torch.equal(b.test[0][0], b.test[0][0])
    torch.manual_seed(3)
    a = b.train[1][0]
    torch.manual_seed(3)
    assert torch.equal(a, b.train[1][0])
    # Single-item and batched paths agree in shape.
    assert b.train.__getitems__([0, 1])[0][0].shape == a.shape


# --------------------------------------------------------------------------- CIFAR-10


def write_fake_cifar(root: Path, per_batch: int = 3, n_test: int = 4) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        entry = {
            "batch_label": f"fake {name}",
            "labels": [int(v) for v in rng.integers(0, 10, n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        written[name] = entry
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return written


def test_cifar_fake_folder_loads(tmp_path, no_default_paths):
    written = write_fake_cifar(tmp_path / "c")
    b = build_data(DataConfig(name="cifar10", root=str(tmp_path / "c"), augment=False))
    assert (len(b.train), len(b.test), b.num_classes, b.in_channels, b.input_size) == (15, 4, 10, 3, 32)
    assert b.classes[0] == "airplane"
    want_labels = sum((written[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert b.train.targets.tolist() == want_labels
    # Channel-planar rows: the first 1024 bytes are R, row-major 32x32.
    row = written["data_batch_2"]["data"][1]
    x, y = b.train[3 + 1]
    assert y == written["data_batch_2"]["labels"][1]
    r = torch.from_numpy(row[:1024].reshape(32, 32).astype(np.float32)) / 255
    assert torch.allclose(x[0], (r - 0.4914) / 0.2470, atol=1e-5)
    bl = torch.from_numpy(row[2048:].reshape(32, 32).astype(np.float32)) / 255
    assert torch.allclose(x[2], (bl - 0.4465) / 0.2616, atol=1e-5)


def test_cifar_fake_folder_matches_torchvision(tmp_path, no_default_paths, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    write_fake_cifar(tmp_path / "c")
    # torchvision checks md5 sums of the real files; the format is what is compared here.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    tv = torchvision.datasets.CIFAR10(str(tmp_path / "c"), train=False, download=False)
    b = build_data(DataConfig(name="cifar10", root=str(tmp_path / "c"), augment=False))
    assert torch.equal(b.test.images, torch.from_numpy(tv.data).permute(0, 3, 1, 2))
    assert b.test.targets.tolist() == tv.targets
    assert b.classes == tv.classes


def test_cifar_augmentation_and_resize(tmp_path, no_default_paths):
    write_fake_cifar(tmp_path / "c")
    b = build_data(DataConfig(name="cifar10", root=str(tmp_path / "c"), input_size=40, limit_train=5))
    assert len(b.train) == 5 and b.train.augment and b.train.pad == 4
    assert b.train[0][0].shape == (3, 40, 40) and b.input_size == 40


def test_cifar_missing_lists_places(tmp_path, no_default_paths):
    with pytest.raises(DataNotFoundError) as ei:
        build_data(DataConfig(name="cifar10", root=str(tmp_path / "none")))
    msg = str(ei.value)
    assert str(tmp_path / "none" / "cifar-10-batches-py") in msg
    assert str(tmp_path / "nowhere-cifar" / "cifar-10-batches-py") in msg
    assert "download" in msg


def test_cifar_corrupt_batch_names_file(tmp_path, no_default_paths):
    write_fake_cifar(tmp_path / "c")
    bad = tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(DataFormatError, match="data_batch_3"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path / "c")))


# --------------------------------------------------------------------------- ImageFolder


def write_imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 3, size=(40, 48)) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")


@pytest.mark.parametrize("name", ["imagefolder", "imagenet"])
def test_imagefolder_loads(tmp_path, no_default_paths, name):
    write_imagefolder(tmp_path / "inet")
    b = build_data(DataConfig(name=name, root=str(tmp_path / "inet"), input_size=32, limit_test=4))
    assert (b.num_classes, b.in_channels, b.input_size, b.name) == (3, 3, 32, name)
    assert b.classes == ["cat", "dog", "eel"]
    assert len(b.train) == 9 and len(b.test) == 4
    x, y = b.train[4]
    assert x.shape == (3, 32, 32) and y == 1
    xv, _ = b.test[0]
    assert xv.shape == (3, 32, 32)
    batch = next(iter(make_loader(b.train, 4, shuffle=True)))
    assert batch[0].shape == (4, 3, 32, 32)


def test_imagefolder_default_size_is_224(tmp_path, no_default_paths):
    write_imagefolder(tmp_path / "inet", per_class=1)
    b = build_data(DataConfig(name="imagefolder", root=str(tmp_path / "inet"), augment=False))
    assert b.input_size == 224 and b.test[0][0].shape == (3, 224, 224)


def test_imagefolder_missing_and_mismatched(tmp_path, no_default_paths):
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "half")):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path / "half")))
    with pytest.raises(DataNotFoundError, match="data.root"):
        build_data(DataConfig(name="imagefolder"))
    write_imagefolder(tmp_path / "mm", per_class=1)
    import shutil

    shutil.rmtree(tmp_path / "mm" / "val" / "eel")
    with pytest.raises(DataFormatError, match="different classes"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path / "mm")))


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_shaped():
    cfg = DataConfig(name="synthetic", synthetic_train=100, synthetic_test=40, synthetic_classes=4,
                     synthetic_channels=2, synthetic_size=12)  # fmt: skip
    a, b = build_data(cfg), build_data(cfg)
    assert (a.num_classes, a.in_channels, a.input_size, len(a.train), len(a.test)) == (4, 2, 12, 100, 40)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.targets, b.test.targets)
    assert not torch.equal(a.train.images[:40], a.test.images)
    assert a.train[0][0].shape == (2, 12, 12)
    assert set(a.train.targets.tolist()) == {0, 1, 2, 3}


def test_synthetic_is_learnable():
    b = build_data(DataConfig(name="synthetic", synthetic_train=400, synthetic_test=200))
    x, y = b.train.images.flatten(1), b.train.targets
    means = torch.stack([x[y == k].mean(0) for k in range(b.num_classes)])
    pred = torch.cdist(b.test.images.flatten(1), means).argmin(1)
    assert (pred == b.test.targets).float().mean().item() > 0.8


def test_synthetic_limits():
    b = build_data(DataConfig(name="synthetic", limit_train=10, limit_test=5))
    assert (len(b.train), len(b.test)) == (10, 5)


# --------------------------------------------------------------------------- loaders and splits


def test_make_loader_seeded_order():
    b = build_data(DataConfig(name="synthetic", synthetic_train=64, synthetic_test=8))

    def order(seed):
        return torch.cat([y for _, y in make_loader(b.train, 16, shuffle=True, seed=seed)])

    def first_batch(seed):
        return next(iter(make_loader(b.train, 16, shuffle=True, seed=seed)))[0]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))
    assert torch.equal(order(5), order(5))
    plain = make_loader(b.train, 16, shuffle=False)
    assert torch.equal(torch.cat([y for _, y in plain]), b.train.targets)
    assert len(make_loader(b.train, 24, shuffle=False, drop_last=True)) == 2
    assert len(make_loader(b.train, 24, shuffle=False)) == 3


def test_make_loader_distributed_flag_without_process_group():
    b = build_data(DataConfig(name="synthetic", synthetic_train=32, synthetic_test=8))
    loader = make_loader(b.train, 8, shuffle=True, distributed=True)
    assert not isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler)
    assert len(loader) == 4


def test_make_loader_distributed_sampler(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    b = build_data(DataConfig(name="synthetic", synthetic_train=32, synthetic_test=8))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader = make_loader(b.train, 8, shuffle=True, seed=4, distributed=True)
        assert isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler)
        assert loader.sampler.seed == 4
        assert sorted(torch.cat([y for _, y in loader]).tolist()) == sorted(b.train.targets.tolist())
    finally:
        dist.destroy_process_group()


def test_loader_with_workers():
    b = build_data(DataConfig(name="synthetic", synthetic_train=32, synthetic_test=8))
    loader = make_loader(b.train, 8, shuffle=True, workers=1)
    assert isinstance(loader, DataLoader)
    assert sum(len(y) for _, y in loader) == 32


def test_split_calibration_disjoint_and_deterministic():
    b = build_data(DataConfig(name="synthetic", synthetic_train=100, synthetic_test=8))
    s, h = split_calibration(b.train, 30, 20, seed=0)
    assert (len(s), len(h)) == (30, 20)
    assert not set(s.indices) & set(h.indices)
    s2, h2 = split_calibration(b.train, 30, 20, seed=0)
    assert list(s.indices) == list(s2.indices) and list(h.indices) == list(h2.indices)
    s3, _ = split_calibration(b.train, 30, 20, seed=1)
    assert list(s.indices) != list(s3.indices)
    x, y = s[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    full, empty = split_calibration(b.train, 100, 0, seed=0)
    assert sorted(full.indices) == list(range(100)) and len(empty) == 0


def test_split_calibration_too_small():
    b = build_data(DataConfig(name="synthetic", synthetic_train=10, synthetic_test=8))
    with pytest.raises(ValueError, match="10 points"):
        split_calibration(b.train, 8, 3, seed=0)
    with pytest.raises(ValueError):
        split_calibration(b.train, 0, 3, seed=0)
