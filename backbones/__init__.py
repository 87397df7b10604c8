"""Backbone registry: every diffusion backbone registers a builder under a short name.

    from backbones import build, available
    model = build("dit", size="S", patch_size=2, input_size=32, in_channels=4, num_classes=1000)

Backbone modules in this package are discovered and imported on first use, so adding a file with a
``@register("name")`` class is all it takes to make a backbone available to the trainer and the harness.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_NON_BACKBONE_MODULES = {"layers", "kernels", "opcount"}
_discovered = False


def register(name: str) -> Callable:
    """Class decorator: make ``name`` buildable through :func:`build`."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"backbone name {name!r} is registered twice")
        _REGISTRY[name] = builder
        builder.registry_name = name
        return builder

    return decorator


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NON_BACKBONE_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[str]:
    """Sorted names of all registered backbones."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> Callable[..., nn.Module]:
    """The registered builder (class) for ``name``."""
    _discover()
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; available backbones: {', '.join(available())}")
    return _REGISTRY[name]


def build(name: str, **kwargs) -> nn.Module:
    """Build backbone ``name``; keyword arguments go to its constructor (size preset, overrides, data shape)."""
    return get(name)(**kwargs)


# Token mixers for the token-scaling benchmark (bench.tokens): name -> factory(width, grid_h, grid_w) returning a
# module that maps (B, T, width) -> (B, T, width) with T = grid_h * grid_w. Backbone modules register their own.
_TOKEN_MIXERS: dict[str, Callable[[int, int, int], nn.Module]] = {}


def register_token_mixer(name: str) -> Callable:
    """Decorator for a token-mixer factory ``f(width, grid_h, grid_w) -> nn.Module`` used by bench.tokens."""

    def decorator(factory: Callable[[int, int, int], nn.Module]) -> Callable[[int, int, int], nn.Module]:
        _TOKEN_MIXERS[name] = factory
        return factory

    return decorator


def token_mixers() -> dict[str, Callable[[int, int, int], nn.Module]]:
    """All registered token-mixer factories (importing every backbone module first)."""
    _discover()
    return dict(_TOKEN_MIXERS)
