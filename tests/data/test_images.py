"""Image dataset loaders on small fake trees in the exact on-disk formats torchvision reads, the missing-file
errors, and the idx(.gz) converter with its CLI command."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import (
    idx_bytes,
    mnist_arrays,
    write_celeba_tree,
    write_celebamask_tree,
    write_cifar_tree,
    write_idx_tree,
)
from PIL import Image

from sqaudio.config import DataConfig
from sqaudio.data.images import (
    CELEBA_TEXT,
    IDX_FILES,
    build_image_dataset,
    build_image_datasets,
    convert_idx_gz,
    missing_files,
)
from sqaudio.errors import UserError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("kind,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_splits_and_pixels(tmp_path, kind, folder):
    arrays = mnist_arrays()
    write_idx_tree(tmp_path / folder / "raw", arrays)
    cfg = DataConfig(kind=kind)
    train, test = build_image_datasets(cfg, tmp_path)
    val = build_image_dataset(cfg, tmp_path, "val")
    assert (len(train), len(val), len(test)) == (10, 2, 6)  # reference rule: the last 1/6 of train is val
    assert len(build_image_dataset(cfg, tmp_path, "trainval")) == 12
    images = arrays["train-images-idx3-ubyte"]
    x = train[3]["x"]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and set(train[3]) == {"x"}
    np.testing.assert_allclose(x[0].numpy(), images[3] / 255, atol=1e-7)
    np.testing.assert_allclose(val[0]["x"][0].numpy(), images[10] / 255, atol=1e-7)
    np.testing.assert_allclose(test[5]["x"][0].numpy(), arrays["t10k-images-idx3-ubyte"][5] / 255, atol=1e-7)


def test_cifar10_splits_and_pixels(tmp_path):
    data = write_cifar_tree(tmp_path)
    cfg = DataConfig(kind="cifar10")
    train, test = build_image_datasets(cfg, tmp_path)
    val = build_image_dataset(cfg, tmp_path, "val")
    assert (len(train), len(val), len(test)) == (8, 2, 2)  # reference rule: the last 1/5 of train is val
    rows = np.concatenate([data[f"data_batch_{i}"] for i in range(1, 6)])
    for dataset, row in ((train, rows[3]), (val, rows[9]), (test, data["test_batch"][1])):
        index = {id(train): 3, id(val): 1, id(test): 1}[id(dataset)]
        x = dataset[index]["x"]
        assert x.shape == (3, 32, 32)
        np.testing.assert_allclose(x.numpy(), row.reshape(3, 32, 32) / 255, atol=1e-7)


def test_celeba_partitions_and_centre_crop(tmp_path):
    names = write_celeba_tree(tmp_path)
    cfg = DataConfig(kind="celeba")
    train, test = build_image_datasets(cfg, tmp_path)
    # (torchvision's CelebA cannot hold a split of exactly one image: its index tensor squeezes to 0-d)
    assert (len(train), len(build_image_dataset(cfg, tmp_path, "val")), len(test)) == (3, 2, 2)
    assert len(build_image_dataset(cfg, tmp_path, "trainval")) == 5
    with Image.open(tmp_path / "celeba" / "img_align_celeba" / names[5]) as img:  # first test image
        # centre crop 140 of 178x218: left (178-140)/2 = 19, top (218-140)/2 = 39; then bilinear 64x64
        expected = np.asarray(img.convert("RGB").crop((19, 39, 159, 179)).resize((64, 64), Image.BILINEAR))
    x = test[0]["x"]
    assert x.shape == (3, 64, 64)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected / 255, atol=1e-6)


def test_celebamask_class_maps(tmp_path):
    maps = write_celebamask_tree(tmp_path)
    cfg = DataConfig(kind="celebamask_hq")
    train, test = build_image_datasets(cfg, tmp_path)
    assert (len(train), len(test), len(build_image_dataset(cfg, tmp_path, "trainval"))) == (11, 3, 13)
    x = train[10]["x"]  # numeric order: 10.png is the last one, not the third
    assert x.shape == (64, 64) and x.dtype == torch.long
    np.testing.assert_array_equal(x.numpy(), maps["train"][10][1::2, 1::2])  # nearest: centre of each 2x2 cell
    np.testing.assert_array_equal(test[2]["x"].numpy(), maps["test"][2][1::2, 1::2])


def test_celebamask_bad_maps_are_user_errors(tmp_path):
    write_celebamask_tree(tmp_path, counts=(2, 1, 1))
    folder = tmp_path / "CelebAMask-HQ" / "train_label"
    Image.fromarray(np.full((64, 64, 3), 3, dtype=np.uint8)).save(folder / "0.png")
    Image.fromarray(np.full((64, 64), 19, dtype=np.uint8), mode="L").save(folder / "1.png")
    train = build_image_dataset(DataConfig(kind="celebamask_hq"), tmp_path, "train")
    with pytest.raises(UserError, match="single-channel"):
        train[0]
    with pytest.raises(UserError, match="class id 19"):
        train[1]


@pytest.mark.parametrize("kind,expected", [
    ("mnist", [f"MNIST/raw/{n}" for n in IDX_FILES]),
    ("fashion_mnist", [f"FashionMNIST/raw/{n}" for n in IDX_FILES]),
    ("cifar10", ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/batches.meta"]),
    ("celeba", ["celeba/img_align_celeba/"] + [f"celeba/{n}" for n in CELEBA_TEXT]),
    ("celebamask_hq", ["CelebAMask-HQ/train_label/", "CelebAMask-HQ/test_label/"]),
])
def test_missing_files_are_named(tmp_path, kind, expected):
    assert set(expected) <= set(missing_files(kind, tmp_path))
    with pytest.raises(UserError) as err:
        build_image_datasets(DataConfig(kind=kind), tmp_path)
    assert expected[0] in str(err.value) and str(tmp_path) in str(err.value)


def test_partly_missing_tree_names_only_the_missing_file(tmp_path):
    write_cifar_tree(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert missing_files("cifar10", tmp_path) == ["cifar-10-batches-py/data_batch_3"]
    with pytest.raises(UserError, match="missing cifar-10-batches-py/data_batch_3 "):
        build_image_datasets(DataConfig(kind="cifar10"), tmp_path)


def test_corrupt_and_unknown_inputs_are_user_errors(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for name in IDX_FILES:
        (folder / name).write_bytes(b"not an idx file at all")
    with pytest.raises(UserError, match="cannot read mnist"):
        build_image_datasets(DataConfig(kind="mnist"), tmp_path)
    with pytest.raises(UserError, match="valid: mnist, fashion_mnist"):
        build_image_datasets(DataConfig(kind="svhn"), tmp_path)
    with pytest.raises(UserError, match="unknown split"):
        build_image_dataset(DataConfig(kind="mnist"), tmp_path, "dev")
    with pytest.raises(UserError, match="--data"):
        build_image_datasets(DataConfig(kind="mnist"), "")


# --- converter -----------------------------------------------------------------------------------------------------

def test_converter_writes_torchvision_layout(tmp_path):
    arrays = mnist_arrays(n_train=6, n_test=3, seed=1)
    write_idx_tree(tmp_path / "src", arrays, gz=True)
    rows = convert_idx_gz(tmp_path / "src", tmp_path / "data")
    assert [r["shape"] for r in rows] == [(6, 28, 28), (6,), (3, 28, 28), (3,)]
    for name, array in arrays.items():
        assert (tmp_path / "data" / "FashionMNIST" / "raw" / name).read_bytes() == idx_bytes(array)
    train, test = build_image_datasets(DataConfig(kind="fashion_mnist"), tmp_path / "data")
    assert (len(train), len(test)) == (5, 3)
    np.testing.assert_allclose(test[2]["x"][0].numpy(), arrays["t10k-images-idx3-ubyte"][2] / 255, atol=1e-7)


def test_converter_rejects_bad_sources_without_writing(tmp_path):
    arrays = mnist_arrays(n_train=6, n_test=3)
    arrays["t10k-labels-idx1-ubyte"] = arrays["t10k-labels-idx1-ubyte"][:2]  # 3 images, 2 labels
    write_idx_tree(tmp_path / "src", arrays, gz=True)
    with pytest.raises(UserError, match="one label each"):
        convert_idx_gz(tmp_path / "src", tmp_path / "data")
    assert not (tmp_path / "data").exists()
    with gzip.open(tmp_path / "src" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(arrays["train-images-idx3-ubyte"])[:-5])  # truncated
    with pytest.raises(UserError, match="idx header says"):
        convert_idx_gz(tmp_path / "src", tmp_path / "data")
    (tmp_path / "src" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz"):
        convert_idx_gz(tmp_path / "src", tmp_path / "data")


def test_cli_data_fashion_mnist(tmp_path, cli):
    write_idx_tree(tmp_path / "src", mnist_arrays(n_train=6, n_test=3), gz=True)
    result = cli("data", "fashion-mnist", tmp_path / "src", tmp_path / "data")
    assert result.exit_code == 0, result.output
    assert not missing_files("fashion_mnist", tmp_path / "data")
    result = cli("data", "fashion-mnist", tmp_path / "nowhere", tmp_path / "data2")
    assert result.exit_code == 2 and "train-images-idx3-ubyte.gz" in result.output
    assert not (tmp_path / "data2").exists()


def test_debian_fashion_mnist_converts_and_loads(tmp_path):
    """The real Fashion-MNIST files (Debian dataset-fashion-mnist, which `make test` installs as root): skipped
    where they are absent, except under CI=true, where that is a failure."""
    if not DEBIAN_FASHION.is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI needs the Debian package dataset-fashion-mnist: run `make system`")
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    convert_idx_gz(DEBIAN_FASHION, tmp_path)
    cfg = DataConfig(kind="fashion_mnist")
    train, test = build_image_datasets(cfg, tmp_path)
    assert (len(train), len(build_image_dataset(cfg, tmp_path, "val")), len(test)) == (50000, 10000, 10000)
    x = test[0]["x"]
    assert x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1 and x.std() > 0.1
