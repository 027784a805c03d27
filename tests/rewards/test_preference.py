"""The rewards flow_grpo users expect, on random-init tiny copies of their real architectures built offline and
loaded from disk the way the real weights are: PickScore (transformers CLIPModel), HPSv2 and CLIPScore
(open_clip), and GenEval-style questions through the `vlm` reward (conftest ``tiny_vlm``)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tandem.rewards.base import RewardConfigError
from tandem.rewards.clip_similarity import ClipScoreReward, HpsV2Reward
from tandem.rewards.geneval import geneval_questions
from tandem.rewards.pickscore import PickScoreReward
from tandem.rewards.vlm import VlmReward
from tests.cli_run import assert_user_mistake, tandem_cli

pytestmark = pytest.mark.slow  # tiny CLIP models

PROMPTS = ["a red apple on a wooden table", "a cat", "a sign that says OPEN above a shop door"]


def images(n=3):
    return np.random.default_rng(0).integers(0, 256, size=(n, 40, 48, 3), dtype=np.uint8)


def test_pickscore_is_the_scaled_cosine_of_clip_and_batch_independent(tiny_pickscore):
    reward = PickScoreReward(model_path=str(tiny_pickscore), device="cpu")
    scores = reward(images(), PROMPTS, [{}] * 3)
    alone = [reward(images()[i:i + 1], [PROMPTS[i]], [{}])[0] for i in range(3)]
    np.testing.assert_allclose(scores, alone, atol=1e-5)
    # the same number through CLIPModel's own forward: logits_per_image = exp(logit_scale) * cos
    inputs = reward.processor(text=PROMPTS, images=[Image.fromarray(x) for x in images()], return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = reward.model(**inputs).logits_per_image
    np.testing.assert_allclose(scores, torch.diagonal(logits).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls, expected", [(HpsV2Reward, lambda c: c), (ClipScoreReward, lambda c: 2.5 * np.maximum(c, 0))],
                         ids=["hpsv2", "clipscore"])
def test_open_clip_rewards_load_local_weights_and_match_the_model(tiny_open_clip, cls, expected):
    import open_clip

    name, path, model = tiny_open_clip
    reward = cls(weights=str(path), model_name=name, device="cpu")
    scores = np.array(reward(images(), PROMPTS, [{}] * 3))
    _, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    x = torch.stack([preprocess(Image.fromarray(img)) for img in images()])
    with torch.inference_mode():
        img, txt, _ = model(x, open_clip.get_tokenizer(name)(PROMPTS))[:3]
    np.testing.assert_allclose(scores, expected(torch.diagonal(img @ txt.T).numpy()), rtol=1e-5, atol=1e-6)
    assert cls(random_init=True, model_name=name, device="cpu")(images(1), PROMPTS[:1], [{}])[0] is not None


@pytest.mark.parametrize("reward, arg", [("pickscore", "model_path"), ("hpsv2", "weights"), ("clipscore", "weights")])
def test_missing_weights_are_one_config_line_exit_2(reward, arg, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "p.txt").write_text("x\n")
    proc = tandem_cli("score", "--reward", reward, "--args", json.dumps({arg: str(tmp_path / "nowhere")}),
                      "--images", tmp_path, "--prompts", tmp_path / "p.txt")
    assert_user_mistake(proc, f"reward '{reward}' needs args.{arg}")
    with pytest.raises(RewardConfigError, match=f"needs args.{arg}"):
        {"pickscore": PickScoreReward, "hpsv2": HpsV2Reward, "clipscore": ClipScoreReward}[reward]()


GENEVAL = [
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"},
    {"tag": "position", "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a dog right of a teddy bear"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "prompt": "a photo of a pink car"},
]


def test_geneval_questions():
    assert geneval_questions(GENEVAL[0]) == [("Are there at least 2 clock in the image?", True), ("Are there at least 3 clock in the image?", False)]
    assert geneval_questions(GENEVAL[1]) == [("Is there a teddy bear in the image?", True), ("Is there a dog in the image?", True),
                                             ("Is the dog right of the teddy bear?", True)]
    assert geneval_questions(GENEVAL[2]) == [("Is there a car in the image?", True), ("Is the car pink?", True)]
    assert geneval_questions({}) == []


def test_vlm_geneval_mode_scores_the_mean_probability_of_the_passing_answers(tiny_vlm):
    reward = VlmReward(model_path=str(tiny_vlm), device="cpu", mode="geneval")
    metadata = [{k: v for k, v in m.items() if k != "prompt"} for m in GENEVAL] + [{}]
    imgs = images(4)
    scores = reward(imgs, [m["prompt"] for m in GENEVAL] + ["no metadata"], metadata)
    assert scores[3] is None
    for i in range(3):
        questions = geneval_questions(metadata[i])
        p = reward.p_yes([imgs[i]] * len(questions), [q for q, _ in questions])
        assert scores[i] == pytest.approx(np.mean([pi if yes else 1 - pi for pi, (_, yes) in zip(p, questions)]), abs=1e-6)
    with pytest.raises(RewardConfigError, match="args.mode is 'vqa'"):
        VlmReward(model_path=str(tiny_vlm), mode="vqa")
