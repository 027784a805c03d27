"""Perceptual closeness to a reference image: reward = -LPIPS(image, metadata["reference"]).

LPIPS (Zhang et al. 2018, the ``lpips`` package, v0.1): unit-normalised backbone features of both images at
L layers, squared differences weighted per channel by learned linear heads, averaged over space, summed
over layers; 0 = identical, larger = more different.

* linear heads: shipped inside the ``lpips`` package (read with ``torch.load(weights_only=True)``);
* backbone (``args.net``: alex | vgg | squeeze): torchvision's ImageNet weights from a local file,
  ``args.backbone_weights`` (the torchvision state dict, e.g. alexnet-owt-7be5be79.pth, or .safetensors);
  ``args.random_backbone: true`` uses a random backbone instead (tests only).
* reference: an (H, W, 3) uint8 RGB array or an image path, resized (bicubic) to the scored image's size;
  no reference -> None (no score).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional

import numpy as np

from tandem.rewards.base import RewardConfigError, register
from tandem.rewards.loading import load_into, load_state_dict, require_path, torch_device

NETS = ("alex", "vgg", "squeeze")


def reference_image(ref, height: int, width: int) -> np.ndarray:
    """A reference (array or path) as uint8 (height, width, 3) RGB."""
    from PIL import Image

    im = Image.open(ref).convert("RGB") if isinstance(ref, (str, Path)) else Image.fromarray(np.asarray(ref, dtype=np.uint8))
    if im.size != (width, height):
        im = im.resize((width, height), Image.BICUBIC)
    return np.asarray(im)


def _backbone_tensors(net_module, torchvision_state: dict) -> dict:
    """torchvision ``features.N.*`` tensors renamed to lpips' ``sliceK.N.*`` (lpips keeps torchvision's N)."""
    out = {}
    for name in net_module.state_dict():
        source = "features." + name.split(".", 1)[1]
        if source not in torchvision_state:
            raise RewardConfigError(f"reward 'lpips': args.backbone_weights has no tensor '{source}'; give torchvision's state dict of the args.net backbone")
        out[name] = torchvision_state[source]
    return out


@register("lpips")
class LpipsReward:
    """-LPIPS(image, metadata["reference"]); None without a reference (lpips package, local backbone weights)."""

    @staticmethod
    def check_args(backbone_weights: Optional[str] = None, random_backbone: bool = False, **_):
        """The backbone weights file as a Path (None with random_backbone); RewardConfigError if missing."""
        return None if random_backbone else require_path("lpips", "backbone_weights", backbone_weights)

    def __init__(self, backbone_weights: Optional[str] = None, net: str = "alex", random_backbone: bool = False, device: str = "auto"):
        if net not in NETS:
            raise RewardConfigError(f"reward 'lpips': args.net is {net!r}; allowed: {', '.join(NETS)}")
        state = None
        if not random_backbone:
            state = load_state_dict("lpips", "backbone_weights", self.check_args(backbone_weights))
        import lpips
        import torch

        with warnings.catch_warnings():  # lpips calls torchvision with its deprecated `pretrained=` argument
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        unexpected = self.model.load_state_dict(torch.load(str(heads), map_location="cpu", weights_only=True), strict=False).unexpected_keys
        if unexpected:
            raise RewardConfigError(f"reward 'lpips': the lpips package's {heads.name} does not fit LPIPS(net={net!r}): {unexpected[:3]}")
        if state is not None:
            load_into("lpips", "backbone_weights", self.model.net, _backbone_tensors(self.model.net, state))
        self.device = torch_device(device)
        self.model.to(self.device).eval()

    def __call__(self, images: np.ndarray, prompts: List[str], metadata: List[dict]) -> List[Optional[float]]:
        import torch

        out: List[Optional[float]] = [None] * len(images)
        have = [i for i, m in enumerate(metadata) if m.get("reference") is not None]
        if not have:
            return out
        h, w = images.shape[1:3]
        refs = np.stack([reference_image(metadata[i]["reference"], h, w) for i in have])

        def to_tensor(x: np.ndarray):  # uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]
            return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(self.device)

        with torch.inference_mode():
            distance = self.model(to_tensor(images[have]), to_tensor(refs)).flatten().cpu().tolist()
        for i, d in zip(have, distance):
            out[i] = -d
        return out
