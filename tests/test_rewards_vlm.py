"""VLM reward: a tiny random-init LLaVA (real classes, tokenizer trained on the fly) saved and loaded from disk."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from rewards.base import RewardConfigError
from rewards.vlm import VlmReward

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tiny_llava(folder) -> None:
    """Tokenizer (BPE trained here), CLIP image processor, 1-layer CLIP + Llama LLaVA: save_pretrained to folder."""
    corpus = ["user assistant Does this image show: a red cat on a blue mat? Answer yes or no. Yes No"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<pad>", "<s>", "</s>", "<image>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, intermediate_size=64, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llava")
    build_tiny_llava(folder)
    return folder


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

    inputs = reward.processor(images=[Image.fromarray(images(1)[0])], text=[reward._text("a red cat")], return_tensors="pt")
    with torch.inference_mode():
        last = reward.model(**inputs).logits[0, -1]
    yes, no = torch.logsumexp(last[reward.yes_ids], 0), torch.logsumexp(last[reward.no_ids], 0)
    assert score == pytest.approx(float(torch.exp(yes) / (torch.exp(yes) + torch.exp(no))), abs=1e-6)


def test_missing_or_bad_model_path(tmp_path):
    with pytest.raises(RewardConfigError, match="needs args.model_path"):
        VlmReward()
    with pytest.raises(RewardConfigError, match="args.model_path .* is not a transformers image-text-to-text model folder"):
        VlmReward(model_path=str(tmp_path))
