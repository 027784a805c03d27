"""``tandem sample``: text -> AR tokens (preview + full grid) -> decoder -> pixels through ``GlmImagePipeline``."""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from tandem.rl.config import JobConfig
from tandem.core.data import load_prompts
from tandem.rl.run_dir import RunDir


def pipeline_images(pipe, prompts: List[str], cfg: JobConfig, seed: int) -> np.ndarray:
    """Run the real ``GlmImagePipeline.__call__`` (AR sampling with the model's generation config, then the
    decoder at the eval settings); returns (N, H, W, 3) uint8, deterministic under ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(
        prompt=prompts, height=cfg.data.height, width=cfg.data.width,
        num_inference_steps=cfg.decoder.eval_num_steps, guidance_scale=cfg.decoder.guidance_scale,
        generator=gen, output_type="np",
    )
    return (np.asarray(out.images) * 255).round().astype(np.uint8)


def run_sample(cfg: JobConfig, num_prompts: Optional[int] = None, checkpoint: Optional[str] = None) -> str:
    from tandem.policies.glm_image import load_pipeline

    records = load_prompts(cfg.data.prompts, (cfg.data.height, cfg.data.width))[: num_prompts or None]
    pipe = load_pipeline(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.create_tiny_if_missing)
    if checkpoint:
        from tandem.rl.checkpoint import load_trained_weights

        load_trained_weights(pipe, checkpoint)
    run = RunDir(cfg.output_dir).create(cfg)
    prompts = [r.prompt for r in records]
    images = pipeline_images(pipe, prompts, cfg, cfg.seed)
    return str(run.save_grid("sample", images, prompts))
