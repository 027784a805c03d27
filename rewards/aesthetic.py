"""LAION aesthetic score: an open_clip CLIP image embedding fed to the LAION "improved aesthetic predictor" MLP.

    e = encode_image(x) / ||encode_image(x)||_2          (CLIP ViT-L/14: 768-d)
    score = MLP(e),  MLP = 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (linear layers; dropout 0.2, 0.2, 0.1 between
            the first four, inactive at eval), as in github.com/christophschuhmann/improved-aesthetic-predictor

Weights come from local files: ``args.clip_weights`` (an open_clip CLIP state dict — only its ``visual.*``
tensors are used — or a visual-tower state dict) and ``args.head_weights`` (the MLP, keys ``layers.N.*``);
.safetensors or torch state dicts. ``args.random_init: true`` builds random weights instead (tests only).
"""

from __future__ import annotations

from typing import List

import numpy as np

from tandem.rewards.base import RewardConfigError, register
from tandem.rewards.loading import load_into, load_state_dict, require_path, torch_device

HEAD_WIDTHS = (1024, 128, 64, 16, 1)
HEAD_DROPOUT = (0.2, 0.2, 0.1)


def aesthetic_head(in_dim: int):
    """The LAION MLP as a module whose state-dict keys match the released file (layers.0, 2, 4, 6, 7)."""
    from torch import nn

    layers, width = [], in_dim
    for k, out in enumerate(HEAD_WIDTHS):
        layers.append(nn.Linear(width, out))
        if k < len(HEAD_DROPOUT):
            layers.append(nn.Dropout(HEAD_DROPOUT[k]))
        width = out
    return nn.ModuleDict({"layers": nn.Sequential(*layers)})


def _visual_tensors(state: dict) -> dict:
    prefixed = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    return prefixed or state


@register("aesthetic")
class AestheticReward:
    """LAION aesthetic predictor: CLIP ViT-L/14 image embedding -> MLP head (weights from local paths)."""

    @staticmethod
    def check_args(clip_weights: str = None, head_weights: str = None, random_init: bool = False, **_) -> dict:
        """The weight files as {arg: Path} (none with random_init); RewardConfigError naming a missing one."""
        if random_init:
            return {}
        return {key: require_path("aesthetic", key, value) for key, value in (("clip_weights", clip_weights), ("head_weights", head_weights))}

    def __init__(self, clip_weights: str = None, head_weights: str = None, model_name: str = "ViT-L-14", random_init: bool = False, device: str = "auto"):
        paths = self.check_args(clip_weights, head_weights, random_init)
        states = {key: load_state_dict("aesthetic", key, path) for key, path in paths.items()} or None
        import open_clip

        if model_name not in open_clip.list_models():
            raise RewardConfigError(f"reward 'aesthetic': args.model_name {model_name!r} is not an open_clip model (e.g. ViT-L-14)")
        model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, pretrained_text=False)
        self.visual = model.visual
        self.head = aesthetic_head(open_clip.get_model_config(model_name)["embed_dim"])
        if states is not None:
            load_into("aesthetic", "clip_weights", self.visual, _visual_tensors(states["clip_weights"]))
            load_into("aesthetic", "head_weights", self.head, states["head_weights"])
        self.device = torch_device(device)
        self.visual.to(self.device).eval()
        self.head.to(self.device).eval()

    def __call__(self, images: np.ndarray, prompts: List[str], metadata: List[dict]) -> List[float]:
        import torch
        from PIL import Image

        x = torch.stack([self.preprocess(Image.fromarray(np.asarray(img))) for img in images]).to(self.device)
        with torch.inference_mode():
            emb = self.visual(x)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return self.head["layers"](emb).squeeze(-1).float().cpu().tolist()
