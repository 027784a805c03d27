"""The private library APIs tandem still needs, in one place (check them when upgrading transformers/diffusers).

* ``GlmImageProcessor._get_target_shape(height, width)`` -> (th, tw, ph, pw): the full and preview token grids
  of a target size; transformers 5.24 has no public equivalent, and the processor's layout depends on it.
"""

from __future__ import annotations

from typing import Tuple


def glm_image_grid_shape(processor, height: int, width: int) -> Tuple[int, int, int, int]:
    """(th, tw, ph, pw): full-grid and preview-grid token shape of a ``height`` x ``width`` image."""
    return processor._get_target_shape(height=height, width=width)
