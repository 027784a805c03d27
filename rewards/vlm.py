"""VLM consistency: ask a local image-text-to-text model whether the image shows the prompt.

    question = "Does this image show: <prompt>? Answer yes or no."   (``args.question``, with {prompt})
    score = P(yes | image, question) / (P(yes | ...) + P(no | ...)) = sigmoid(l_yes - l_no)

on the next-token logits after the chat template's generation prompt, where l_yes = logsumexp of the logits of
the single-token spellings of "yes" ("yes", "Yes", with or without a leading space) and l_no likewise for "no".
Batches are padded on the right and read at each row's last real token, so a sample scores the same alone or
in any batch.

``args.mode: geneval`` asks, instead of that one question, the yes/no questions of the sample's GenEval
metadata (``rewards/geneval.py``: objects, counts, colours, positions) and scores the mean probability of the
passing answers, mean_q P(answer_q), with P(no) = 1 - P(yes); a sample without GenEval metadata scores None.

The model is loaded with ``AutoProcessor`` / ``AutoModelForImageTextToText`` from the local folder
``args.model_path`` (``local_files_only``: nothing is downloaded).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from tandem.rewards.base import RewardConfigError, register
from tandem.rewards.geneval import geneval_questions
from tandem.rewards.loading import require_path, torch_device

QUESTION = "Does this image show: {prompt}? Answer yes or no."
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODES = ("prompt", "geneval")


def single_token_ids(tokenizer, words: Sequence[str]) -> List[int]:
    """Ids of the spellings of ``words`` (bare, capitalised, with a leading space) that are one token."""
    ids = set()
    for word in words:
        for variant in {word, word.capitalize(), " " + word, " " + word.capitalize()}:
            encoded = tokenizer.encode(variant, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
    return sorted(ids)


@register("vlm")
class VlmReward:
    """VLM consistency: P(yes) that a local transformers VLM gives to "Does this image show: <prompt>?"."""

    @staticmethod
    def check_args(model_path: str = None, **_):
        """The model folder as a Path; RewardConfigError if it is missing."""
        return require_path("vlm", "model_path", model_path, kind="dir")

    def __init__(self, model_path: str = None, question: str = QUESTION, dtype: str = "auto", device: str = "auto", mode: str = "prompt"):
        path = self.check_args(model_path)
        if mode not in MODES:
            raise RewardConfigError(f"reward 'vlm': args.mode is {mode!r}; allowed: {', '.join(MODES)}")
        self.mode = mode
        if dtype not in DTYPES:
            raise RewardConfigError(f"reward 'vlm': args.dtype is {dtype!r}; allowed: {', '.join(DTYPES)}")
        if "{prompt}" not in question:
            raise RewardConfigError("reward 'vlm': args.question must contain {prompt}")
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(
                str(path), local_files_only=True, dtype=dtype if dtype == "auto" else getattr(torch, dtype)
            )
        except (OSError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise RewardConfigError(f"reward 'vlm': args.model_path {str(path)!r} is not a transformers image-text-to-text model folder ({first})") from None
        if not getattr(self.processor, "chat_template", None):
            raise RewardConfigError(f"reward 'vlm': the processor in args.model_path {str(path)!r} has no chat template")
        self.processor.tokenizer.padding_side = "right"
        self.yes_ids = single_token_ids(self.processor.tokenizer, ["yes"])
        self.no_ids = single_token_ids(self.processor.tokenizer, ["no"])
        if not self.yes_ids or not self.no_ids:
            raise RewardConfigError("reward 'vlm': the tokenizer in args.model_path has no single token for 'yes' or 'no'")
        self.question, self.device = question, torch_device(device)
        self.model = model.to(self.device).eval()

    def _text(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def p_yes(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> np.ndarray:
        """P(yes) per (image, question) pair, float64 (N,)."""
        import torch
        from PIL import Image

        batch = self.processor(
            images=[Image.fromarray(np.asarray(img)) for img in images],
            text=[self._text(q) for q in questions],
            return_tensors="pt",
            padding=True,
        ).to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            logits = self.model(**batch).logits
        last = batch["attention_mask"].sum(dim=1) - 1
        final = logits[torch.arange(len(questions), device=logits.device), last].float()
        margin = torch.logsumexp(final[:, self.yes_ids], dim=-1) - torch.logsumexp(final[:, self.no_ids], dim=-1)
        return torch.sigmoid(margin).double().cpu().numpy()

    def __call__(self, images: np.ndarray, prompts: List[str], metadata: List[dict]) -> List[Optional[float]]:
        if self.mode == "prompt":
            return self.p_yes(list(images), [self.question.format(prompt=p) for p in prompts]).tolist()
        asked = [(i, q, yes) for i, m in enumerate(metadata) for q, yes in geneval_questions(m)]
        if not asked:
            return [None] * len(prompts)
        p = self.p_yes([images[i] for i, _, _ in asked], [q for _, q, _ in asked])
        passed = np.where([yes for _, _, yes in asked], p, 1.0 - p)
        owner = np.array([i for i, _, _ in asked])
        return [float(passed[owner == i].mean()) if (owner == i).any() else None for i in range(len(prompts))]
