"""`tandem rewards` / `tandem score`: output format, prompt-file pairing, one-line errors, the Ray backend."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tandem.rewards.cli import cmd_rewards, cmd_score
from tandem.rl.config import ConfigError

pytestmark = pytest.mark.slow  # CLI subprocesses

ROOT = Path(__file__).resolve().parents[2]


def write_images(folder: Path, specs) -> None:
    folder.mkdir(exist_ok=True)
    for name, size, value in specs:
        Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(folder / name)


def output_rows(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cmd_rewards_lists_every_builtin(capsys):
    assert cmd_rewards() == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert {"ocr", "hands", "aesthetic", "vlm", "lpips", "brightness", "color", "jpeg_compressibility"} <= set(names)
    assert all(len(line.split()) > 2 for line in lines)


def test_score_txt_prompts_in_sorted_order_with_mixed_sizes(tmp_path, capsys, plugin_path):
    write_images(tmp_path / "imgs", [("b.png", (32, 32), 200), ("a.jpg", (48, 32), 50), ("c.png", (32, 32), 0)])
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    (tmp_path / "p.txt").write_text("first prompt\nsecond\nthird one\n")
    assert cmd_score(["brightness", "tests.reward_plugins:PromptLength"], str(tmp_path / "imgs"), str(tmp_path / "p.txt")) == 0
    rows = output_rows(capsys)
    assert [r["image"] for r in rows] == ["a.jpg", "b.png", "c.png"]
    assert [r["prompt"] for r in rows] == ["first prompt", "second", "third one"]
    assert [r["PromptLength"] for r in rows] == [12.0, 6.0, 9.0]
    assert rows[1]["brightness"] == pytest.approx(-abs(200 / 255 - 0.5), abs=1e-6)
    assert set(rows[0]) == {"image", "prompt", "brightness", "PromptLength"}


def test_score_jsonl_with_image_text_and_reference(tmp_path, capsys, plugin_path):
    write_images(tmp_path / "imgs", [("x.png", (32, 32), 10), ("y.png", (32, 32), 20)])
    write_images(tmp_path / "refs", [("r.png", (16, 16), 100)])
    lines = [
        {"prompt": "no reference", "image": "y.png"},
        {"prompt": "with one", "image": "x.png", "reference": "refs/r.png", "text": "hello"},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert cmd_score(["tests.reward_plugins:reference_mean", "ocr"], str(tmp_path / "imgs"), str(tmp_path / "p.jsonl")) == 0
    rows = output_rows(capsys)
    assert [(r["image"], r["reference_mean"]) for r in rows] == [("x.png", 100.0), ("y.png", None)]
    assert rows[0]["ocr"] == 0.0 and rows[1]["ocr"] is None  # target "hello" not in a flat image; no target


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_dir", "images folder not found"),
        ("no_prompts", "prompt file not found"),
        ("count", "has 1 prompts for 2 images"),
        ("bad_image", "cannot read image"),
        ("unknown_reward", "unknown reward 'nope'"),
        ("missing_named_image", "image 'z.png' is not in"),
        ("empty_dir", "no .png/.jpg images in"),
    ],
)
def test_score_bad_input_is_one_config_error(tmp_path, case, message):
    write_images(tmp_path / "imgs", [("x.png", (8, 8), 0), ("y.png", (8, 8), 0)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "two.txt").write_text("a\nb\n")
    (tmp_path / "one.txt").write_text("a\n")
    (tmp_path / "named.jsonl").write_text('{"prompt": "a", "image": "z.png"}\n{"prompt": "b", "image": "x.png"}\n')
    args = {
        "no_dir": (["brightness"], "nowhere", "two.txt"),
        "no_prompts": (["brightness"], "imgs", "none.txt"),
        "count": (["brightness"], "imgs", "one.txt"),
        "bad_image": (["brightness"], "imgs", "two.txt"),
        "unknown_reward": (["nope"], "imgs", "two.txt"),
        "missing_named_image": (["brightness"], "imgs", "named.jsonl"),
        "empty_dir": (["brightness"], "empty", "two.txt"),
    }[case]
    if case == "bad_image":
        (tmp_path / "imgs" / "y.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=message) as info:
        cmd_score(args[0], str(tmp_path / args[1]), str(tmp_path / args[2]))
    assert "\n" not in str(info.value)


def test_tandem_score_on_an_embedded_ray_cluster_and_exit_code_2(tmp_path):
    """Through the console entry point in a fresh process: the client starts its own cluster and removes it."""
    write_images(tmp_path / "imgs", [("a.png", (32, 32), 30), ("b.png", (32, 32), 220)])
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "tandem.rl.cli", "score", "--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt")]
    proc = subprocess.Popen(cmd + ["--reward", "color", "--reward", "tests.reward_plugins:mean_red", "--backend", "ray"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert not Path(f"/tmp/tandem-ray-{proc.pid}").exists()  # the embedded cluster's folder is removed
    local_run = subprocess.run(cmd + ["--reward", "color", "--reward", "tests.reward_plugins:mean_red"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert stdout == local_run.stdout and len(stdout.splitlines()) == 2
    bad = subprocess.run(cmd + ["--reward", "nope"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown reward 'nope'" in bad.stderr
