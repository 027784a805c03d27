"""Reward plugins that just work: @register in the user's own module under the Ray backend, `reward_modules`,
the working directory on sys.path, TRL-style reward functions, `--dry-run` reward checks, `tandem score
--args` with OCR's read text, and a reward that keeps raising stopping the job with one line."""

import json
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from tandem.rewards.base import RewardError
from tandem.rewards.client import RewardClient
from tandem.rewards.config import RewardEntry, RewardHostConfig
from tandem.rewards.scoring import FailureGuard
from tandem.rl.cli import main
from tests.cli_run import assert_user_mistake, tandem_cli

pytestmark = pytest.mark.slow  # Ray clusters and jobs

RAY = RewardHostConfig(backend="ray")
LOCAL = RewardHostConfig(backend="local")
BACKENDS = [pytest.param(RAY, id="ray", marks=pytest.mark.slow), pytest.param(LOCAL, id="local")]  # slow: a Ray cluster


@pytest.fixture
def host(request):
    """The backend of the parameter (tests.reward_plugins importable), with the session's local Ray cluster
    started for "ray"."""
    request.getfixturevalue("plugin_path")
    if request.param.backend == "ray":
        request.getfixturevalue("ray_cluster")
    return request.param

GREEN_MODULE = textwrap.dedent('''
    import numpy as np
    from tandem.rewards import register

    @register("{name}")
    def greenness(images, prompts, metadata):
        """Mean green channel in [0, 1]."""
        return images[..., 1].reshape(len(images), -1).mean(axis=1) / 255.0
''')


def user_module(folder, module, reward):
    """Write the user's reward module `module.py` (registering `reward`) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(GREEN_MODULE.format(name=reward))


def images(n=4):
    return np.random.default_rng(0).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


@pytest.mark.slow  # a Ray cluster
def test_registered_reward_of_a_user_module_scores_in_ray_actors(ray_cluster, tmp_path, monkeypatch):
    # the module's folder is on the driver's sys.path only: the actors' PYTHONPATH does not have it
    user_module(tmp_path / "mine", "greenlib_ray", "greenness_ray")
    monkeypatch.syspath_prepend(str(tmp_path / "mine"))
    import greenlib_ray  # noqa: F401  (the user's script imports its module, which registers the reward)

    imgs = images()
    with RewardClient([RewardEntry(name="greenness_ray", replicas=2)], RAY) as client:
        scores = client.score(imgs, ["p"] * 4).result()["greenness_ray"]
    np.testing.assert_allclose(scores, imgs[..., 1].reshape(4, -1).mean(1) / 255)


@pytest.mark.slow  # a Ray cluster
def test_reward_of_the_main_script_is_refused_on_ray_with_the_fix(ray_cluster):
    main_module = sys.modules["__main__"]

    def from_main(images, prompts, metadata):
        return [0.0] * len(images)

    from_main.__module__ = "__main__"
    main_module.from_main_reward = from_main
    try:
        with pytest.raises(Exception, match=r"defined in the script being run \(__main__\).*reward_host.backend=local"):
            RewardClient([RewardEntry(fn="__main__:from_main_reward")], RAY).start()
    finally:
        del main_module.from_main_reward


@pytest.mark.parametrize("host", BACKENDS, indirect=True)
def test_trl_style_reward_function(host):
    imgs = images()
    metadata = [{"text": "hi"}, {}, {"text": "x", "other": 1}, {}]
    entry = RewardEntry(fn="tests.reward_plugins:trl_red_plus_text", style="trl")
    with RewardClient([entry], host) as client:
        scores = client.score(imgs, ["a", "b", "c", "d"], metadata).result()["trl_red_plus_text"]
    expected = imgs[..., 0].reshape(4, -1).mean(1) / 255 + np.array([1, 0, 1, 0])
    np.testing.assert_allclose(scores, expected)


@pytest.mark.parametrize("host", BACKENDS, indirect=True)
def test_failures_are_marked_and_a_reward_that_keeps_failing_stops(host):
    entries = [RewardEntry(fn="tests.reward_plugins:buggy"), RewardEntry(name="brightness")]
    with RewardClient(entries, RewardHostConfig(backend=host.backend, max_failed_frac=0.5, max_failed_rollouts=2)) as client:
        scores = client.score(images(), ["p"] * 4).result()
        assert scores.failed["buggy"].all() and not scores.failed["brightness"].any()
        assert scores.errors["buggy"] == "ZeroDivisionError: buggy reward"
        client.check_failures(scores)  # one rollout: not yet
        with pytest.raises(RewardError, match=r"reward 'buggy' failed on 4/4 samples .* 2 consecutive rollouts.*ZeroDivisionError"):
            client.check_failures(scores)


def test_failure_guard_counts_consecutive_rollouts_over_the_share():
    guard = FailureGuard(max_frac=0.5, max_rollouts=2)
    half, most = np.array([1, 1, 0, 0], bool), np.array([1, 1, 1, 0], bool)
    guard.observe({"r": most}, {})
    guard.observe({"r": half}, {})  # exactly half is not "more than": the streak restarts
    guard.observe({"r": most}, {})
    with pytest.raises(RewardError, match="reward 'r' failed on 3/4"):
        guard.observe({"r": most}, {"r": "ValueError: x"})


@pytest.mark.slow  # an end-to-end job
def test_buggy_reward_stops_a_training_job_with_one_line(tiny_path, tmp_path):
    proc = tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", f"output_dir={tmp_path / 'run'}",
                      f"model.path={tiny_path}", "max_steps=50", "logging.progress=false", "logging.sample_every=0",
                      "reward_host.backend=local", "reward_host.max_failed_rollouts=2", "decoder.num_steps=4",
                      "decoder.sde_window_range=[0,3]", "rewards=[{fn: 'tests.reward_plugins:buggy'}]")
    assert_user_mistake(proc, "reward 'buggy' failed on 8/8 samples", "ZeroDivisionError", code=1, only="tandem:")


def test_dry_run_imports_reward_modules_from_the_working_directory(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    config = str(Path("configs/demo/decoder.yaml").resolve())
    monkeypatch.chdir(tmp_path)
    user_module(tmp_path, "greenlib_cwd", "greenness_cwd")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    base = ["train", "decoder", "--config", config, "--dry-run", f"data.prompts={Path(config).parents[2] / 'data/demo_prompts.jsonl'}"]
    assert main(base + ["reward_modules=[greenlib_cwd]", "rewards=[{name: greenness_cwd}]"]) == 0
    assert "greenness_cwd" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, needle",
    [
        ("rewards=[{name: ocrr}]", "rewards[0]: unknown reward 'ocrr'"),
        ("rewards=[{name: aesthetic}]", "rewards[0]: reward 'aesthetic' needs args.clip_weights"),
        ("rewards=[{name: vlm, args: {model_path: /no/such/vlm}}]", "reward 'vlm' needs args.model_path"),
        ("rewards=[{name: color, style: keras}]", "rewards[0].style is 'keras'"),
        ("rewards=[{name: color, args: {colour: [1, 2, 3]}}]", "rewards[0]: reward 'color': rewards[].args do not fit color"),
        ("reward_modules=[no_such_module_here]", "reward_modules: cannot import 'no_such_module_here'"),
    ],
)
def test_dry_run_checks_reward_names_and_weight_paths(override, needle):
    assert_user_mistake(tandem_cli("train", "decoder", "--config", "configs/demo/decoder.yaml", "--dry-run", override), needle)


def test_score_args_and_ocr_read_text(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    image = Image.new("RGB", (256, 96), "white")
    ImageDraw.Draw(image).text((16, 24), "HELLO", fill="black", font=ImageFont.load_default(size=40))
    image.save(folder / "a.png")
    (tmp_path / "p.txt").write_text('a sign that says "HELLO"\n')
    code = main(["score", "--reward", "ocr", "--args", '{"det_limit_side_len": 960}', "--reward", "brightness",
                 "--args", '{"target": 1.0}', "--images", str(folder), "--prompts", str(tmp_path / "p.txt")])
    assert code == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["ocr/target"] == "HELLO" and row["ocr/read"].upper() == "HELLO" and row["ocr"] == 1.0
    luma = np.asarray(image, float) @ [0.299, 0.587, 0.114]
    assert row["brightness"] == pytest.approx(-abs(luma.mean() / 255 - 1.0))


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--args", "{not json"], "is not JSON"),
        (["--args", "[1]"], "must be a JSON object"),
        (["--args", "{}", "--args", "{}"], "2 --args for 1 --reward"),
        (["--args", '{"bogus": 1}'], "args do not fit"),
    ],
)
def test_score_args_mistakes_are_one_line(tmp_path, extra, needle):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "p.txt").write_text("x\n")
    assert_user_mistake(tandem_cli("score", "--reward", "brightness", *extra, "--images", tmp_path, "--prompts", tmp_path / "p.txt"),
                        needle)
