"""Datasets: bundled digits, real Fashion-MNIST idx parsing, clear errors, deterministic resumable batches."""

import gzip

import numpy as np
import pytest
import torch

from diffusion.data import DatasetError, load_dataset, read_idx


def write_idx(path, array, gz=True):
    array = np.asarray(array, dtype=np.uint8)
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + len(array).to_bytes(4, "big")
    if array.ndim == 3:
        header += array.shape[1].to_bytes(4, "big") + array.shape[2].to_bytes(4, "big")
    data = header + array.tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 6)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_digits_scaled_to_unit_interval_and_split():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape == (1438, 1, 8, 8) and test.images.shape == (359, 1, 8, 8)
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert train.num_classes == 10 and set(train.labels.tolist()) == set(range(10))
    assert load_dataset("digits", image_size=16).images.shape == (1438, 1, 16, 16)


def test_fashion_mnist_reader_pads_to_32_and_downsamples(fake_fmnist):
    raw = read_idx(fake_fmnist / "train-images-idx3-ubyte.gz")
    ds = load_dataset("fashion_mnist", "train", root=str(fake_fmnist))
    assert ds.images.shape == (20, 1, 32, 32) and ds.labels.tolist() == [i % 10 for i in range(20)]
    assert torch.all(ds.images[:, :, :2] == -1.0) and torch.all(ds.images[:, :, :, -2:] == -1.0)
    np.testing.assert_allclose(ds.images[0, 0, 2:30, 2:30].numpy(), raw[0] / 127.5 - 1, atol=1e-6)
    small = load_dataset("fashion_mnist", "test", image_size=16, root=str(fake_fmnist))
    assert small.images.shape == (6, 1, 16, 16)
    torch.testing.assert_close(small.images[0, 0, 5, 7], ds.images.new_tensor(
        load_dataset("fashion_mnist", "test", root=str(fake_fmnist)).images[0, 0, 10:12, 14:16].mean().item()))


def test_missing_and_corrupt_files_name_the_path(fake_fmnist, tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=str(tmp_path / "nowhere"))
    (fake_fmnist / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.*not found"):
        load_dataset("fashion_mnist", "test", root=str(fake_fmnist))
    bad = fake_fmnist / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-5]))
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz has .* bytes, expected"):
        load_dataset("fashion_mnist", "train", root=str(fake_fmnist))
    bad.write_bytes(b"not a gzip file at all")
    with pytest.raises(DatasetError, match="corrupt"):
        load_dataset("fashion_mnist", "train", root=str(fake_fmnist))
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_batches_are_a_function_of_seed_and_step():
    ds = load_dataset("digits")
    a = ds.batch_indices(100, 64, seed=1)
    assert torch.equal(a, ds.batch_indices(100, 64, seed=1))
    assert not torch.equal(a, ds.batch_indices(100, 64, seed=2))
    per_epoch = len(ds) // 64
    epoch = torch.cat([ds.batch_indices(s, 64, seed=1) for s in range(per_epoch)])
    assert len(set(epoch.tolist())) == per_epoch * 64  # no repeats inside an epoch
    with pytest.raises(ValueError, match="lower train.batch_size"):
        ds.batch_indices(0, 10_000, seed=0)


def test_hint_names_the_dataset_root_config_key(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion_mnist", root=str(tmp_path / "nowhere"))
    assert "pass dataset.root=<folder>" in str(err.value) and " data.root" not in str(err.value)


@pytest.mark.parametrize("kind", ["images", "labels"])
def test_idx_file_declaring_zero_items_names_the_file(fake_fmnist, kind):
    empty = np.zeros((0, 28, 28)) if kind == "images" else np.zeros(0)
    write_idx(fake_fmnist / f"train-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz", empty)
    with pytest.raises(DatasetError, match=rf"train-{kind}-idx\d-ubyte.gz holds no {kind} .*declares 0 "):
        load_dataset("fashion_mnist", "train", root=str(fake_fmnist))


def test_count_mismatch_and_labels_out_of_range_are_errors(fake_fmnist):
    labels = fake_fmnist / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.arange(19) % 10)
    with pytest.raises(DatasetError, match=r"images \(20, 28, 28\) and labels \(19,\) .* do not match"):
        load_dataset("fashion_mnist", "train", root=str(fake_fmnist))
    write_idx(labels, np.full(20, 10))
    with pytest.raises(DatasetError, match="labels under .* exceed 9"):
        load_dataset("fashion_mnist", "train", root=str(fake_fmnist))


def test_unconditional_option_drops_labels_and_enters_the_key(tmp_path):
    from helpers import TINY_DIT, train_config

    from diffusion.trainer import train

    base = {"name": "digits", "image_size": None, "root": None, "random_flip": False, "workers": 0}
    from diffusion.data import load_from_config

    ds = load_from_config({**base, "unconditional": True})
    _, y = ds.fetch(torch.arange(50))
    assert ds.num_classes == 1 and y.eq(0).all() and ds.identity() == {"unconditional": True}
    assert load_from_config(base).identity() == {}
    keys = []
    for flag in ("false", "true"):
        summary = train(train_config(tmp_path / flag, [*TINY_DIT, f"dataset.unconditional={flag}", "train.steps=1"]))
        ckpt = torch.load(tmp_path / flag / "checkpoints" / "last.pt", weights_only=True)
        keys.append(summary["key"])
        assert ckpt["config"]["backbone_kwargs"]["num_classes"] == (1 if flag == "true" else 10)
    assert keys[0] != keys[1]
