"""Text-rendering eval: the word rule, scoring PIL-rendered text with the real RapidOCR reader, and
`tandem eval` end to end on the tiny GLM-Image models."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from tests.cli_run import assert_user_mistake, tandem_cli
from tandem.rewards.ocr import OcrReward
from tandem.rl.eval import language, score_text_rendering, target_words, words_found

pytestmark = pytest.mark.slow  # CLI subprocesses and OCR

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
WQY = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"

# No word is shared inside a language, so a shifted target is all wrong.
ENGLISH = ["FRESH BREAD DAILY", "Summer Jazz Festival", "EXIT 42 NORTH", "Good Morning", "CAUTION WET FLOOR",
           "Stay Curious", "MAPLE AVENUE", "Quiz on Friday", "NOW SHOWING: RED PLANET", "Happy Birthday Anna"]
CHINESE = ["清风茶社", "新年快乐", "出口在右侧", "海边图书馆", "禁止吸烟"]


def render(text: str, font_path: str) -> np.ndarray:
    """512x192 RGB, dark text on a light background, words wrapped onto lines of at most 14 characters."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > 14:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    im = Image.new("RGB", (512, 192), (248, 246, 238))
    draw = ImageDraw.Draw(im)
    font = ImageFont.truetype(font_path, 40)
    draw.multiline_text((256, 96), "\n".join(lines), fill=(25, 25, 35), font=font, anchor="mm", align="center", spacing=8)
    return np.asarray(im)


def test_word_rule():
    assert target_words("NOW SHOWING: Red Planet!") == ["now", "showing", "red", "planet"]
    assert target_words("出口在右侧") == ["出", "口", "在", "右", "侧"]
    assert target_words("Exit 42 出口") == ["exit", "42", "出", "口"]
    assert target_words("...!") == []
    # letters and digits of the read text, no separators: joined lines and dropped spaces still match
    assert words_found("NOWSHOWING\nred-planet", target_words("now showing: red planet")) == 4
    # each read character serves one word: two "go" need two "go"; "go" inside "good" still counts once
    assert words_found("go", ["go", "go"]) == 1
    assert words_found("good go", ["good", "go"]) == 2
    assert words_found("出口在左侧", target_words("出口在右侧")) == 4
    assert language("Exit 出口") == "zh" and language("EXIT 42") == "en"


@pytest.fixture(scope="module")
def reader():
    return OcrReward().read


@pytest.fixture(scope="module")
def rendered():
    texts = ENGLISH + CHINESE
    images = np.stack([render(t, DEJAVU if language(t) == "en" else WQY) for t in texts])
    return images, texts


def test_right_targets_score_high_wrong_targets_low(reader, rendered):
    images, texts = rendered
    prompts = [f'a sign that says "{t}"' for t in texts]
    right = score_text_rendering(images, prompts, [None] * len(texts), read=reader)  # targets from the quotes
    n_en = len(ENGLISH)
    wrong_texts = [ENGLISH[(i + 3) % n_en] for i in range(n_en)] + [CHINESE[(i + 2) % len(CHINESE)] for i in range(len(CHINESE))]
    wrong = score_text_rendering(images, prompts, wrong_texts, read=reader)  # given targets beat the quotes
    for name, res in (("right", right), ("wrong", wrong)):
        print(f"\n{name} targets:", {k: {m: round(v[m], 3) for m in ("word_accuracy", "one_minus_ned", "ned")}
                                     for k, v in [*res["per_language"].items(), ("all", res["overall"])]})
    assert right["overall"]["n"] == len(texts) and right["overall"]["words"] == 28 + 22
    assert right["per_language"]["en"]["n"] == n_en and right["per_language"]["zh"]["n"] == len(CHINESE)
    assert right["overall"]["word_accuracy"] >= 0.9
    assert right["overall"]["one_minus_ned"] >= 0.9
    for lang in ("en", "zh"):
        assert right["per_language"][lang]["word_accuracy"] >= 0.85, right["per_language"]
    assert wrong["overall"]["word_accuracy"] <= 0.1
    assert wrong["overall"]["one_minus_ned"] <= 0.4
    assert wrong["overall"]["ned"] == pytest.approx(1 - wrong["overall"]["one_minus_ned"])
    assert right["metrics"]["eval/text/word_accuracy"] == right["overall"]["word_accuracy"]
    assert right["metrics"]["eval/text/zh/ned"] == right["per_language"]["zh"]["ned"]


def test_samples_without_target_are_skipped(reader, rendered):
    images, texts = rendered
    res = score_text_rendering(images[:3], ["a plain photo", '"Good Morning"', "a photo"], [None, None, "..."], read=reader)
    assert res["skipped"] == 2 and res["overall"]["n"] == 1 and res["samples"][0]["target"] == "Good Morning"
    with pytest.raises(ValueError, match="target text"):
        score_text_rendering(images[:1], ["a plain photo"], [None], read=reader)


def test_eval_command_end_to_end(tiny_model_path, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in [
        {"prompt": 'a shop sign "OPEN LATE"'}, {"prompt": "a cat"}, {"prompt": "a poster", "text": "Summer Sale"},
        {"prompt": "写着「新年快乐」的红色海报"}, {"prompt": "a mug", "text": "GOOD MORNING"},
    ]))
    out = tmp_path / "run"
    proc = tandem_cli("eval", "--config", "configs/demo/sample.yaml", f"model.path={tiny_model_path}", f"output_dir={out}",
                  "--prompts", str(prompts), "--batch-size", "3", "decoder.eval_num_steps=2")
    assert proc.returncode == 0, proc.stderr
    print("\n" + proc.stdout)
    assert "word_acc" in proc.stdout and "\nall " in proc.stdout
    summary = json.loads((out / "eval" / "text_eval.json").read_text())
    samples = [json.loads(line) for line in (out / "eval" / "text_eval_samples.jsonl").read_text().splitlines()]
    assert [s["target"] for s in samples] == ["OPEN LATE", "Summer Sale", "新年快乐", "GOOD MORNING"]
    assert summary["overall"]["n"] == 4 and summary["meta"]["prompts_without_target"] == 1
    assert set(summary["per_language"]) == {"en", "zh"}
    assert summary["overall"]["word_accuracy"] <= 0.2  # random tiny models draw no text
    assert summary["overall"]["ned"] >= 0.8
    assert (out / "eval" / "text_eval.png").is_file() and (out / "config.yaml").is_file()


@pytest.mark.parametrize("case, needle", [
    ("no_targets", "no prompt has a target text"),
    ("missing_prompts", "nope.jsonl"),
    ("bad_checkpoint", "not a checkpoint folder"),
    ("bad_batch", "--batch-size"),
])
def test_eval_user_mistakes_exit_2(case, needle, tiny_model_path, tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("a cat\na dog\n")
    extra = {"no_targets": ["--prompts", str(plain)], "missing_prompts": ["--prompts", "nope.jsonl"],
             "bad_checkpoint": ["--checkpoint", str(tmp_path)], "bad_batch": ["--batch-size", "0"]}[case]
    out = tmp_path / "run"
    proc = tandem_cli("eval", "--config", "configs/demo/sample.yaml", f"model.path={tiny_model_path}", f"output_dir={out}", *extra)
    assert_user_mistake(proc, needle, ignore=("Loading",))
    assert not out.exists()
