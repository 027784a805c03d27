"""Cheap pixel-statistics rewards for demos and tests: smooth signals a tiny random decoder can learn.

All take images uint8 (B, H, W, 3) RGB and return B floats (higher is better).
"""

from __future__ import annotations

import io
from typing import List, Sequence

import numpy as np

from tandem.rewards.base import register

# ITU-R BT.601 luma weights.
LUMA = np.array([0.299, 0.587, 0.114])


@register("jpeg_compressibility")
def jpeg_compressibility(images: np.ndarray, prompts: List[str], metadata: List[dict], quality: int = 95) -> List[float]:
    """Negative JPEG size in kB (quality 95, as flow_grpo): simpler images score higher."""
    from PIL import Image

    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img)).save(buf, format="JPEG", quality=quality)
        out.append(-buf.tell() / 1000.0)
    return out


@register("brightness")
def brightness(images: np.ndarray, prompts: List[str], metadata: List[dict], target: float = 0.5) -> np.ndarray:
    """-|mean luma - target|, luma = (0.299 R + 0.587 G + 0.114 B) / 255 in [0, 1]; args: target."""
    luma = (images.reshape(len(images), -1, 3).astype(np.float64) @ LUMA).mean(axis=1) / 255.0
    return -np.abs(luma - float(target))


@register("color")
def color(images: np.ndarray, prompts: List[str], metadata: List[dict], rgb: Sequence[float] = (255, 0, 0)) -> np.ndarray:
    """-||mean RGB - args.rgb||_2 / (255 sqrt 3), in [-1, 0]: closeness of the mean colour to a target."""
    target = np.asarray(rgb, dtype=np.float64)
    if target.shape != (3,):
        raise ValueError(f"color reward: args.rgb must be three numbers 0..255, got {list(rgb)}")
    mean = images.reshape(len(images), -1, 3).astype(np.float64).mean(axis=1)
    return -np.linalg.norm(mean - target, axis=1) / (255.0 * np.sqrt(3.0))
