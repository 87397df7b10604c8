"""Timestep respacing: run a trained T-step diffusion with a subset of its steps (IDDPM §4 / ADM)."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """Original timesteps to keep.

    - ``""`` or None: all steps.
    - ``"250"`` / ``250`` / ``"10,15,20"`` / ``[10, 15, 20]``: split [0, T) into equal sections (the first
      T % n_sections get one extra step) and take the given count from each, evenly strided with both section
      ends included: section step k -> start + round(k * (size - 1) / (count - 1)).
      E.g. (1000, "250") -> {0, 4, 8, ..., 991, 995, 999}.
    - ``"ddimN"``: the integer stride s with len(range(0, T, s)) == N, i.e. range(0, T, s) (DDIM paper's
      choice); e.g. "ddim50" -> range(0, 1000, 20).
    """
    if section_counts is None or section_counts == "":
        return set(range(num_timesteps))
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot get exactly {desired} DDIM steps out of {num_timesteps} with an integer "
                             f"stride; pick another N or use plain respacing {str(desired)!r}")
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(f"bad respacing {section_counts!r}: expected '', 'N', 'N1,N2,...' or 'ddimN'") from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]

    n_sections = len(counts)
    size_per, extra = divmod(num_timesteps, n_sections)
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps "
                             f"(respacing {section_counts!r}, {num_timesteps} diffusion steps)")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):  # accumulate like IDDPM so rounding of ties matches the released step sets
            kept.append(start + round(cur))
            cur += stride
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset ``use_timesteps`` of the steps of the base diffusion built from ``kwargs``.

    New betas reproduce the base alpha_bar at the kept steps: beta'_i = 1 - alpha_bar[t_i] / alpha_bar[t_{i-1}].
    Indices i in [0, len(use_timesteps)) are mapped back to original timesteps ``timestep_map[i]`` before the
    model is called (no rescaling: the model always sees t in [0, T)).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any):
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        self.use_timesteps = {int(t) for t in use_timesteps}
        if not self.use_timesteps or not self.use_timesteps <= set(range(base.num_timesteps)):
            raise ValueError(f"use_timesteps must be a non-empty subset of range({base.num_timesteps})")
        self.timestep_map: list[int] = sorted(self.use_timesteps)
        ac = base.alphas_cumprod[self.timestep_map]
        kwargs["betas"] = 1.0 - ac / np.append(1.0, ac[:-1])
        super().__init__(**kwargs)
        self._map_tables: dict[torch.device, torch.Tensor] = {}

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        table = self._map_tables.get(t.device)
        if table is None:
            table = torch.tensor(self.timestep_map, dtype=torch.long, device=t.device)
            self._map_tables[t.device] = table
        return table[t.long()].to(t.dtype)
