"""``scripts/make_release_pipeline.py`` (the release-layout pipeline the end_to_end and profile runs read): the
image processor's bounds."""

import numpy as np

from benchmarks import common as C

mrp = C.release_tool()


def grid_of(image_processor, size: int):
    from PIL import Image

    image = Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8))
    return image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()


def test_reference_image_keeps_its_size():
    """A 1024^2 reference must give the 32x32 grid of the decoder's prior tokens; the class default gives 31x31."""
    from transformers import GlmImageImageProcessor

    default = GlmImageImageProcessor(patch_size=16, temporal_patch_size=1, merge_size=1)
    assert grid_of(default, 1024) == [1, 31, 31]  # 961 tokens, not the 1024 of a 32x32 grid
    assert grid_of(mrp.build_image_processor(), 1024) == [1, 32, 32]
    assert grid_of(mrp.build_image_processor(tiny=True), 64) == [1, 2, 2]
