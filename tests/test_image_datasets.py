"""Real image datasets (CIFAR-10 pickles, aligned CelebA JPEGs, ImageNet folders) from tiny copies in their exact
on-disk formats: pixel values after the exact crops, labels and class order, splits, clear errors, safe unpickling,
and a 2-step training run on each."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data import DatasetError, class_names, load_dataset, load_from_config
from diffusion.image_datasets import CIFAR10_CLASSES, adm_center_crop, celeba_ddim_crop

# ------------------------------------------------------------------------------------------------------------------
# CIFAR-10
# ------------------------------------------------------------------------------------------------------------------


def py2_pickle(obj) -> bytes:
    """``obj`` as Python 2's cPickle (protocol 2) wrote the CIFAR-10 files: str as byte strings (SHORT_BINSTRING /
    BINSTRING), numpy 1.x arrays through numpy.core.multiarray._reconstruct and a BUILD state tuple."""
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b)

    def integer(i: int) -> None:
        out.extend(b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i))

    def emit(o) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                emit(v)
            out.extend(b"e")
        elif isinstance(o, int):
            integer(o)
        elif isinstance(o, str):
            string(o.encode("latin1"))
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8 and o.ndim == 2
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85")
            string(b"b")
            out.extend(b"\x87R(K\x01")                      # _reconstruct(ndarray, (0,), 'b'); state = (1,
            integer(o.shape[0])
            integer(o.shape[1])
            out.extend(b"\x86cnumpy\ndtype\n")              # shape, dtype('u1', 0, 1) with its state
            string(b"u1")
            out.extend(b"K\x00K\x01\x87R(K\x03")
            string(b"|")
            out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")  # ..., is_fortran False,
            string(o.tobytes())                              # the raw bytes)
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def cifar_batch(n: int, seed: int, label_offset: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"batch_label": f"batch {seed}", "labels": [(i + label_offset) % 10 for i in range(n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{seed}_{i}.png" for i in range(n)]}


def write_cifar(folder, writer: str = "py2", n_train: int = 4, n_test: int = 3) -> dict:
    """A cifar-10-batches-py folder; ``py2``: the real files' format; ``py3``: pickle.dump protocol 2 with bytes
    keys (what Python 3 writes: bytes through _codecs.encode, numpy._core)."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(n_train, i, label_offset=i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(n_test, 9)
    meta = {"num_cases_per_batch": 10000, "label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
    for name, obj in [*batches.items(), ("batches.meta", meta)]:
        if writer == "py2":
            (folder / name).write_bytes(py2_pickle(obj))
        else:
            b = {k.encode(): ([v.encode() for v in val] if k in ("filenames", "label_names") else val)
                 for k, val in obj.items()}
            with open(folder / name, "wb") as f:
                pickle.dump(b, f, protocol=2)
    return batches


def test_py2_writer_matches_the_real_format_as_python3_reads_it(tmp_path):
    """The hand-written Python 2 stream reads back (unrestricted, here only) as the real files do: bytes keys
    with encoding='bytes'."""
    b = cifar_batch(2, 1)
    d = pickle.loads(py2_pickle(b), encoding="bytes")
    assert list(d) == [b"batch_label", b"labels", b"data", b"filenames"]
    np.testing.assert_array_equal(d[b"data"], b["data"])
    assert d[b"labels"] == b["labels"] and d[b"filenames"][0] == b"img_1_0.png"


@pytest.mark.parametrize("writer", ["py2", "py3"])
def test_cifar10_pixels_labels_and_class_names(tmp_path, writer):
    batches = write_cifar(tmp_path / "cifar-10-batches-py", writer)
    train = load_dataset("cifar10", "train", root=str(tmp_path))
    assert len(train) == 20 and train.input_shape() == (3, 32, 32) and train.num_classes == 10
    assert train.class_names == CIFAR10_CLASSES and class_names("cifar10") == CIFAR10_CLASSES
    assert train.labels.tolist() == [lab for i in range(1, 6) for lab in batches[f"data_batch_{i}"]["labels"]]
    # image 6 = data_batch_2 row 2; pixel (y=5, x=17): red at 5*32+17, green at 1024+..., blue at 2048+...
    row = batches["data_batch_2"]["data"][2]
    assert train.pixels[6, 5, 17].tolist() == [row[5 * 32 + 17], row[1024 + 5 * 32 + 17], row[2048 + 5 * 32 + 17]]
    x, y = train.fetch(torch.tensor([6, 0]))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32) and y.tolist() == [train.labels[6].item(), 1]
    assert x[0, 2, 5, 17].item() == pytest.approx(row[2048 + 5 * 32 + 17] / 127.5 - 1)
    test = load_dataset("cifar10", "test", root=str(tmp_path / "cifar-10-batches-py"))  # root = the folder itself
    assert len(test) == 3 and test.labels.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(test.pixels[1].transpose(2, 0, 1).reshape(-1), batches["test_batch"]["data"][1])


def test_cifar10_resized_by_area_average(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    full = load_dataset("cifar10", "test", root=str(tmp_path))
    small = load_dataset("cifar10", "test", image_size=16, root=str(tmp_path))
    assert small.input_shape() == (3, 16, 16)
    block = full.pixels[2, 6:8, 10:12, 1].astype(np.float64)
    assert small.pixels[2, 3, 5, 1] == np.round(block.mean())


class _Payload:
    """Unpickling this runs ``os.mkdir(sentinel)``: harmless, and visible afterwards."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.mkdir, (self.sentinel,)


def test_malicious_cifar_pickle_is_refused_and_never_runs(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    sentinel = tmp_path / "sentinel"
    evil = folder / "test_batch"
    with open(evil, "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Payload(sentinel)]}, f, protocol=2)
    with pytest.raises(DatasetError, match=r"test_batch: refused to unpickle the global (posix|os)\.mkdir"):
        load_dataset("cifar10", "test", root=str(tmp_path))
    assert not sentinel.exists()
    with open(evil, "rb") as f:  # the payload is live: an unrestricted load would have run it
        pickle.load(f)
    assert sentinel.is_dir()


def test_cifar10_errors_name_the_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"needs dataset.root=.*cifar-10-batches-py.*cifar-10-python.tar.gz"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match=r"missing in .*cifar-10-batches-py: data_batch_1.*kriz/cifar.html"):
        load_dataset("cifar10", root=str(tmp_path))
    write_cifar(tmp_path / "cifar-10-batches-py")
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"data_batch_3 .*truncated or corrupt"):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(ValueError, match="splits train, test"):
        load_dataset("cifar10", "valid", root=str(tmp_path))


def test_cifar10_download_only_when_missing(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url, download_root, filename=None, md5=None):
        calls.append((url, filename, md5))
        write_cifar(tmp_path / "cifar-10-batches-py")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    assert len(load_dataset("cifar10", "test", root=str(tmp_path), download=True)) == 3
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a")]
    load_dataset("cifar10", "test", root=str(tmp_path), download=True)
    assert len(calls) == 1  # present: no second download

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError, match=r"could not fetch CIFAR-10.*network unreachable.*kriz/cifar.html"):
        load_dataset("cifar10", root=str(tmp_path / "elsewhere"), download=True)


# ------------------------------------------------------------------------------------------------------------------
# CelebA
# ------------------------------------------------------------------------------------------------------------------

PARTITIONS = [0, 0, 0, 1, 2, 2]


def write_celeba(root, partitions=PARTITIONS, torchvision_layout: bool = True):
    base = root / "celeba" if torchvision_layout else root
    (base / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for i, part in enumerate(partitions, 1):
        name = f"{i:06d}.jpg"
        # smooth random image (JPEG-friendly), 178 wide x 218 high like img_align_celeba
        small = rng.integers(0, 256, (11, 9, 3), dtype=np.uint8)
        Image.fromarray(small).resize((178, 218), Image.BILINEAR).save(base / "img_align_celeba" / name, quality=95)
        names.append((name, part))
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in names))
    return base


def test_ddim_crop_box_is_the_128px_square_centred_at_89_121():
    """A hand-checked image: red = x, green = y. The crop's corners are (25, 57) and (152, 184)."""
    xs, ys = np.meshgrid(np.arange(178), np.arange(218))
    img = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))
    out = celeba_ddim_crop(img, 128)
    assert out.shape == (128, 128, 3)
    assert out[0, 0, :2].tolist() == [25, 57] and out[127, 127, :2].tolist() == [152, 184]
    assert out[64, 64, :2].tolist() == [89, 121]  # the centre (cx, cy) of DDIM / U-ViT


@pytest.mark.parametrize("crop", ["ddim", "resize"])
def test_celeba_pixels_equal_the_reference_torchvision_pipelines(tmp_path, crop):
    """DDIM/U-ViT: F.crop(top=cy-64, left=cx-64, 128, 128) + Resize(64); Diffusion-RWKV: Resize(64) + centre crop
    (torchvision's CenterCrop, which equals center_crop_arr here: 78 - 64 is even)."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    base = write_celeba(tmp_path)
    ds = load_dataset("celeba64", "train", root=str(tmp_path), crop=crop)
    assert len(ds) == 3 and ds.num_classes == 1 and ds.class_names == ["face"] and ds.identity() == {"crop": crop}
    x, y = ds.fetch(torch.tensor([2, 0]))
    assert x.shape == (2, 3, 64, 64) and y.tolist() == [0, 0]
    with Image.open(base / "img_align_celeba" / "000003.jpg") as f:
        img = f.convert("RGB")
    ref = TF.resize(TF.crop(img, 121 - 64, 89 - 64, 128, 128), 64) if crop == "ddim" else \
        T.CenterCrop(64)(T.Resize(64)(img))
    expected = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-6)


def test_celeba_splits_layouts_and_crops_in_the_key(tmp_path):
    write_celeba(tmp_path / "tv")
    write_celeba(tmp_path / "flat", torchvision_layout=False)
    for split, n in (("train", 3), ("valid", 1), ("test", 2), ("all", 6)):
        assert len(load_dataset("celeba64", split, root=str(tmp_path / "tv"))) == n
    default = load_from_config({"name": "celeba64", "image_size": 16, "root": str(tmp_path / "flat"), "crop": None})
    assert default.identity() == {"crop": "ddim"} and default.input_shape() == (3, 16, 16)
    assert load_dataset("celeba64", root=str(tmp_path / "flat"), crop="resize").identity() != default.identity()
    with pytest.raises(ValueError, match="crop='center' is not a CelebA crop protocol"):
        load_dataset("celeba64", root=str(tmp_path / "flat"), crop="center")


def test_celeba_errors_name_the_path_and_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere does not exist; expected .*img_align_celeba/.*list_eval"):
        load_dataset("celeba64", root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"no img_align_celeba/ folder in"):
        load_dataset("celeba64", root=str(tmp_path))
    base = write_celeba(tmp_path / "a", torchvision_layout=False)
    (base / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetError, match=r"a/list_eval_partition.txt not found"):
        load_dataset("celeba64", root=str(base))
    base = write_celeba(tmp_path / "b", partitions=[0, 0, 1], torchvision_layout=False)
    with pytest.raises(DatasetError, match=r"lists no image of the 'test' split"):
        load_dataset("celeba64", "test", root=str(base))
    (base / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) .* missing .*b/img_align_celeba/000002.jpg"):
        load_dataset("celeba64", root=str(base))
    base = write_celeba(tmp_path / "c", torchvision_layout=False)
    (base / "img_align_celeba" / "000002.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (200, 200)).save(base / "img_align_celeba" / "000003.jpg")
    ds = load_dataset("celeba64", root=str(base))
    ds.fetch(torch.tensor([0]))
    with pytest.raises(DatasetError, match=r"cannot decode image .*c/img_align_celeba/000002.jpg"):
        ds.fetch(torch.tensor([0, 1]))
    with pytest.raises(DatasetError, match=r"000003.jpg: the image is 200x200, but crop=ddim needs .*178x218"):
        ds.fetch(torch.tensor([2]))
    (base / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg train\n")
    with pytest.raises(DatasetError, match=r"list_eval_partition.txt line 2: '000002.jpg train'"):
        load_dataset("celeba64", root=str(base))


# ------------------------------------------------------------------------------------------------------------------
# ImageNet
# ------------------------------------------------------------------------------------------------------------------

SIZES = {"n01440764": [(300, 200), (97, 131)], "n01443537": [(40, 30), (333, 250), (64, 64)]}


def write_imagenet(folder, sizes=SIZES):
    rng = np.random.default_rng(1)
    for synset, whs in sizes.items():
        (folder / synset).mkdir(parents=True)
        for i, (w, h) in enumerate(whs):
            small = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
            ext = [".JPEG", ".png", ".jpg"][i % 3]
            Image.fromarray(small).resize((w, h), Image.BILINEAR).save(folder / synset / f"{synset}_{i}{ext}")
        (folder / synset / "notes.txt").write_text("not an image")


def adm_reference(img: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr steps, spelled out: BOX halvings, BICUBIC to size, centred crop."""
    while img.width >= 2 * size and img.height >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.BOX)
    s = size / min(img.width, img.height)
    img = img.resize((int(round(img.width * s)), int(round(img.height * s))), Image.BICUBIC)
    a = np.array(img)
    return a[(a.shape[0] - size) // 2:][:size, (a.shape[1] - size) // 2:][:, :size]


def test_adm_center_crop_geometry_by_hand():
    """600x400, size 64: halved twice to 150x100, bicubic to 96x64, columns 16..79 kept: a red/blue boundary at
    x = 300 (48 after resizing) lands between output columns 31 and 32."""
    a = np.zeros((400, 600, 3), np.uint8)
    a[:, :300, 0], a[:, 300:, 2] = 255, 255
    out = adm_center_crop(Image.fromarray(a), 64)
    assert out.shape == (64, 64, 3)
    assert (out[:, :30] == [255, 0, 0]).all() and (out[:, 34:] == [0, 0, 255]).all()
    assert out[0, 31, 0] > 128 > out[0, 32, 0]
    portrait = adm_center_crop(Image.fromarray(np.ascontiguousarray(a.transpose(1, 0, 2))), 64)  # 400x600
    assert out.transpose(1, 0, 2).tolist() == portrait.tolist()
    odd = adm_center_crop(Image.fromarray(np.zeros((250, 333, 3), np.uint8)), 64)  # 166x125 -> round(84.992) = 85
    assert odd.shape == (64, 64, 3)


@pytest.mark.parametrize("nested", [False, True])
def test_imagenet_folders_classes_and_center_crop(tmp_path, nested, caplog):
    train_dir = tmp_path / "train" if nested else tmp_path
    write_imagenet(train_dir)
    ds = load_dataset("imagenet", "train", image_size=32, root=str(tmp_path))
    assert ds.class_names == ["n01440764", "n01443537"] and ds.num_classes == 2  # sorted synsets: DiT's ids
    assert len(ds) == 5 and ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert [os.path.basename(f) for f in ds.files] == ["n01440764_0.JPEG", "n01440764_1.png", "n01443537_0.JPEG",
                                                       "n01443537_1.png", "n01443537_2.jpg"]
    assert "2 synset folders, not ILSVRC2012's 1000" in caplog.text
    x, y = ds.fetch(torch.arange(5))
    assert x.shape == (5, 3, 32, 32) and y.tolist() == [0, 0, 1, 1, 1]
    for i, path in enumerate(ds.files):
        with Image.open(path) as f:
            ref = adm_reference(f.convert("RGB"), 32)
        expected = torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(x[i], expected, rtol=0, atol=1e-6)
    assert load_dataset("imagenet", root=str(tmp_path)).input_shape() == (3, 256, 256)


def test_imagenet_val_split_and_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere does not exist; expected .*n01440764/\*.JPEG"):
        load_dataset("imagenet", root=str(tmp_path / "nowhere"))
    write_imagenet(tmp_path / "flat")
    with pytest.raises(DatasetError, match=r"split 'test' reads val/ beside train/.*no train/ and val/"):
        load_dataset("imagenet", "test", root=str(tmp_path / "flat"))
    root = tmp_path / "ilsvrc"
    write_imagenet(root / "train")
    (root / "val").mkdir()
    Image.new("RGB", (50, 50)).save(root / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DatasetError, match=r"val has no class folders: ILSVRC2012's val images come flat"):
        load_dataset("imagenet", "test", root=str(root))
    write_imagenet(root / "val", {"n01443537": [(50, 60)]})
    val = load_dataset("imagenet", "val", image_size=16, root=str(root))
    assert len(val) == 1 and val.labels.tolist() == [1] and val.num_classes == 2  # ids from the train folders
    write_imagenet(root / "val", {"n09999999": [(50, 60)]})
    with pytest.raises(DatasetError, match=r"class folders that the train folder lacks \(n09999999\)"):
        load_dataset("imagenet", "test", root=str(root))
    (root / "train" / "n01500000").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*n01500000 holds no image"):
        load_dataset("imagenet", root=str(root))
    (root / "train" / "n01500000").rmdir()
    (root / "train" / "n01440764" / "n01440764_0.JPEG").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"cannot decode image .*train/n01440764/n01440764_0.JPEG"):
        load_dataset("imagenet", image_size=16, root=str(root)).fetch(torch.tensor([0]))


# ------------------------------------------------------------------------------------------------------------------
# End to end: 2 training steps on each
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,classes", [("cifar10", 16, 10), ("celeba64", 16, 1), ("imagenet", 16, 2)])
def test_trains_two_steps_on_each_dataset(tmp_path, name, size, classes):
    from helpers import TINY_DIT, train_config

    from diffusion.trainer import load_checkpoint, train

    data = tmp_path / "data"
    {"cifar10": lambda: write_cifar(data / "cifar-10-batches-py"), "celeba64": lambda: write_celeba(data),
     "imagenet": lambda: write_imagenet(data / "train")}[name]()
    run = tmp_path / "run"
    summary = train(train_config(run, TINY_DIT + [f"dataset={name}", f"dataset.root={data}",
                                                  f"dataset.image_size={size}", "train.batch_size=2",
                                                  "train.steps=2", "train.ckpt_every=2"]))
    assert summary["steps"] == 2 and (run / "checkpoints" / "last.pt").is_file()
    kwargs = load_checkpoint(run)["config"]["backbone_kwargs"]
    assert (kwargs["input_size"], kwargs["in_channels"], kwargs["num_classes"]) == (size, 3, classes)
