"""VLM reward: a tiny random-init LLaVA (conftest ``tiny_vlm``: real classes, tokenizer trained on the fly)
saved with save_pretrained and loaded from disk by the reward."""

import numpy as np
import pytest
import torch

from tandem.rewards.base import RewardConfigError
from tandem.rewards.vlm import VlmReward

pytestmark = pytest.mark.slow  # a tiny VLM


def images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 48, 40, 3), dtype=np.uint8)


def test_scores_are_probabilities_and_batch_independent(tiny_vlm):
    reward = VlmReward(model_path=str(tiny_vlm), device="cpu")
    assert reward.yes_ids and reward.no_ids and set(reward.yes_ids).isdisjoint(reward.no_ids)
    prompts = ["a red cat", "a blue mat with a red cat on it"]  # different lengths: padding must not matter
    batch = reward(images(2), prompts, [{}, {}])
    assert all(0.0 < s < 1.0 for s in batch)
    alone = [reward(images(2)[i : i + 1], [prompts[i]], [{}])[0] for i in range(2)]
    np.testing.assert_allclose(batch, alone, atol=1e-5)


def test_score_is_the_yes_no_softmax_of_the_next_token(tiny_vlm):
    reward = VlmReward(model_path=str(tiny_vlm), device="cpu")
    score = reward(images(1), ["a red cat"], [{}])[0]
    from PIL import Image

    inputs = reward.processor(images=[Image.fromarray(images(1)[0])], text=[reward._text(reward.question.format(prompt="a red cat"))], return_tensors="pt")
    with torch.inference_mode():
        last = reward.model(**inputs).logits[0, -1]
    yes, no = torch.logsumexp(last[reward.yes_ids], 0), torch.logsumexp(last[reward.no_ids], 0)
    assert score == pytest.approx(float(torch.exp(yes) / (torch.exp(yes) + torch.exp(no))), abs=1e-6)


def test_missing_or_bad_model_path(tmp_path):
    with pytest.raises(RewardConfigError, match="needs args.model_path"):
        VlmReward()
    with pytest.raises(RewardConfigError, match="args.model_path .* is not a transformers image-text-to-text model folder"):
        VlmReward(model_path=str(tmp_path))
