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


def _brightness_target(target: float = 0.5) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= float(target) <= 1.0:
        raise ValueError(f"brightness reward: args.target must be a number in [0, 1], got {target!r}")
    return float(target)


@register("brightness")
def brightness(images: np.ndarray, prompts: List[str], metadata: List[dict], target: float = 0.5) -> np.ndarray:
    """-|mean luma - target|, luma = (0.299 R + 0.587 G + 0.114 B) / 255 in [0, 1]; args: target."""
    luma = (images.reshape(len(images), -1, 3).astype(np.float64) @ LUMA).mean(axis=1) / 255.0
    return -np.abs(luma - _brightness_target(target))


def _rgb_target(rgb: Sequence[float] = (255, 0, 0)) -> np.ndarray:
    try:
        target = np.asarray(rgb, dtype=np.float64)
    except (TypeError, ValueError):
        target = np.zeros(0)
    if target.shape != (3,) or not np.all((target >= 0) & (target <= 255)):
        raise ValueError(f"color reward: args.rgb must be three numbers 0..255, got {rgb!r}")
    return target


@register("color")
def color(images: np.ndarray, prompts: List[str], metadata: List[dict], rgb: Sequence[float] = (255, 0, 0)) -> np.ndarray:
    """-||mean RGB - args.rgb||_2 / (255 sqrt 3), in [-1, 0]: closeness of the mean colour to a target."""
    target = _rgb_target(rgb)
    mean = images.reshape(len(images), -1, 3).astype(np.float64).mean(axis=1)
    return -np.linalg.norm(mean - target, axis=1) / (255.0 * np.sqrt(3.0))


# Checked when the reward is built (rewards.base: ``check_args``), so bad args fail before training.
brightness.check_args = _brightness_target
color.check_args = _rgb_target
