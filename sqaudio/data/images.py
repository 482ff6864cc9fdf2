"""Image datasets of the image recipes, read through torchvision's dataset classes, as {"x": tensor} items.

Layouts under the data root (the torchvision root, as `--data ROOT`):
  mnist          MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
  fashion_mnist  FashionMNIST/raw/<same four files>  (`sqaudio data fashion-mnist` converts the Debian package)
  cifar10        cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
  celeba         celeba/img_align_celeba/*.jpg + celeba/{list_eval_partition,list_attr_celeba,identity_CelebA,
                 list_bbox_celeba,list_landmarks_align_celeba}.txt (torchvision's CelebA reads all five)
  celebamask_hq  CelebAMask-HQ/{train,val,test}_label/<n>.png: single-channel PNGs whose pixel values are
                 class ids 0..18 (the face_parsing scripts g_mask.py + g_partition.py of CelebAMask-HQ)

Items: {"x": float (C, H, W) in [0, 1]} for images, {"x": long (H, W) class map} for CelebAMask-HQ.
Splits follow sony/sqvae: "train" is the official training set minus its last 1/6 (MNIST, Fashion-MNIST:
50k of 60k) or 1/5 (CIFAR10: 40k of 50k), which form "val"; CelebA and CelebAMask-HQ use their own
train/valid/test partitions. "trainval" is train + val; "test" the official test set. CelebA images are
centre-cropped to 140x140 and resized to 64x64 (reference), CelebAMask-HQ maps resized to 64x64 (nearest).
File presence is checked (missing files are named); torchvision's MD5 checks are skipped so that re-packed
copies (e.g. Debian's) work.
"""
from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets, transforms

from sqaudio.config import DataConfig
from sqaudio.errors import UserError

SPLITS = ("train", "val", "test", "trainval")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CELEBA_TEXT = ("list_eval_partition.txt", "list_attr_celeba.txt", "identity_CelebA.txt", "list_bbox_celeba.txt",
               "list_landmarks_align_celeba.txt")
CELEBA_CROP, CELEBA_SIZE = 140, 64
CELEBAMASK_CLASSES, CELEBAMASK_SIZE = 19, 64


class Items(Dataset):
    """A view of a torchvision dataset ((image, target) items) as {"x": image} items, optionally a subset.

    Args:
        base: the torchvision dataset.
        indices: the subset of its items (None: all).
    """

    def __init__(self, base: Dataset, indices: range | None = None):
        self.base = base
        self.indices = range(len(base)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.base[self.indices[i]][0]}


class _CIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 checking that its files exist instead of their MD5 sums."""

    def _check_integrity(self) -> bool:
        return all((Path(self.root) / self.base_folder / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class _CelebA(datasets.CelebA):
    """torchvision's CelebA checking that its files exist instead of their MD5 sums."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name in CELEBA_TEXT) and (folder / "img_align_celeba").is_dir()


class CelebAMaskHQ(Dataset):
    """CelebAMask-HQ face-parsing maps ROOT/CelebAMask-HQ/<split>_label/<n>.png as long (size, size) class maps.

    Args:
        root: the data root.
        split: train | val | test (the folders written by CelebAMask-HQ's g_partition.py).
        size: output side (nearest-neighbour resize).
        num_classes: pixel values must be below this.
    """

    base_folder = "CelebAMask-HQ"

    def __init__(self, root: str | Path, split: str, size: int = CELEBAMASK_SIZE, num_classes: int = CELEBAMASK_CLASSES):
        self.folder = Path(root) / self.base_folder / f"{split}_label"
        self.size, self.num_classes = size, num_classes
        self.files = sorted(self.folder.glob("*.png"), key=_numeric_first)
        if not self.files:
            raise UserError(f"no label PNGs in {self.folder} (expected <n>.png class maps)")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        path = self.files[i]
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise UserError(f"{path} is a {img.mode} image; label maps must be single-channel class ids")
            labels = np.asarray(img.resize((self.size, self.size), Image.NEAREST)).astype(np.int64)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise UserError(f"{path} has class id {labels.max()}; expected 0..{self.num_classes - 1}")
        return {"x": torch.from_numpy(labels)}


def _numeric_first(path: Path) -> tuple[int, int, str]:
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def _head_tail(base: Dataset, split: str, val_fraction: float) -> Dataset:
    """The reference's train/val split of an official training set: val is its last `val_fraction`."""
    n = len(base)
    cut = n - round(n * val_fraction)
    indices = {"train": range(0, cut), "val": range(cut, n)}.get(split)
    return Items(base, indices)


def _open_mnist_like(cls: type, val_fraction: float) -> Callable[[Path, str, bool], Dataset]:
    def open_split(root: Path, split: str, download: bool) -> Dataset:
        base = cls(str(root), train=split != "test", transform=transforms.ToTensor(), download=download)
        return _head_tail(base, split, val_fraction)
    return open_split


def _open_celeba(root: Path, split: str, download: bool) -> Dataset:
    transform = transforms.Compose([transforms.CenterCrop(CELEBA_CROP), transforms.Resize((CELEBA_SIZE, CELEBA_SIZE)),
                             transforms.ToTensor()])
    parts = {"train": ["train"], "val": ["valid"], "test": ["test"], "trainval": ["train", "valid"]}[split]
    sets = [Items(_CelebA(str(root), split=p, target_type=[], transform=transform, download=download)) for p in parts]
    return sets[0] if len(sets) == 1 else ConcatDataset(sets)


def _open_celebamask(root: Path, split: str, download: bool) -> Dataset:
    if download:
        raise UserError("CelebAMask-HQ cannot be downloaded automatically; see docs/images.md for its layout")
    parts = ["train", "val"] if split == "trainval" else [split]
    sets = [CelebAMaskHQ(root, p) for p in parts]
    return sets[0] if len(sets) == 1 else ConcatDataset(sets)


@dataclass(frozen=True)
class ImageSpec:
    """What one dataset kind looks like: item shape, required files per split, and how to open a split."""

    channels: int                # image channels (class maps: 1 map)
    size: int                    # image side in pixels
    num_classes: int             # class maps: number of classes; 0 for images
    files: Callable[[str | None], list[str]]  # split (None: all) -> required paths relative to the root
    open: Callable[[Path, str, bool], Dataset]  # (root, split, download) -> dataset of {"x": ...}
    hint: str = ""               # how to get the data


def _idx(folder: str) -> Callable[[str | None], list[str]]:
    return lambda split: [f"{folder}/raw/{name}" for name in IDX_FILES]


def _cifar_files(split: str | None) -> list[str]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    return [f"cifar-10-batches-py/{name}" for name in names]


def _celeba_files(split: str | None) -> list[str]:
    return ["celeba/img_align_celeba/"] + [f"celeba/{name}" for name in CELEBA_TEXT]


def _celebamask_files(split: str | None) -> list[str]:
    parts = {"trainval": ["train", "val"], None: ["train", "val", "test"]}.get(split, [split])
    return [f"CelebAMask-HQ/{p}_label/" for p in parts]


DATASETS: dict[str, ImageSpec] = {
    "mnist": ImageSpec(1, 28, 0, _idx("MNIST"), _open_mnist_like(datasets.MNIST, 1 / 6),
                       "set data.download=true where the network is reachable"),
    "fashion_mnist": ImageSpec(1, 28, 0, _idx("FashionMNIST"), _open_mnist_like(datasets.FashionMNIST, 1 / 6),
                               "apt-get install dataset-fashion-mnist, then "
                               "`sqaudio data fashion-mnist /usr/share/datasets/fashion-mnist ROOT`"),
    "cifar10": ImageSpec(3, 32, 0, _cifar_files, _open_mnist_like(_CIFAR10, 1 / 5),
                         "unpack cifar-10-python.tar.gz into ROOT, or set data.download=true"),
    "celeba": ImageSpec(3, CELEBA_SIZE, 0, _celeba_files, _open_celeba,
                        "download img_align_celeba.zip (unzipped) and the five list files into ROOT/celeba"),
    "celebamask_hq": ImageSpec(1, CELEBAMASK_SIZE, CELEBAMASK_CLASSES, _celebamask_files, _open_celebamask,
                               "run CelebAMask-HQ's face_parsing g_mask.py and g_partition.py, see docs/images.md"),
}


def image_spec(kind: str) -> ImageSpec:
    """The `ImageSpec` of a dataset kind; unknown kinds are a UserError listing the valid ones."""
    try:
        return DATASETS[kind]
    except KeyError:
        raise UserError(f"unknown image dataset '{kind}' (valid: {', '.join(DATASETS)})") from None


def missing_files(kind: str, root: str | Path, split: str | None = None) -> list[str]:
    """Required paths (relative to root) of `split` (None: of every split) that are absent; '/' ends a folder."""
    root = Path(root)
    return [rel for rel in image_spec(kind).files(split) if not _exists(root / rel, folder=rel.endswith("/"))]


def _exists(path: Path, folder: bool) -> bool:
    return path.is_dir() if folder else path.is_file()


def build_image_dataset(cfg: DataConfig, root: str | Path, split: str) -> Dataset:
    """One split (train | val | test | trainval) of dataset `cfg.kind` under `root` as {"x": ...} items."""
    spec = image_spec(cfg.kind)
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (valid: {', '.join(SPLITS)})")
    if not str(root):
        raise UserError(f"no data root for {cfg.kind}: pass --data ROOT or set data.root")
    root = Path(root)
    if not cfg.download:
        _require(cfg.kind, root, split)
    try:
        return spec.open(root, split, cfg.download)
    except UserError:
        raise
    except Exception as err:  # torchvision raises RuntimeError/ValueError/OSError/pickle errors on bad data
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        what = "download or read" if cfg.download else "read"
        raise UserError(f"cannot {what} {cfg.kind} under {root}: {first}") from None


def build_image_datasets(cfg: DataConfig, root: str | Path) -> tuple[Dataset, Dataset]:
    """(train, test) datasets of `cfg.kind` under `root`; see the module docstring for layouts and splits."""
    return build_image_dataset(cfg, root, "train"), build_image_dataset(cfg, root, "test")


def _require(kind: str, root: Path, split: str) -> None:
    missing = missing_files(kind, root, split)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise UserError(f"{kind} data not found under {root}: missing {shown} ({image_spec(kind).hint})")


# --- converting gzipped idx files (Debian's dataset-fashion-mnist) into torchvision's raw/ layout ---------------

def read_idx_header(data: bytes, name: str) -> tuple[int, ...]:
    """Validate an unsigned-byte idx file held in `data`; returns its dimensions."""
    if len(data) < 8 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise UserError(f"{name} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != 4 + 4 * ndim + int(np.prod(dims)):
        raise UserError(f"{name}: idx header says {dims} but the file holds {len(data)} bytes")
    return dims


def idx_sources(src: str | Path) -> dict[str, Path]:
    """The four idx files in `src` (name.gz preferred over an uncompressed name); missing ones are a UserError."""
    src = Path(src)
    found = {n: next((p for p in (src / f"{n}.gz", src / n) if p.is_file()), None) for n in IDX_FILES}
    absent = [f"{n}.gz" for n, p in found.items() if p is None]
    if absent:
        raise UserError(f"missing in {src}: {', '.join(absent)}")
    return found


def _read_source(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def _write_readable(data: bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        tmp.chmod(0o644)
    return write


def convert_idx_gz(src: str | Path, out_root: str | Path, folder: str = "FashionMNIST",
                   progress: Callable[[str], None] | None = None) -> list[dict[str, object]]:
    """Write the four (gzipped) idx files of `src` as torchvision's `out_root/<folder>/raw/` files.

    Each file is validated (idx header, size, 28x28 images, as many labels as images) before anything is
    written, and written atomically. Returns one row per file: name, shape, bytes.
    """
    from sqaudio.files import atomic_write

    src, out_root = Path(src), Path(out_root)
    contents = {name: _read_source(path) for name, path in idx_sources(src).items()}
    dims = {name: read_idx_header(data, name) for name, data in contents.items()}
    for part in ("train", "t10k"):
        images, labels = dims[f"{part}-images-idx3-ubyte"], dims[f"{part}-labels-idx1-ubyte"]
        if len(images) != 3 or images[1:] != (28, 28) or len(labels) != 1 or labels[0] != images[0]:
            raise UserError(f"{part} files of {src} do not hold 28x28 images with one label each "
                            f"(images {images}, labels {labels})")
    rows = []
    for name, data in contents.items():
        atomic_write(out_root / folder / "raw" / name, _write_readable(data))
        rows.append({"file": f"{folder}/raw/{name}", "shape": dims[name], "bytes": len(data)})
        if progress is not None:
            progress(name)
    return rows
