"""The contract every built-in reward keeps (one shared test, a new built-in only adds its case):
B scores as float64 (NaN = none), the same score for a sample alone or in a batch, and no writes into the
read-only arrays that the Ray object store hands out."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from tandem.rewards.base import BUILTIN_MODULES, build_reward, list_rewards, resolve
from tandem.rl.config import RewardEntry

pytestmark = pytest.mark.slow  # reward models


def builtin_names():
    return {name for name, _ in list_rewards() if resolve(name).target.__module__ in BUILTIN_MODULES}


@pytest.fixture(scope="module")
def cases(tiny_clip, tiny_vlm, tiny_pickscore, tiny_open_clip):
    """Built-in name -> args that build it offline (random init where the real weights are needed)."""
    return {
        "jpeg_compressibility": {},
        "brightness": {"target": 0.3},
        "color": {"rgb": [0, 200, 50]},
        "ocr": {},
        "hands": {"no_hand_score": 0.0},
        "lpips": {"random_backbone": True, "device": "cpu"},
        "aesthetic": {"random_init": True, "model_name": tiny_clip, "device": "cpu"},
        "vlm": {"model_path": str(tiny_vlm), "device": "cpu"},
        "pickscore": {"model_path": str(tiny_pickscore), "device": "cpu"},
        "hpsv2": {"weights": str(tiny_open_clip[1]), "model_name": tiny_open_clip[0], "device": "cpu"},
        "clipscore": {"weights": str(tiny_open_clip[1]), "model_name": tiny_open_clip[0], "device": "cpu"},
        "source_structure": {},
    }


def batch():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 64, 96, 3), dtype=np.uint8)
    sign = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(sign).text((8, 20), "OPEN", fill="black", font=ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 24))
    images[1] = np.asarray(sign)
    images.flags.writeable = False
    metadata = [{"reference": images[1].copy()}, {"text": "OPEN"}, {}]
    return images, ['a sign "OPEN"', "a sign", "noise"], metadata


def test_every_builtin_has_a_case(cases):
    assert builtin_names() == set(cases)


@pytest.mark.parametrize("name", ["jpeg_compressibility", "brightness", "color", "ocr", "hands", "lpips", "aesthetic", "vlm",
                                  "pickscore", "hpsv2", "clipscore", "source_structure"])
def test_builtin_contract(cases, name):
    reward = build_reward(RewardEntry(name=name, args=cases[name]))
    images, prompts, metadata = batch()
    scores = reward(images, prompts, metadata)
    assert scores.dtype == np.float64 and scores.shape == (3,)
    assert not np.isinf(scores).any() and not np.isnan(scores).all()
    alone = np.array([reward(images[i : i + 1], prompts[i : i + 1], metadata[i : i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(scores, alone, rtol=1e-5, atol=1e-5, equal_nan=True)
