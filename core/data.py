"""Prompt files and images: the formats every layer reads.

Formats:
* ``.txt`` — one prompt per line (blank lines and lines starting with ``#`` are skipped);
* ``.jsonl`` — one object per line: ``{"prompt": str, "text": str?, "reference": path?, ...}``. Every key but
  ``prompt`` goes into the sample's metadata; ``reference`` (a path relative to the file) is loaded as an
  (H, W, 3) uint8 RGB array under ``metadata["reference"]``, keeping the resolved path in ``reference_path``.

Prompt files are UTF-8 (a leading byte-order mark is dropped). A record's optional ``edit_region`` is
[x0, y0, x1, y1] in fractions of the width and height (0 <= x0 < x1 <= 1, the same for y); pixels are refused.
A ``reference`` must lie inside the prompt file's folder (after resolving ``..`` and
links) or inside one of the ``allowed_roots`` the caller passes (config key ``data.allowed_roots``): a prompt
file cannot make tandem read any file the user can read.

Images: 8-bit RGB is taken as it is; a 16-bit image is scaled to 8 bits (v / 257), an image with an alpha
channel is composited on white, a grayscale or palette image is expanded to RGB; each conversion is logged.
Images over PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are refused.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import numpy as np

from tandem.core.errors import ConfigError
from tandem.core.types import PromptRecord

log = logging.getLogger("tandem.data")

# Background an image's alpha channel is composited on (RGBA -> RGB).
ALPHA_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(im, path):
    """Any PIL image -> 8-bit RGB, logging what was converted (16-bit, alpha, grayscale, palette)."""
    from PIL import Image

    if im.mode in _SIXTEEN_BIT:  # PIL's convert("RGB") clips 16-bit values at 255 (mid-grey -> white)
        log.info("image %s: 16-bit %s scaled to 8 bits (v / 257)", path, im.mode)
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        log.warning("image %s: alpha channel composited on white %s", path, ALPHA_BACKGROUND)
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode in ("L", "1"):
        log.info("image %s: grayscale (%s) expanded to RGB", path, im.mode)
    return im.convert("RGB")


def load_image(path: Path, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """RGB uint8 (H, W, 3); resized to ``size`` = (height, width) when given (module docstring: conversions)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = _to_rgb(im, path)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BICUBIC)
                return np.asarray(im, dtype=np.uint8).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ConfigError(f"cannot read image {path}: {e}") from None
    except UnidentifiedImageError:
        raise ConfigError(f"cannot read image {path}: PIL cannot identify it as an image (not an image file, or its "
                          "header is corrupt)") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for a broken PNG chunk
        raise ConfigError(f"cannot read image {path}: {_reason(e, path)}") from None


def _reason(error: Exception, path) -> str:
    """PIL's or the OS's reason for a failed read, without the path it may repeat: "image file is truncated"."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = (str(error).strip().splitlines() or [""])[0]
    for shown in (f" '{path}'", f" {path}"):
        text = text.replace(shown, "")
    return text or type(error).__name__


def confined(path: Path, roots: Iterable, what: str) -> Path:
    """``path`` resolved, if it lies inside one of ``roots``; else a ConfigError naming ``data.allowed_roots``."""
    resolved = Path(os.path.realpath(path))
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    if not any(resolved == r or r in resolved.parents for r in real_roots):
        raise ConfigError(f"{what} {path} lies outside {', '.join(map(str, real_roots))}; move it there or add "
                          f"its folder to data.allowed_roots")
    return resolved


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's content without a leading byte-order mark; ConfigError (one line) when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def check_edit_region(region, where: str) -> None:
    """An ``edit_region`` must be [x0, y0, x1, y1] in fractions: 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1."""
    numbers = isinstance(region, (list, tuple)) and len(region) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in region)
    if not (numbers and 0 <= region[0] < region[2] <= 1 and 0 <= region[1] < region[3] <= 1):
        raise ConfigError(f"{where}: edit_region {region!r} must be [x0, y0, x1, y1] in fractions of the width and "
                          "height (0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1), not pixels: divide by the image size")


def load_prompts(path: str, image_size: Optional[Tuple[int, int]] = None,
                 allowed_roots: Iterable[str] = ()) -> List[PromptRecord]:
    """Read a prompt file; bad lines raise ConfigError naming file and line. A ``reference`` must lie inside
    the file's folder or ``allowed_roots``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt file not found: {path}")
    records: List[PromptRecord] = []
    lines = read_text_file(p, "prompt file").splitlines()
    roots = [p.parent, *allowed_roots]
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
        if "edit_region" in meta:
            check_edit_region(meta["edit_region"], f"{path}:{n}")
        if "reference" in meta:
            ref = confined(p.parent / str(meta["reference"]), roots, f"{path}:{n}: reference")
            meta["reference_path"] = str(ref)
            meta["reference"] = load_image(ref, image_size)
        records.append(PromptRecord(obj["prompt"], meta))
    if not records:
        raise ConfigError(f"prompt file {path} has no prompts")
    return records
