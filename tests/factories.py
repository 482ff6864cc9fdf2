"""Builders of small test inputs shared by several test folders: a vocoder feature store, image dataset trees
in the exact on-disk formats torchvision reads, tiny vocoder recipe overrides, and a briefly trained model made to
use many codes (`spread_codes`)."""
from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from conftest import harmonic
from PIL import Image

from sqaudio.config import FeatureConfig, to_dict
from sqaudio.data.audio import load_audio
from sqaudio.data.features import log_mel_spectrogram

FEATURES = FeatureConfig()
TINY = ["train.steps=4", "train.checkpoint_every=100", "train.log_every=1", "train.discriminator_start=1",
        "train.eval_utterances=1"]
TINY_PWG = TINY + [
    "generator_type=ParallelWaveGANGenerator",
    "generator_params={layers: 4, stacks: 2, residual_channels: 8, gate_channels: 16, skip_channels: 8, "
    "aux_context_window: 2, upsample_params: {upsample_scales: [4, 5, 8]}}",
    "discriminator_type=ParallelWaveGANDiscriminator",
    "discriminator_params={layers: 3, conv_channels: 8}",
    "loss.stft.weight=1.0", "loss.feat_match=0",
]


def make_store(root: Path, rate: int = 22050) -> Path:
    """A prepared store (store.py contract) of four generated harmonic utterances: 3 train, 1 test."""
    (root / "audio").mkdir(parents=True)
    (root / "features").mkdir()
    lines = []
    for i, (f0, split) in enumerate([(120, "train"), (165, "train"), (210, "train"), (140, "test")]):
        src = root / "audio" / f"u{i}.wav"
        sf.write(src, harmonic(1.0, rate, f0, seed=i), rate)
        mel = log_mel_spectrogram(load_audio(src, FEATURES), FEATURES)
        np.save(root / "features" / f"u{i}.npy", mel)
        lines.append(json.dumps({"id": f"u{i}", "speaker": "s1", "split": split, "source": str(src),
                                 "features": f"features/u{i}.npy", "frames": mel.shape[1], "duration_s": 1.0}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (root / "feature_config.json").write_text(json.dumps(to_dict(FEATURES)))
    (root / "speakers.json").write_text('["s1"]')
    return root


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte idx file: magic 0x08 + ndim, big-endian dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def mnist_arrays(n_train=12, n_test=6, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
            "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
            "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}


def write_idx_tree(folder: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(idx_bytes(array))
        else:
            (folder / name).write_bytes(idx_bytes(array))


def write_cifar_tree(root: Path, per_batch=2, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data[name] = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data[name], "labels": list(rng.integers(0, 10, per_batch))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return data


def write_celeba_tree(root: Path, partitions=(0, 0, 0, 1, 1, 2, 2), seed=0) -> list[str]:
    """img_align_celeba/*.jpg (178x218 like the real aligned images) and the five list files torchvision reads."""
    rng = np.random.default_rng(seed)
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(folder / "img_align_celeba" / name)
    n = len(names)
    (folder / "list_eval_partition.txt").write_text("".join(f"{m} {p}\n" for m, p in zip(names, partitions)))
    (folder / "identity_CelebA.txt").write_text("".join(f"{m} {i + 7}\n" for i, m in enumerate(names)))
    (folder / "list_attr_celeba.txt").write_text(f"{n}\n5_o_Clock_Shadow Smiling \n"
                                                 + "".join(f"{m} -1  1\n" for m in names))
    (folder / "list_bbox_celeba.txt").write_text(f"{n}\nimage_id x_1 y_1 width height\n"
                                                 + "".join(f"{m}  95  71 226 313\n" for m in names))
    marks = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\n{marks}\n" + "".join(f"{m} 69 109 106 113 77 142 73 152 108 154\n" for m in names))
    return names


def write_celebamask_tree(root: Path, counts=(11, 2, 3), side=128, seed=0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    maps = {}
    for split, count in zip(("train", "val", "test"), counts):
        folder = root / "CelebAMask-HQ" / f"{split}_label"
        folder.mkdir(parents=True)
        maps[split] = [rng.integers(0, 19, (side, side), dtype=np.uint8) for _ in range(count)]
        for i, labels in enumerate(maps[split]):
            Image.fromarray(labels, mode="L").save(folder / f"{i}.png")
    return maps


@torch.no_grad()
def spread_codes(model, mels: list[np.ndarray]) -> None:
    """Make a briefly trained model use many codes, each by a clear margin: the latents are centred and scaled
    (the encoder's last 1x1 conv) and the codebook is set to latents spread over the utterances."""
    dim = model.quantizer.dim
    latents = torch.cat([model.encoder(torch.from_numpy(m)[None])[0, :dim].T for m in mels])  # (positions, D)
    out = model.encoder.out
    out.bias[:dim] = 50 * (out.bias[:dim] - latents.mean(0))
    out.weight[:dim] *= 50
    latents = torch.cat([model.encoder(torch.from_numpy(m)[None])[0, :dim].T for m in mels])
    pick = torch.linspace(0, len(latents) - 1, model.quantizer.codebook_size).round().long()
    model.quantizer.codebook.copy_(latents[pick])
