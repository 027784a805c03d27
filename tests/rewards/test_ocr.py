"""OCR reward: text rendered with PIL (English and Chinese, plain and cluttered backgrounds) read by RapidOCR."""

import os
import socket

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from tandem.rewards.base import RewardConfigError
from tandem.rewards.ocr import OcrReward, levenshtein, target_text, text_score

pytestmark = pytest.mark.slow  # real OCR models

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
WQY = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"

ENGLISH = [
    "Hello World", "OPEN 24 HOURS", "Fresh Coffee", "Exit Only", "Welcome Home", "No Parking", "Grand Opening",
    "Summer Sale 50%", "Library", "Bakery & Cafe", "Pizza Night", "Station 9", "Keep Calm", "Good Morning",
    "Happy Birthday", "Danger Zone", "Green Valley", "Ocean Drive", "Quiet Please", "Stop", "Tandem RL 2026",
    "Blue Moon Diner",
]
CHINESE = ["欢迎光临", "新年快乐", "北京大学", "禁止吸烟", "图书馆", "春天来了"]


def render(text: str, font_path: str, cluttered: bool, seed: int) -> np.ndarray:
    """A 448x160 RGB image with ``text`` in dark ink; cluttered: pale shapes and lines behind it, two lines
    across it, Gaussian pixel noise (sigma 18) over it."""
    rng = np.random.default_rng(seed)
    w, h = 448, 160
    if cluttered:
        base = rng.integers(170, 256, size=(h, w, 3), dtype=np.uint8)
        im = Image.fromarray(base)
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 30))
            box = [x0, y0, x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(15, 80))]
            fill = tuple(int(c) for c in rng.integers(150, 240, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        for _ in range(8):
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
            draw.line(pts, fill=tuple(int(c) for c in rng.integers(90, 200, size=3)), width=int(rng.integers(1, 3)))
    else:
        im = Image.new("RGB", (w, h), (250, 248, 240))
        draw = ImageDraw.Draw(im)
    font = ImageFont.truetype(font_path, 44)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((w - (right - left)) / 2 - left, (h - (bottom - top)) / 2 - top), text, fill=(20, 20, 30), font=font)
    if cluttered:  # two thin lines across the text, then pixel noise over everything
        for _ in range(2):
            draw.line([(0, int(rng.integers(40, h - 40))), (w, int(rng.integers(40, h - 40)))], fill=(120, 60, 60), width=1)
        noisy = np.asarray(im).astype(np.int16) + rng.normal(0, 18, size=(h, w, 3)).astype(np.int16)
        return np.clip(noisy, 0, 255).astype(np.uint8)
    return np.asarray(im)


@pytest.fixture(scope="module")
def ocr():
    return OcrReward()


@pytest.fixture(scope="module")
def rendered():
    cases = [(t, DEJAVU) for t in ENGLISH] + [(t, WQY) for t in CHINESE]
    images, texts, kinds = [], [], []
    for i, (text, font) in enumerate(cases):
        for cluttered in (False, True):
            images.append(render(text, font, cluttered, seed=i))
            texts.append(text)
            kinds.append(("zh" if font == WQY else "en") + ("/cluttered" if cluttered else "/plain"))
    return np.stack(images), texts, np.array(kinds)


def test_fonts_present():
    for path in (DEJAVU, WQY):
        assert os.path.isfile(path), f"{path} missing: run `make system-deps` (Debian fonts-dejavu-core, fonts-wqy-microhei)"


def test_right_target_scores_high_and_wrong_target_low(ocr, rendered):
    images, texts, kinds = rendered
    right = np.array(ocr(images, [f'a sign that says "{t}"' for t in texts], [{} for _ in texts]), dtype=float)
    # Wrong target: another string of the same script (shifted by 2 cases, the same string never lands on itself).
    wrong_texts = [texts[(i + 4) % len(texts)] if kinds[i].startswith("en") else CHINESE[(CHINESE.index(texts[i]) + 1) % len(CHINESE)] for i in range(len(texts))]
    wrong = np.array(ocr(images, ["a sign"] * len(texts), [{"text": t} for t in wrong_texts]), dtype=float)
    report = {k: (round(right[kinds == k].mean(), 3), round(wrong[kinds == k].mean(), 3)) for k in sorted(set(kinds))}
    print(f"\nOCR mean score (right target, wrong target) per kind: {report}; overall right {right.mean():.3f} wrong {wrong.mean():.3f}")
    assert right.mean() >= 0.9, report
    assert wrong.mean() <= 0.5, report
    for kind in ("en", "zh"):
        mask = np.char.startswith(kinds, kind)
        assert right[mask].mean() >= 0.85, report


def test_no_target_is_none_and_metadata_wins(ocr):
    image = render("Fresh Coffee", DEJAVU, False, 0)[None]
    assert ocr(image, ["a plain photo of a cup"], [{}]) == [None]
    # metadata["text"] beats the quoted text of the prompt.
    assert ocr(image, ['a sign "Closed"'], [{"text": "fresh coffee"}])[0] == pytest.approx(1.0)
    assert ocr(image, ['a sign "Closed"'], [{}])[0] < 0.5


def test_no_network_and_shipped_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the OCR reward tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    reward = OcrReward()
    assert reward(render("Stop", DEJAVU, False, 1)[None], ['"Stop"'], [{}])[0] == pytest.approx(1.0)


def test_target_extraction():
    assert target_text("""a cat's sign saying 'Hi there' and "Bye" """, {}) == "Hi there Bye"
    assert target_text("海报上写着「你好」和『世界』", {}) == "你好 世界"
    assert target_text("curly ‘one’ “two”", {}) == "one two"
    assert target_text("the dog's bowl", {}) is None
    assert target_text('"   "', {}) is None
    assert target_text("no quotes", {"text": "Given"}) == "Given"


def test_text_score_math():
    assert levenshtein("kitten", "sitting") == 3
    assert text_score("Hello World", "helloworld") == 1.0
    assert text_score("", "abcd") == 0.0
    assert text_score("abcd", "abxd") == pytest.approx(0.75)
    assert text_score("abc", "abcdef") == pytest.approx(0.5)


def test_engine_config_errors(tmp_path):
    with pytest.raises(RewardConfigError, match="args.engine is 'tesseract'; allowed: rapidocr, paddle"):
        OcrReward(engine="tesseract")
    with pytest.raises(RewardConfigError, match="args.det_model_dir"):
        OcrReward(engine="paddle", rec_model_dir=str(tmp_path))
    with pytest.raises(RewardConfigError, match="args.rec_model_dir"):
        OcrReward(engine="paddle", det_model_dir=str(tmp_path), rec_model_dir=str(tmp_path / "missing"))
    with pytest.raises(RewardConfigError, match="unknown args for engine 'rapidocr': lang"):
        OcrReward(lang="en")
