"""OCR text accuracy: does the image show the text the prompt asks for?

score = 1 - NED(read, target),  NED(a, b) = Levenshtein(a, b) / max(|a|, |b|)   (in [0, 1])

* target: ``metadata["text"]`` if present, else the quoted spans of the prompt in order ('…' "…" ‘…’ “…”
  「…」 『…』; an apostrophe inside a word is not a quote), joined; no target -> None (no score).
* read: every text line the engine finds, in its reading order, joined.
* both compared case-insensitively with all whitespace removed.

Engines (``args.engine``):
* ``rapidocr`` (default): PP-OCR det/cls/rec ONNX models that ship inside the ``rapidocr`` wheel (PP-OCRv6
  small, language ``ch``: Chinese and English). Their paths are given explicitly so nothing is downloaded.
  The detector sees the image at its own size, shrunk so its longer side is at most
  ``args.det_limit_side_len`` (960; RapidOCR's own default instead enlarges the shorter side to 736 px, so a
  512 px image is detected at a larger size than its own).
* ``paddle``: PaddleOCR with local model folders ``args.det_model_dir`` and ``args.rec_model_dir``
  (``pip install 'tandem-rl[paddle]'``); PaddleOCR cannot download models here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from tandem.rewards.base import RewardConfigError, ScoresWithInfo, register

QUOTES = re.compile(r"\"([^\"]+)\"|“([^”]+)”|‘([^’]+)’|「([^」]+)」|『([^』]+)』|(?<!\w)'([^']+)'(?!\w)")
_WHITESPACE = re.compile(r"\s+")


def target_text(prompt: str, metadata: dict) -> Optional[str]:
    """metadata["text"] if given, else the prompt's quoted spans joined; None when there is no target."""
    text = metadata.get("text")
    if text is None:
        spans = ["".join(m.groups(default="")) for m in QUOTES.finditer(prompt)]
        text = " ".join(spans)
    return text if normalise(text) else None


def normalise(text: str) -> str:
    return _WHITESPACE.sub("", text).casefold()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute: cost 1 each), O(|a| |b|) time, O(|b|) memory."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_score(read: str, target: str) -> float:
    """1 - Levenshtein / max length, after lower-casing and removing whitespace."""
    a, b = normalise(read), normalise(target)
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


# ------------------------------------------------------------------------------------------------- engines
def _rapidocr(args: Dict) -> Callable[[np.ndarray], str]:
    import rapidocr
    from rapidocr import RapidOCR

    models = Path(rapidocr.__file__).parent / "models"
    shipped = {
        "Det.model_path": models / "PP-OCRv6_det_small.onnx",
        "Cls.model_path": models / "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
        "Rec.model_path": models / "PP-OCRv6_rec_small.onnx",
    }
    for path in shipped.values():
        if not path.is_file():
            raise RewardConfigError(f"reward 'ocr': the rapidocr wheel has no {path.name} (expected at {path}); reinstall rapidocr 3.10")
    params = {key: str(path) for key, path in shipped.items()}
    params.update({"Global.log_level": "error", "Det.limit_type": "max", "Det.limit_side_len": int(args.pop("det_limit_side_len", 960))})
    if args:
        raise RewardConfigError(f"reward 'ocr': unknown args for engine 'rapidocr': {', '.join(args)} (allowed: engine, det_limit_side_len)")
    engine = RapidOCR(params=params)

    def read(image: np.ndarray) -> str:
        result = engine(np.ascontiguousarray(image[..., ::-1]))  # RapidOCR takes BGR arrays
        return "".join(result.txts or ())

    return read


def _paddle(args: Dict) -> Callable[[np.ndarray], str]:
    dirs = {key: args.get(key) for key in ("det_model_dir", "rec_model_dir")}
    unknown = set(args) - {"det_model_dir", "rec_model_dir", "det_model_name", "rec_model_name"}
    if unknown:
        raise RewardConfigError(f"reward 'ocr': unknown args for engine 'paddle': {', '.join(sorted(unknown))}")
    for key, path in dirs.items():
        if not path or not Path(path).is_dir():
            raise RewardConfigError(f"reward 'ocr' with engine 'paddle' needs args.{key}: a local PaddleOCR model folder (got {path!r})")
    try:
        from paddleocr import PaddleOCR
    except ImportError:
        raise RewardConfigError("reward 'ocr' with engine 'paddle' needs the paddleocr package: pip install 'tandem-rl[paddle]' (or use args.engine: rapidocr)") from None
    engine = PaddleOCR(
        text_detection_model_dir=dirs["det_model_dir"],
        text_recognition_model_dir=dirs["rec_model_dir"],
        text_detection_model_name=args.get("det_model_name"),
        text_recognition_model_name=args.get("rec_model_name"),
        use_doc_orientation_classify=False,
        use_doc_unwarping=False,
        use_textline_orientation=False,
    )

    def read(image: np.ndarray) -> str:
        return "".join(text for page in engine.predict(np.ascontiguousarray(image[..., ::-1])) for text in page["rec_texts"])

    return read


ENGINES: Dict[str, Callable[[Dict], Callable[[np.ndarray], str]]] = {"rapidocr": _rapidocr, "paddle": _paddle}


@register("ocr")
class OcrReward:
    """OCR accuracy 1 - NED(read text, quoted/metadata target text); None without a target (RapidOCR/PaddleOCR)."""

    def __init__(self, engine: str = "rapidocr", **engine_args):
        if engine not in ENGINES:
            raise RewardConfigError(f"reward 'ocr': args.engine is {engine!r}; allowed: {', '.join(ENGINES)}")
        self.read = ENGINES[engine](dict(engine_args))

    def __call__(self, images: np.ndarray, prompts: List[str], metadata: List[dict]) -> ScoresWithInfo:
        """Scores, with info {"read": text read, "target": target text} per sample (``tandem score`` shows it)."""
        out: List[Optional[float]] = []
        info: List[dict] = []
        for image, prompt, meta in zip(images, prompts, metadata):
            target = target_text(prompt, meta)
            read = None if target is None else self.read(image)
            out.append(None if target is None else text_score(read, target))
            info.append({"read": read, "target": target})
        return ScoresWithInfo(out, info)
