"""Deterministic decoding of AR tokens to pixels with a frozen decoder (ODE, Euler, release schedule).

Used by the AR policy to turn its full-grid tokens into images for the rewards, and by ``tandem sample``.
Initial noise is drawn per sample from ``seeds`` so that, in the AR stage, every copy of a prompt gets the
same noise (same seed per group) and reward differences come from the tokens only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from tandem.policies.glm_image import GlmImageAdapter


def initial_noise(adapter: GlmImageAdapter, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) float32 standard normal latents, row i drawn from ``torch.Generator().manual_seed(seeds[i])``."""
    shape = adapter.latent_shape(1, height, width)
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(rows).to(adapter.device)


@torch.no_grad()
def render_tokens(
    adapter: GlmImageAdapter,
    full_tokens: torch.Tensor,
    prompts: Sequence[str],
    height: int,
    width: int,
    num_steps: int,
    guidance_scale: float,
    seeds: Sequence[int],
    transformer=None,
    batch_cfg: bool = False,
) -> np.ndarray:
    """Full-grid AR tokens (B, th*tw) -> uint8 images (B, H, W, 3) by Euler steps x <- x + (sigma' - sigma) v."""
    transformer = transformer or adapter.pipe.transformer
    grids = adapter.grids(height, width)
    prior = adapter.upsample_prior(full_tokens.to(adapter.device), grids)
    glyph = adapter.glyph_embeds(prompts)
    neg = adapter.glyph_embeds([""] * len(prompts)) if guidance_scale > 1.0 else None
    timesteps, sigmas = adapter.schedule(num_steps, height, width)
    x = initial_noise(adapter, seeds, height, width)
    for i, t in enumerate(timesteps):
        v = adapter.velocity(transformer, x, t, prior, glyph, neg, guidance_scale, height, width, batch_cfg)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return adapter.decode(x)
