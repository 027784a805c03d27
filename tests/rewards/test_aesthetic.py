"""Aesthetic reward: random-init tiny CLIP (conftest ``tiny_clip``) + LAION head through the real code path;
weights round trip through files."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tandem.rewards.aesthetic import AestheticReward
from tandem.rewards.base import RewardConfigError

pytestmark = pytest.mark.slow  # a tiny CLIP

@pytest.fixture(scope="module")
def random_reward(tiny_clip):
    torch.manual_seed(0)
    return AestheticReward(random_init=True, model_name=tiny_clip, device="cpu")


def images(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 80, 64, 3), dtype=np.uint8)


def test_random_init_scores_every_image(random_reward):
    scores = random_reward(images(), ["a", "b", "c"], [{}, {}, {}])
    assert len(scores) == 3 and all(np.isfinite(scores))
    assert random_reward(images()[:1], ["a"], [{}])[0] == pytest.approx(scores[0], abs=1e-5)  # eval mode, per-image
    assert len(set(np.round(scores, 6))) == 3


def test_head_matches_the_laion_layout(random_reward):
    shapes = {k: tuple(v.shape) for k, v in random_reward.head.state_dict().items() if k.endswith("weight")}
    assert shapes == {"layers.0.weight": (1024, 32), "layers.2.weight": (128, 1024), "layers.4.weight": (64, 128),
                      "layers.6.weight": (16, 64), "layers.7.weight": (1, 16)}


def test_weights_round_trip_through_files(random_reward, tiny_clip, tmp_path):
    clip = tmp_path / "clip.safetensors"  # a full-model file: visual.* keys, as open_clip checkpoints have
    save_file({f"visual.{k}": v.contiguous() for k, v in random_reward.visual.state_dict().items()}, str(clip))
    head = tmp_path / "head.pth"
    torch.save(random_reward.head.state_dict(), head)
    loaded = AestheticReward(clip_weights=str(clip), head_weights=str(head), model_name=tiny_clip, device="cpu")
    np.testing.assert_allclose(loaded(images(), ["a"] * 3, [{}] * 3), random_reward(images(), ["a"] * 3, [{}] * 3), rtol=1e-5)


def test_missing_or_wrong_weights_name_the_arg(random_reward, tiny_clip, tmp_path):
    with pytest.raises(RewardConfigError, match="args.clip_weights"):
        AestheticReward()
    (tmp_path / "clip.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RewardConfigError, match="args.head_weights"):
        AestheticReward(clip_weights=str(tmp_path / "clip.safetensors"), head_weights=str(tmp_path / "nope.pth"))
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "head.pth")
    with pytest.raises(RewardConfigError, match="args.clip_weights = .* is not a readable"):
        AestheticReward(clip_weights=str(tmp_path / "clip.safetensors"), head_weights=str(tmp_path / "head.pth"), model_name=tiny_clip)
    save_file({f"visual.{k}": v.contiguous() for k, v in random_reward.visual.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(RewardConfigError, match="args.head_weights does not fit the model"):
        AestheticReward(clip_weights=str(tmp_path / "clip.safetensors"), head_weights=str(tmp_path / "head.pth"), model_name=tiny_clip)
    with pytest.raises(RewardConfigError, match="args.model_name 'ViT-Q-99'"):
        AestheticReward(random_init=True, model_name="ViT-Q-99")
