"""Shared fixtures. The tiny GLM-Image models are built once per test session and loaded from disk."""

import pytest

from policies.tiny import ensure_tiny_glm_image


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """Folder of a tiny random-init GlmImagePipeline written with save_pretrained."""
    return ensure_tiny_glm_image(tmp_path_factory.getbasetemp() / "tiny-glm-image")


@pytest.fixture(scope="session")
def plugin_path():
    """Make "tests.reward_plugins:attr" importable here and in Ray workers started afterwards (repo root on
    sys.path and PYTHONPATH), whatever the working directory."""
    import os
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return root


@pytest.fixture(scope="session")
def ray_cluster(plugin_path):
    """One local Ray cluster for the reward-hosting tests, started the way RewardClient embeds one
    (RewardClients created while it runs reuse it and leave it running)."""
    from rewards.host import Cluster
    from rl.config import RewardHostConfig

    cluster = Cluster(RewardHostConfig(num_cpus=2))
    cluster.start()
    yield cluster
    cluster.stop()
