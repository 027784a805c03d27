"""Local weights for the model rewards: path checks that name the arg to fix, safe state-dict loading, devices.

Only safetensors files or ``torch.load(weights_only=True)`` state dicts are read — never arbitrary pickles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from tandem.rewards.base import RewardConfigError


def require_path(reward: str, key: str, path: Optional[str], kind: str = "file") -> Path:
    """``path`` as a Path if it exists as a ``kind`` ("file" or "dir"); else RewardConfigError naming args.<key>."""
    p = Path(path).expanduser() if path else None
    if p is None or not (p.is_file() if kind == "file" else p.is_dir()):
        what = "a local weights file (.safetensors or a torch state dict)" if kind == "file" else "a local model folder"
        raise RewardConfigError(f"reward '{reward}' needs args.{key}: {what}; got {path!r}, which is not an existing {kind}")
    return p


def load_state_dict(reward: str, key: str, path: Path) -> Dict:
    """Tensors of a .safetensors file, or a state dict saved with torch.save (read with weights_only=True)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise RewardConfigError(f"reward '{reward}': args.{key} = {str(path)!r} is not a readable safetensors/state-dict file ({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RewardConfigError(f"reward '{reward}': args.{key} = {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def load_into(reward: str, key: str, module, state: Dict) -> None:
    """load_state_dict(strict) with a one-line RewardConfigError naming args.<key> on mismatched keys/shapes."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise RewardConfigError(f"reward '{reward}': args.{key} does not fit the model: {detail}") from None


def torch_device(spec: str = "auto"):
    """"auto" -> cuda if available else cpu; otherwise torch.device(spec)."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)
