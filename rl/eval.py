"""Text-rendering evaluation in the manner of CVTG-2k / LongText-Bench: generate, read with OCR, score.

For every prompt with a target text (``metadata["text"]``, else the prompt's quoted spans — the same rule as
the ``ocr`` reward, ``rewards.ocr.target_text``) the image is read by the OCR engine of the ``ocr`` reward
(``OcrReward(...).read``: every text line, in reading order, joined) and scored two ways:

* **word accuracy** = found / words.
  Words of the target: after case folding, each CJK character is one word; every other maximal run of
  letters and digits is one word (punctuation, whitespace and ``_`` separate words and are not words).
  The OCR text is reduced to its letters and digits (case-folded, no separators: OCR often drops or invents
  spaces, and lines are joined). A target word is *found* when it occurs as a substring of that string;
  words are matched longest first and each match is cut out of the string, so one read character counts for
  one target word at most (two "GO" in the target need two "go" in the image).
  Per sample: found_i / words_i. Overall and per language: pooled, sum(found) / sum(words).
* **NED** = Levenshtein(read, target) / max(|read|, |target|) after case folding and removing all whitespace
  (``rewards.ocr.text_score`` = 1 - NED). Reported as the mean NED and the mean 1 - NED over samples.

Language of a sample: ``zh`` when its target has any CJK character, else ``en``. A sample whose target has
no word (no target, or punctuation only) is left out.

``score_text_rendering(images, prompts, targets)`` scores images generated elsewhere (the trainer's periodic
eval); ``text_eval(cfg, checkpoint, prompts)`` generates them with the configured family's pipeline
(the family's ``generate``), scores them and writes ``<output_dir>/eval/``: ``text_eval.json`` (summary),
``text_eval_samples.jsonl`` (one line per sample) and ``text_eval.png`` (the image grid); and
``<output_dir>/config.yaml`` when the folder has none yet (a training run's config is kept).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from tandem.rewards.ocr import OcrReward, target_text, text_score
from tandem.rl.config import ConfigError, JobConfig, to_yaml

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "text_eval_prompts.jsonl"
# CJK Unified Ideographs (+ extension A, compatibility ideographs, extensions B-G).
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_ALNUM = re.compile(r"[^\W_]")
_HAS_CJK = re.compile(rf"[{_CJK}]")
METRICS = ("word_accuracy", "one_minus_ned", "ned")


def language(text: str) -> str:
    """``"zh"`` if ``text`` has a CJK character, else ``"en"``."""
    return "zh" if _HAS_CJK.search(text) else "en"


def target_words(text: str) -> List[str]:
    """Case-folded words of a target: one per CJK character, one per run of other letters/digits."""
    return _WORD.findall(text.casefold())


def words_found(read: str, words: Sequence[str]) -> int:
    """How many of ``words`` occur in the letters and digits of ``read`` (longest first, each match cut out)."""
    rest = "".join(_ALNUM.findall(read.casefold()))
    found = 0
    for word in sorted(words, key=len, reverse=True):
        at = rest.find(word)
        if at >= 0:
            found += 1
            rest = rest[:at] + "\0" + rest[at + len(word):]
    return found


def scored_target(prompt: str, given: Optional[str]) -> Optional[str]:
    """The target text of a sample (``given``, else the prompt's quoted text); None when it has no word."""
    target = target_text(prompt, {} if given is None else {"text": given})
    return target if target is not None and target_words(target) else None


def _summary(rows: List[Dict]) -> Dict[str, float]:
    words = sum(r["words"] for r in rows)
    return {
        "n": len(rows),
        "words": words,
        "word_accuracy": sum(r["words_found"] for r in rows) / words,
        "one_minus_ned": float(np.mean([1.0 - r["ned"] for r in rows])),
        "ned": float(np.mean([r["ned"] for r in rows])),
    }


def score_text_rendering(
    images: np.ndarray,
    prompts: Sequence[str],
    targets: Sequence[Optional[str]],
    read: Optional[Callable[[np.ndarray], str]] = None,
) -> Dict:
    """OCR word accuracy and NED of generated images against their target texts.

    images:  uint8 (B, H, W, 3) RGB; prompts: B strings; targets: B target texts, None = the prompt's quoted
    text. Samples whose target has no word are skipped (counted in ``skipped``); none left -> ValueError.
    read:    image -> text; default the ``ocr`` reward's RapidOCR reader (built here: pass one to reuse it).

    Returns ``{"overall": S, "per_language": {"en": S, "zh": S}, "samples": [row, ...], "skipped": int,
    "metrics": {"eval/text/word_accuracy": ..., "eval/text/<lang>/ned": ..., ...}}`` where
    S = {n, words, word_accuracy (pooled), one_minus_ned (mean), ned (mean)} and each row has index (into
    images), prompt, target, language, ocr, words, words_found, word_accuracy, ned. ``metrics`` is flat, ready
    for ``metrics.jsonl``.
    """
    if len(prompts) != len(images) or len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts and {len(targets)} targets")
    read = read or OcrReward().read
    rows, skipped = [], 0
    for index, (image, prompt, given) in enumerate(zip(images, prompts, targets)):
        target = scored_target(prompt, given)
        if target is None:
            skipped += 1
            continue
        ocr = read(image)
        words = target_words(target)
        found = words_found(ocr, words)
        rows.append({
            "index": index, "prompt": prompt, "target": target, "language": language(target), "ocr": ocr,
            "words": len(words), "words_found": found, "word_accuracy": found / len(words), "ned": 1.0 - text_score(ocr, target),
        })
    if not rows:
        raise ValueError(f"none of the {len(prompts)} samples has a target text with a word to look for")
    per_language = {lang: _summary([r for r in rows if r["language"] == lang]) for lang in sorted({r["language"] for r in rows})}
    result = {"overall": _summary(rows), "per_language": per_language, "samples": rows, "skipped": skipped}
    metrics = {f"eval/text/{m}": result["overall"][m] for m in METRICS}
    metrics.update({f"eval/text/{lang}/{m}": s[m] for lang, s in per_language.items() for m in METRICS})
    result["metrics"] = metrics
    return result


def format_table(result: Dict) -> str:
    """The summary as a fixed-width text table: one row per language, then ``all``."""
    lines = [f"{'language':<9}{'n':>4}{'words':>7}{'word_acc':>10}{'1-NED':>8}{'NED':>8}"]
    named = list(result["per_language"].items()) + [("all", result["overall"])]
    for name, s in named:
        lines.append(f"{name:<9}{s['n']:>4}{s['words']:>7}{s['word_accuracy']:>10.3f}{s['one_minus_ned']:>8.3f}{s['ned']:>8.3f}")
    return "\n".join(lines)


def save_results(folder: Path, result: Dict, images: np.ndarray) -> Path:
    """Write ``text_eval.json`` (result without its samples), ``text_eval_samples.jsonl`` and ``text_eval.png``
    (the scored images, captioned with their targets) into ``folder``; returns the folder.
    images: the batch given to ``score_text_rendering`` (skipped samples are left out of the grid)."""
    from tandem.rl.run_dir import image_grid

    folder.mkdir(parents=True, exist_ok=True)
    scored = result["samples"]
    image_grid(images[[r["index"] for r in scored]], [r["target"] for r in scored]).save(folder / "text_eval.png")
    _write(folder / "text_eval_samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result["samples"]))
    summary = {k: v for k, v in result.items() if k != "samples"}
    _write(folder / "text_eval.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return folder


def _ocr_args(cfg: JobConfig) -> Dict:
    """Args of the config's first ``ocr`` reward entry (its engine and model paths), else the defaults."""
    for entry in cfg.rewards:
        if entry.name == "ocr":
            return dict(entry.args)
    return {}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def text_eval(cfg: JobConfig, checkpoint: Optional[str] = None, prompts: Optional[str] = None, batch_size: int = 8) -> Dict:
    """Generate one image per target-text prompt with the configured pipeline (``checkpoint``'s trained
    weights loaded when given), score them with ``score_text_rendering``, write ``<output_dir>/eval/``.

    prompts: a .jsonl/.txt prompt file (default ``data/text_eval_prompts.jsonl``); prompts without a target are
    left out. Image i uses seed ``cfg.seed + i // batch_size`` for its batch. Returns the result dict plus
    ``meta`` (prompt file, checkpoint, size, steps, guidance, seed).
    """
    from tandem.core.data import load_prompts
    from tandem.rl.sample import load_for_sampling

    prompts_file = str(prompts or DEFAULT_PROMPTS)
    every = load_prompts(prompts_file, allowed_roots=cfg.data.allowed_roots)
    records = [r for r in every if scored_target(r.prompt, r.metadata.get("text")) is not None]
    if not records:
        raise ConfigError(f"--prompts {prompts_file}: no prompt has a target text (quote it in the prompt or add a \"text\" field)")
    reader = OcrReward(**_ocr_args(cfg)).read  # before generating: a bad OCR config fails fast
    family, pipe = load_for_sampling(cfg, checkpoint)
    texts = [r.prompt for r in records]
    images = np.concatenate([
        family.generate(pipe, texts[i:i + batch_size], cfg, cfg.seed + i // batch_size) for i in range(0, len(texts), batch_size)
    ])
    result = score_text_rendering(images, texts, [r.metadata.get("text") for r in records], read=reader)
    result["meta"] = {
        "prompts": prompts_file, "checkpoint": checkpoint, "model": cfg.model.path, "height": cfg.data.height,
        "width": cfg.data.width, "num_steps": cfg.decoder.eval_num_steps, "guidance_scale": cfg.decoder.guidance_scale,
        "seed": cfg.seed, "prompts_without_target": len(every) - len(records),
    }
    run = Path(cfg.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "config.yaml").is_file():  # a run's own config is never replaced
        _write(run / "config.yaml", to_yaml(cfg))
    result["output"] = str(save_results(run / "eval", result, images))
    return result
