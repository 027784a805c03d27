"""Prompt-image similarity rewards on open_clip CLIP models: HPSv2 and CLIPScore.

    c = <e_img / ||e_img||, e_txt / ||e_txt||>          (open_clip image and prompt embeddings)
    hpsv2:     score = c        (Wu et al. 2023, "Human Preference Score v2": the diagonal of
                                 image_features @ text_features.T in HPSv2's img_score.py; CLIP ViT-H/14
                                 fine-tuned on human preferences)
    clipscore: score = w * max(c, 0), w = args.w (2.5)   (Hessel et al. 2021, "CLIPScore")

Weights come from a local file ``args.weights``: an open_clip state dict of ``args.model_name`` (HPSv2:
HPS_v2_compressed.pt or HPS_v2.1_compressed.pt, whose tensors sit under "state_dict"; CLIPScore: e.g. the
OpenAI ViT-L/14 weights as an open_clip state dict), .safetensors or a torch state dict (read with
weights_only=True). ``args.random_init: true`` builds random weights instead (tests only). The prompt is
tokenised with open_clip's tokenizer of ``model_name`` (shipped with open_clip).
"""

from __future__ import annotations

from typing import List

import numpy as np

from tandem.rewards.base import RewardConfigError, register
from tandem.rewards.loading import load_into, load_state_dict, require_path, torch_device


class OpenClipSimilarity:
    """Cosine similarity c of open_clip image and prompt embeddings, mapped by ``transform`` (subclasses)."""

    reward_name = "?"
    default_model = "ViT-H-14"

    @classmethod
    def check_args(cls, weights: str = None, random_init: bool = False, **_):
        """The weights file as a Path (None with random_init); RewardConfigError if it is missing."""
        return None if random_init else require_path(cls.reward_name, "weights", weights)

    def __init__(self, weights: str = None, model_name: str = None, random_init: bool = False, device: str = "auto"):
        path = self.check_args(weights, random_init)
        model_name = model_name or self.default_model
        import open_clip

        if model_name not in open_clip.list_models():
            raise RewardConfigError(f"reward '{self.reward_name}': args.model_name {model_name!r} is not an open_clip model (e.g. {self.default_model})")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        if path is not None:
            load_into(self.reward_name, "weights", self.model, load_state_dict(self.reward_name, "weights", path))
        self.device = torch_device(device)
        self.model.to(self.device).eval()

    def transform(self, cosine):
        raise NotImplementedError

    def __call__(self, images: np.ndarray, prompts: List[str], metadata: List[dict]) -> List[float]:
        import torch
        from PIL import Image

        x = torch.stack([self.preprocess(Image.fromarray(np.asarray(img))) for img in images]).to(self.device)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        with torch.inference_mode():
            img = self.model.encode_image(x, normalize=True)
            txt = self.model.encode_text(tokens, normalize=True)
            return self.transform((img * txt).sum(-1)).float().cpu().tolist()


@register("hpsv2")
class HpsV2Reward(OpenClipSimilarity):
    """HPSv2 human-preference score: cosine of open_clip ViT-H/14 image and prompt embeddings (local weights)."""

    reward_name = "hpsv2"
    default_model = "ViT-H-14"

    def transform(self, cosine):
        return cosine


@register("clipscore")
class ClipScoreReward(OpenClipSimilarity):
    """CLIPScore w*max(cos(image, prompt), 0), w = args.w (2.5), on an open_clip CLIP (local weights)."""

    reward_name = "clipscore"
    default_model = "ViT-L-14"

    def __init__(self, weights: str = None, model_name: str = None, w: float = 2.5, random_init: bool = False, device: str = "auto"):
        super().__init__(weights, model_name, random_init, device)
        self.w = float(w)

    def transform(self, cosine):
        return self.w * cosine.clamp(min=0)
