"""LPIPS reward: random backbone through the real lpips code path, torchvision-format backbone loading."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import alexnet

from tandem.rewards.base import RewardConfigError
from tandem.rewards.lpips import LpipsReward


@pytest.fixture(scope="module")
def reward():
    torch.manual_seed(0)
    return LpipsReward(random_backbone=True, device="cpu")


def picture(seed: int, size=(64, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC))
    return smooth


def test_identical_is_zero_and_different_is_negative(reward):
    a, b = picture(0), picture(1)
    scores = reward(np.stack([a, a, b]), ["x"] * 3, [{"reference": a}, {}, {"reference": a}])
    assert scores[0] == pytest.approx(0.0, abs=1e-6)
    assert scores[1] is None  # no reference, no score
    assert scores[2] < -1e-4


def test_reference_path_and_resize(reward, tmp_path):
    a = picture(2)
    Image.fromarray(a).resize((128, 96), Image.BICUBIC).save(tmp_path / "ref.png")
    from_path = reward(a[None], ["x"], [{"reference": str(tmp_path / "ref.png")}])[0]
    far = reward(a[None], ["x"], [{"reference": picture(3)}])[0]
    assert from_path > far  # the resized copy of itself is closer than another picture


def test_backbone_from_a_torchvision_state_dict(reward, tmp_path):
    torch.manual_seed(1)
    state = alexnet(weights=None).state_dict()
    torch.save(state, tmp_path / "alexnet.pth")
    loaded = LpipsReward(backbone_weights=str(tmp_path / "alexnet.pth"), device="cpu")
    assert torch.equal(loaded.model.net.state_dict()["slice2.3.weight"], state["features.3.weight"])
    a, b = picture(4), picture(5)
    assert loaded(a[None], ["x"], [{"reference": b}])[0] < 0


def test_missing_backbone_names_the_arg(tmp_path):
    with pytest.raises(RewardConfigError, match="args.backbone_weights"):
        LpipsReward()
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(RewardConfigError, match="args.backbone_weights has no tensor 'features.0.bias'"):
        LpipsReward(backbone_weights=str(tmp_path / "bad.pth"))
    with pytest.raises(RewardConfigError, match="args.net is 'resnet'"):
        LpipsReward(net="resnet", random_backbone=True)
