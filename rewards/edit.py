"""Edit faithfulness: how much of the source image (``metadata["reference"]``) an edited image keeps.

``source_structure``: the mean SSIM (Wang et al. 2004, "Image Quality Assessment: From Error Visibility to
Structural Similarity", eq. 13) between the luma of the image and of its source, over 7x7 uniform windows, with
C1 = (0.01·255)², C2 = (0.03·255)²::

    SSIM(x, y) = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))

"Keep what was not asked to change": a record's optional ``edit_region`` = [x0, y0, x1, y1] (fractions of the
width and height) marks where the edit may change the image; the score then averages only the windows that lie
wholly outside it. Score in [-1, 1], 1 = the kept part is unchanged; no source (or no window outside the region)
-> None. The source is resized (bicubic) to the image's size.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from tandem.rewards.base import register
from tandem.rewards.lpips import reference_image
from tandem.rewards.simple import LUMA

WINDOW = 7
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def _box_mean(a: np.ndarray) -> np.ndarray:
    """Mean of every WINDOW x WINDOW window of a (H, W) array ('valid' positions), (H-6, W-6)."""
    s = np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    w = WINDOW
    return (s[w:, w:] - s[:-w, w:] - s[w:, :-w] + s[:-w, :-w]) / (w * w)


def ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM of every 7x7 window of two (H, W) float64 luma images (module docstring), (H-6, W-6)."""
    mx, my = _box_mean(x), _box_mean(y)
    vx, vy = _box_mean(x * x) - mx * mx, _box_mean(y * y) - my * my
    cxy = _box_mean(x * y) - mx * my
    return ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2))


def _outside(region: Optional[Sequence[float]], height: int, width: int) -> np.ndarray:
    """(H-6, W-6) bool: windows that do not overlap the edit region (all windows when there is none)."""
    keep = np.ones((height - WINDOW + 1, width - WINDOW + 1), dtype=bool)
    if region is not None:
        x0, y0, x1, y1 = region
        r0, r1 = int(np.floor(y0 * height)), int(np.ceil(y1 * height))
        c0, c1 = int(np.floor(x0 * width)), int(np.ceil(x1 * width))
        keep[max(0, r0 - WINDOW + 1):r1, max(0, c0 - WINDOW + 1):c1] = False
    return keep


@register("source_structure")
def source_structure(images: np.ndarray, prompts: List[str], metadata: List[dict]) -> List[Optional[float]]:
    """Mean SSIM to the source image (metadata["reference"]) outside the optional edit_region; in [-1, 1]."""
    out = []
    for image, meta in zip(images, metadata):
        if meta.get("reference") is None:
            out.append(None)
            continue
        h, w = image.shape[:2]
        src = reference_image(meta["reference"], h, w)
        keep = _outside(meta.get("edit_region"), h, w)
        if not keep.any():
            out.append(None)
            continue
        s = ssim_map(image.astype(np.float64) @ LUMA, src.astype(np.float64) @ LUMA)
        out.append(float(s[keep].mean()))
    return out
