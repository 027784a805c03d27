"""Deterministic sampling with a frozen or trained denoiser: Euler steps of the probability-flow ODE.

Used for eval images and sample grids of the flow policy, and by the GLM-Image AR policy to turn its token
grids into images for the rewards (there every copy of a prompt gets the same noise seed, so reward differences
within a group come from the tokens only).
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from tandem.policies.sde import ode_step


def seeded_noise(shape: Tuple[int, ...], seeds: Sequence[int], device: torch.device) -> torch.Tensor:
    """(len(seeds), *shape) float32 standard normal, row i from ``torch.Generator().manual_seed(seeds[i])``
    (drawn on the CPU, so the same seed gives the same noise on every device)."""
    rows = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(rows).to(device)


@torch.no_grad()
def ode_sample(adapter, model: torch.nn.Module, cond: Dict[str, torch.Tensor], seeds: Sequence[int], num_steps: int,
               guidance_scale: float) -> np.ndarray:
    """Images (B, H, W, 3) uint8 from ``adapter`` (a ``FlowAdapter``): x <- x + (sigma' - sigma) v, from noise."""
    timesteps, sigmas = adapter.schedule(num_steps)
    x = adapter.initial_noise(seeds)
    for i, t in enumerate(timesteps):
        x = ode_step(adapter.velocity(model, x, t, cond, guidance_scale), x, sigmas[i], sigmas[i + 1])
    return adapter.decode(x)
