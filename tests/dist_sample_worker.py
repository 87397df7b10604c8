"""Run under torchrun by tests/test_distributed.py: sample a fixed model across the ranks, save on rank 0."""

import sys

import torch

import backbones
from diffusion.sampling import sample_images
from runio.dist import init_world


def fixed_model():
    torch.manual_seed(0)
    model = backbones.build("dit", size="S", depth=1, hidden_size=32, num_heads=2, input_size=8, in_channels=1,
                            num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def main(out: str) -> None:
    torch.set_num_threads(1)
    world, device = init_world(torch.device("cpu"))
    labels = torch.arange(23) % 10  # 23 = 5 chunks of 5 with a partial last one: uneven shares across ranks
    x = sample_images(fixed_model(), labels, steps=3, cfg_scale=2.0, seed=7, batch_size=5, world=world)
    if world.is_main:
        torch.save(x, out)


if __name__ == "__main__":
    main(sys.argv[1])
