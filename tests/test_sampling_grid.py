"""diffusion.sampling.save_grid: tiles upscaled to >= 64 px, a class-name header row, grayscale and RGB."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffusion.sampling import save_grid


def _read(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _class_grid(channels: int, per_class: int = 10, classes: int = 10, size: int = 8) -> torch.Tensor:
    """Image i is constant: value -0.9 + 1.8 * i / (n - 1) (so every tile is identifiable)."""
    n = per_class * classes
    values = torch.linspace(-0.9, 0.9, n)
    return values.view(n, 1, 1, 1).expand(n, channels, size, size).clone()


def test_grid_tiles_at_least_64px_with_class_header(tmp_path):
    images = _class_grid(1)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot with a very long name"]
    out = save_grid(images, tmp_path / "grid.png", ncol=10, class_names=names)
    assert out == tmp_path / "grid.png" and not list(tmp_path.glob("*.tmp"))
    arr = _read(out)
    assert arr.ndim == 2  # grayscale stays one channel
    h, w = arr.shape
    tile, pad, rows = 64, 2, 10  # 8 px images: upscaled x8
    assert w == 10 * (tile + pad) + pad
    assert h > rows * (tile + pad) + pad  # a header row on top of the 10 rows of tiles
    header = h - (rows * (tile + pad) + pad)
    assert (arr[:header] < 128).any()  # dark class-name text on the white header
    assert (arr[:header, -(tile + pad):] < 128).any()  # the long last name is drawn, cut to its tile:
    gaps = [c * (tile + pad) + g for c in range(11) for g in range(pad)]
    assert (arr[:header, gaps] == 255).all()  # no name spills over the white gaps between columns
    # Tile (r, c) is image r * 10 + c, upscaled by nearest: one constant 64 x 64 block.
    for r, c in ((0, 0), (3, 7), (9, 9)):
        top, left = header + pad + r * (tile + pad), pad + c * (tile + pad)
        block = arr[top:top + tile, left:left + tile]
        expected = np.clip(127.5 * float(images[r * 10 + c, 0, 0, 0]) + 128.0, 0, 255).astype(np.uint8)
        assert (block == expected).all(), (r, c)


def test_grid_rgb_without_names_and_explicit_upscale(tmp_path):
    arr = _read(save_grid(_class_grid(3, per_class=2), tmp_path / "rgb.png", ncol=10))
    assert arr.shape == (2 * 66 + 2, 10 * 66 + 2, 3)  # no header, tiles 64 px
    arr = _read(save_grid(_class_grid(3, per_class=2), tmp_path / "rgb10.png", ncol=10, upscale=10))
    assert arr.shape == (2 * 82 + 2, 10 * 82 + 2, 3)  # upscale larger than the automatic factor wins
    arr = _read(save_grid(_class_grid(1, per_class=1, size=16), tmp_path / "g16.png", ncol=5))
    assert arr.shape == (2 * 66 + 2, 5 * 66 + 2)  # 16 px: x4; 10 images in rows of 5
