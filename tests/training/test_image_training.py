"""Image recipe families train, resume and evaluate through the same CLI as speech (tiny widths, fake trees)."""
import json

import pytest
import torch
from factories import mnist_arrays, write_celebamask_tree, write_cifar_tree, write_idx_tree

from sqaudio import checkpoint

TINY = ["--set", "train.epochs=0", "--set", "train.steps=4", "--set", "train.checkpoint_every=2",
        "--set", "data.batch_size=4", "--set", "model.vision.channels=8", "--quiet", "--device", "cpu"]


@pytest.mark.parametrize("recipe,quantizer", [
    ("mnist/sqvae_gauss1", None), ("mnist/vqvae_ema", None), ("fashion_mnist/sqvae_gauss1", None),
    ("cifar10/sqvae_gauss2", None), ("cifar10/sqvae_gauss4", None), ("cifar10/sqvae_gauss1", "fixed_gaussian")])
def test_gaussian_image_recipes_train_and_evaluate(cli, tmp_path, recipe, quantizer):
    root = tmp_path / "data"
    if recipe.startswith("cifar10"):
        write_cifar_tree(root)
    else:
        write_idx_tree(root / ("MNIST" if recipe.startswith("mnist") else "FashionMNIST") / "raw", mnist_arrays())
    out = tmp_path / "run"
    extra = ["--set", f"quantizer.kind={quantizer}"] if quantizer else []
    result = cli("train", recipe, "--data", root, "--out", out, *TINY, *extra)
    assert result.exit_code == 0, result.output
    assert checkpoint.load(checkpoint.latest(out))["step"] == 4
    result = cli("evaluate", out, "--data", root, "--json", tmp_path / "m.json", "--grid", tmp_path / "grid.png")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 < metrics["mse"] < 1 and metrics["mse_x1e3"] == pytest.approx(metrics["mse"] * 1e3)
    assert 1 <= metrics["perplexity"] <= metrics["used_codes"]
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_image_resume_is_bit_exact(cli, tmp_path):
    root = tmp_path / "data"
    write_idx_tree(root / "MNIST" / "raw", mnist_arrays())
    assert cli("train", "mnist/sqvae_gauss1", "--data", root, "--out", tmp_path / "a", *TINY).exit_code == 0
    args = ["train", "mnist/sqvae_gauss1", "--data", root, "--out", tmp_path / "b", *TINY]
    assert cli(*args, "--set", "train.steps=2").exit_code == 0
    assert cli(*args, "--resume").exit_code == 0
    a = checkpoint.load(checkpoint.latest(tmp_path / "a"))["model"]
    b = checkpoint.load(checkpoint.latest(tmp_path / "b"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vmf_recipe_trains_and_reports_accuracy_and_miou(cli, tmp_path):
    root = tmp_path / "data"
    write_celebamask_tree(root)
    out = tmp_path / "run"
    result = cli("train", "celebamask_hq/sqvae_vmf", "--data", root, "--out", out, *TINY,
                 "--set", "model.vision.channels=65")
    assert result.exit_code == 0, result.output
    result = cli("evaluate", out, "--data", root, "--json", tmp_path / "m.json", "--grid", tmp_path / "g.png")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["miou"] <= 1


def test_missing_image_data_is_one_line_error(cli, tmp_path):
    result = cli("train", "cifar10/sqvae_gauss1", "--data", tmp_path / "empty", "--out", tmp_path / "run", *TINY)
    assert result.exit_code == 2 and "cifar-10-batches-py" in result.output
