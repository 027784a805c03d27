"""`tandem report RUN_DIR`: the page's content, user mistakes, and a real headless-Chromium screenshot in which
the plots and the sample grid are drawn."""

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from tests.cli_run import tandem_cli
from tandem.rl.config import DataConfig, JobConfig, ModelConfig
from tandem.rl.eval import save_results, score_text_rendering
from tandem.rl.run_dir import RunDir

pytestmark = pytest.mark.slow  # headless Chromium and end-to-end jobs

WQY = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
CHROMIUM = shutil.which("chromium")


def _tiles(seed: int) -> np.ndarray:
    """Four 64x64 tiles: colour gradients with a bright disc, different per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    tiles = []
    for _ in range(4):
        r, g, b = rng.integers(0, 256, 3)
        tile = np.stack([(xx * 4 + r) % 256, (yy * 4 + g) % 256, np.full_like(xx, b)], -1)
        tile[(xx - rng.integers(16, 48)) ** 2 + (yy - rng.integers(16, 48)) ** 2 < 120] = 255
        tiles.append(tile)
    return np.stack(tiles).astype(np.uint8)


def _sign(text: str) -> np.ndarray:
    im = Image.new("RGB", (256, 96), (250, 250, 245))
    ImageDraw.Draw(im).text((128, 48), text, fill=(20, 20, 30), font=ImageFont.truetype(WQY, 36), anchor="mm")
    return np.asarray(im)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory written by the real writers: config.yaml, 12 metric lines (eval metrics at steps 6 and
    12), two sample grids, and a text eval of two PIL-rendered signs scored by RapidOCR."""
    path = tmp_path_factory.mktemp("runs") / "demo_run"
    cfg = JobConfig(output_dir=str(path), max_steps=12, model=ModelConfig(path="/models/GLM-Image"),
                    data=DataConfig(prompts="data/demo_prompts.jsonl"))
    run = RunDir(str(path)).create(cfg)
    for step in range(1, 13):
        row = {"step": step, "reward/mean": -0.6 + 0.02 * step, "reward/std": 0.01, "reward/color/mean": -0.6 + 0.02 * step,
               "advantage/zero_std_frac": 0.0, "ratio/mean": 1.0 + 0.001 * (-1) ** step, "clipfrac": 0.05 * (step % 4),
               "kl": 0.001 * step, "loss": 0.01 / step, "time/rollout_s": 2.0, "time/reward_s": 0.5, "time/train_s": 1.0}
        if step % 6 == 0:
            row["eval/text/word_accuracy"] = 0.05 * step
        run.log_metrics(row)
    run.save_grid("step_000006", _tiles(6), ["a red apple", "a sign", "写着「你好」", "a cat"])
    run.save_grid("step_000012", _tiles(12), ["a red apple", "a sign", "写着「你好」", "a cat"])
    images = np.stack([_sign("OPEN LATE"), _sign("新年快乐")])
    result = score_text_rendering(images, ['a sign "OPEN LATE"', "写着「新年快乐」"], [None, None])
    save_results(path / "eval", result, images)
    proc = tandem_cli("report", str(path))
    assert proc.returncode == 0, proc.stderr
    return path


def test_report_is_one_self_contained_page(run_dir):
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing linked from outside
    for element in ("plot-rewards", "plot-diagnostics", "plot-eval", "grid-0", "grid-1", "eval-grid", "metrics", "eval", "config"):
        assert f'id="{element}"' in page, element
    assert "step 12 — samples/step_000012.png" in page and "step 6 — samples/step_000006.png" in page
    assert page.index("step 12 —") < page.index("step 6 —")  # newest first
    assert "output_dir: " + str(run_dir) in page and "path: /models/GLM-Image" in page
    # first / last of reward/mean with their steps; eval metric first logged at step 6
    assert re.search(r"<td>reward/mean</td><td>-0.58</td><td>1</td><td>-0.36</td><td>12</td>", page)
    assert re.search(r"<td>eval/text/word_accuracy</td><td>0.3</td><td>6</td><td>0.6</td><td>12</td>", page)
    assert "time/rollout_s total 24.0" in page
    assert "OPEN LATE" in page and "新年快乐" in page
    assert (run_dir / "reward_curve.png").is_file()


@pytest.mark.parametrize("case", ["missing", "not_a_run", "bad_metrics"])
def test_user_mistakes_exit_2_and_write_nothing(case, tmp_path):
    folder = tmp_path / "run"
    if case != "missing":
        folder.mkdir()
        (folder / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "rew\n')
    if case == "bad_metrics":
        (folder / "config.yaml").write_text("output_dir: run\n")
    proc = tandem_cli("report", str(folder))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert {"missing": "run directory not found", "not_a_run": "no config.yaml", "bad_metrics": "metrics.jsonl:2"}[case] in lines[0]
    assert not (folder / "report.html").exists() and not (folder / "reward_curve.png").exists()


# ----------------------------------------------------------------------------------- headless Chromium
def _screenshot(html: str, tmp_path, name: str) -> np.ndarray:
    page = tmp_path / f"{name}.html"
    page.write_text(html, encoding="utf-8")
    png = tmp_path / f"{name}.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={png}", "--window-size=1200,2000",
         page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


def _displayed_size(page: str, element_id: str):
    """Width and height the page asks for: the width attribute (or the PNG's own width), height to scale."""
    tag = re.search(rf'<img id="{element_id}"[^>]*>', page).group(0)
    data = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', tag).group(1))
    w, h = Image.open(io.BytesIO(data)).size
    attr = re.search(r'width="(\d+)"', tag)
    shown = int(attr.group(1)) if attr else w
    return shown, round(h * shown / w)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make system-deps` installs the Debian package)")
def test_chromium_screenshot_draws_plots_and_grid(run_dir, tmp_path):
    """Screenshot the page, then the page with one image hidden (visibility: hidden keeps the layout): the
    pixels that change are where that image is drawn. Each must cover a box of its displayed size (+- the
    1 px CSS border), and what is drawn there must not be blank."""
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    full = _screenshot(page, tmp_path, "full")
    assert full.shape == (2000, 1200, 3)
    blank = _screenshot("<!DOCTYPE html><html><body></body></html>", tmp_path, "blank")
    assert np.abs(full - blank).max(axis=-1).astype(bool)[:1000].mean() > 0.05  # the upper half is not a blank page
    report = {}
    for element in ("plot-rewards", "plot-diagnostics", "plot-eval", "grid-0"):
        hidden = _screenshot(page.replace("</head>", f"<style>#{element} {{ visibility: hidden; }}</style></head>"), tmp_path, element)
        ys, xs = np.nonzero(np.abs(full - hidden).max(axis=-1) > 0)
        assert len(ys), f"{element}: hiding it changed no pixel, so it is not drawn in the first 2000 px"
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        width, height = _displayed_size(page, element)
        drawn = full[box[1]:box[3], box[0]:box[2]]
        report[element] = {"box": tuple(int(v) for v in box), "expected": (width, height), "std": round(float(drawn.std()), 1)}
        assert abs((box[2] - box[0]) - width) <= 3 and abs((box[3] - box[1]) - height) <= 3, report[element]
        assert drawn.std() > 20, report[element]
    print("\ndrawn regions (x0, y0, x1, y1), expected (w, h), pixel std:", json.dumps(report))
