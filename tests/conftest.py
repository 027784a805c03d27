"""Shared fixtures. The tiny GLM-Image models are built once per test session and loaded from disk."""

import pytest

from policies.tiny import ensure_tiny_glm_image


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """Folder of a tiny random-init GlmImagePipeline written with save_pretrained."""
    return ensure_tiny_glm_image(tmp_path_factory.getbasetemp() / "tiny-glm-image")
