"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"): a CLIP ViT-H/14 fine-tuned on human preferences.

    score = exp(logit_scale) * <e_img / ||e_img||, e_txt / ||e_txt||>

with e_img, e_txt the projected CLIP image and prompt embeddings and logit_scale the model's own (~4.6, so the
factor is ~100), as in the PickScore repository's inference example. flow_grpo divides it by 26; use the
entry's ``weight`` for that.

Weights come from local folders, loaded with transformers' ``CLIPModel`` / ``CLIPProcessor``
(``local_files_only``): ``args.model_path`` (e.g. a copy of yuvalkirstain/PickScore_v1) and
``args.processor_path`` (default: ``model_path``; the release uses the processor of
laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
"""

from __future__ import annotations

from typing import List

import numpy as np

from tandem.rewards.base import RewardConfigError, register
from tandem.rewards.loading import require_path, torch_device


@register("pickscore")
class PickScoreReward:
    """PickScore: human-preference CLIP-H score exp(logit_scale)*cos(image, prompt) (transformers CLIPModel, local folder)."""

    @staticmethod
    def check_args(model_path: str = None, processor_path: str = None, **_):
        """(model folder, processor folder) as Paths; RewardConfigError naming the missing one."""
        model = require_path("pickscore", "model_path", model_path, kind="dir")
        return model, require_path("pickscore", "processor_path", processor_path, kind="dir") if processor_path else model

    def __init__(self, model_path: str = None, processor_path: str = None, device: str = "auto"):
        model_dir, processor_dir = self.check_args(model_path, processor_path)
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.processor = CLIPProcessor.from_pretrained(str(processor_dir), local_files_only=True)
            self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise RewardConfigError(f"reward 'pickscore': args.model_path/processor_path is not a transformers CLIP folder ({first})") from None
        self.device = torch_device(device)
        self.model.to(self.device).eval()

    def __call__(self, images: np.ndarray, prompts: List[str], metadata: List[dict]) -> List[float]:
        import torch
        from PIL import Image

        pixels = self.processor(images=[Image.fromarray(np.asarray(img)) for img in images], return_tensors="pt").to(self.device)
        text = self.processor(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            # transformers 5: the projected embeddings are the outputs' pooler_output
            img = self.model.get_image_features(**pixels).pooler_output
            txt = self.model.get_text_features(**text).pooler_output
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            return (self.model.logit_scale.exp() * (img * txt).sum(-1)).float().cpu().tolist()
