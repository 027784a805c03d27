"""Prompt files and images: the formats every layer reads.

Formats:
* ``.txt`` — one prompt per line (blank lines and lines starting with ``#`` are skipped);
* ``.jsonl`` — one object per line: ``{"prompt": str, "text": str?, "reference": path?, ...}``. Every key but
  ``prompt`` goes into the sample's metadata; ``reference`` (a path relative to the file) is loaded as an
  (H, W, 3) uint8 RGB array under ``metadata["reference"]``, keeping the path in ``reference_path``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from tandem.core.errors import ConfigError
from tandem.core.types import PromptRecord



def load_image(path: Path, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """RGB uint8 (H, W, 3); resized to ``size`` = (height, width) when given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"cannot read image {path}: {type(e).__name__}") from None


def load_prompts(path: str, image_size: Optional[Tuple[int, int]] = None) -> List[PromptRecord]:
    """Read a prompt file; bad lines raise ConfigError naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt file not found: {path}")
    records: List[PromptRecord] = []
    lines = p.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip() or (p.suffix != ".jsonl" and line.lstrip().startswith("#")):
            continue
        if p.suffix != ".jsonl":
            records.append(PromptRecord(line.strip(), {}))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ConfigError(f"{path}:{n}: each line needs a string field 'prompt'")
        meta = {k: v for k, v in obj.items() if k != "prompt"}
        if "reference" in meta:
            ref = p.parent / str(meta["reference"])
            meta["reference_path"] = str(ref)
            meta["reference"] = load_image(ref, image_size)
        records.append(PromptRecord(obj["prompt"], meta))
    if not records:
        raise ConfigError(f"prompt file {path} has no prompts")
    return records
